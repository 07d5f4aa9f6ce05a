"""The `sparseinfer` command line: the default model, and one-line errors without tracebacks."""

from __future__ import annotations

import pytest

from sparseinfer_jax.cli import main


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
