"""The `sparseinfer` command line: the default model, and one-line errors without tracebacks."""

from __future__ import annotations

import pytest

from sparseinfer_jax.cli.main import main


def test_generate_with_the_shipped_model_prints_text_and_speed(capsys):
    assert (
        main(
            [
                "generate",
                "--prompt",
                "Return the",
                "--max-new-tokens",
                "8",
                "--mode",
                "sparse",
                "--backend",
                "xla",
                "--stats",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out.startswith("Return the") and len(out.strip()) > len("Return the")
    assert "tokens/s" in err and "predicted sparsity per layer" in err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "x"], "does not exist"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--prompt", "x", "--alpha", "1,2"], "alpha"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_compile_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from sparseinfer_jax.cli.common import compile_cache_dir

    for name in ("SPARSEINFER_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "sparseinfer" / "jax")
    assert compile_cache_dir(flag_off=True) is None
    monkeypatch.setenv("SPARSEINFER_COMPILE_CACHE", "off")
    assert compile_cache_dir() is None
    monkeypatch.setenv("SPARSEINFER_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache_dir() == str(tmp_path / "mine")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache_dir() is None  # JAX's own setting is left to JAX


def test_generate_keeps_its_compiled_program_unless_told_not_to(tmp_path):
    import os
    import subprocess
    import sys

    def run(*flags: str, folder: str) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu", SPARSEINFER_COMPILE_CACHE=folder,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        argv = [*flags, "generate", "--prompt", "Hi", "--max-new-tokens", "2"]
        subprocess.run([sys.executable, "-m", "sparseinfer_jax.cli", *argv], env=env,
                       check=True, capture_output=True)

    kept, off = tmp_path / "kept", tmp_path / "off"
    run(folder=str(kept))
    run("--no-compile-cache", folder=str(off))
    names = os.listdir(kept)
    assert any("_prefill" in n for n in names) and any("_decode" in n for n in names), names
    assert not off.exists() or not os.listdir(off)


@pytest.mark.parametrize("argv, off", [
    (["generate", "--prompt", "x"], False),
    (["--no-compile-cache", "generate", "--prompt", "x"], True),
    (["generate", "--prompt", "x", "--no-compile-cache"], True),  # as the README writes it
    (["eval", "--text", "t.txt", "--no-compile-cache"], True),
])
def test_no_compile_cache_before_or_after_the_command(argv, off):
    from sparseinfer_jax.cli.main import build_parser

    assert build_parser().parse_args(argv).no_compile_cache is off
