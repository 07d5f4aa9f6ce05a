"""The README's first command with the shipped model: readable text, the comparison with dense,
and streaming to a terminal that prints what the one-shot output prints."""

from __future__ import annotations

import io
import re
import sys

import pytest

from sparseinfer_jax.cli.main import main

FIRST_RUN = ["generate", "--prompt", "Return the", "--mode", "sparse", "--compare"]


class FakeTerminal(io.StringIO):
    """stdout as a terminal, keeping what each write added."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _run(monkeypatch, capsys, argv, *, terminal: bool):
    out = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(argv) == 0
    return out, capsys.readouterr().err


def test_first_run_prints_text_and_what_sparse_did_against_dense(monkeypatch, capsys):
    out, err = _run(monkeypatch, capsys, FIRST_RUN + ["--max-new-tokens", "16"], terminal=True)
    text = out.getvalue()
    assert text.startswith("Return the") and len(text.strip()) > len("Return the")
    assert len(out.writes) > 3  # streamed, not written once at the end
    lines = err.strip().splitlines()
    assert lines[0] == "sparse vs dense, same prompt and seed:"
    steps = re.search(r"dense picks the same at (all|(\d+) of) (\d+) steps \((\d+)%\)", err)
    assert steps, err
    agreed = int(steps[3]) if steps[1] == "all" else int(steps[2])
    assert 0 <= agreed <= int(steps[3]) <= 16
    assert round(100 * agreed / int(steps[3])) == int(steps[4])
    mlp = re.search(r"skipped (\d+)% of neurons per token: read ([\d.]+) of ([\d.]+) MiB", err)
    assert mlp, err
    assert 0 < int(mlp[1]) < 100 and 0 < float(mlp[2]) < float(mlp[3])
    # The shipped model's MLP: 4 layers x 3 matrices x 1024 x 256 bfloat16 weights.
    assert float(mlp[3]) == pytest.approx(4 * 3 * 1024 * 256 * 2 / 2**20, abs=0.01)
    speed = re.search(r"decode +sparse (\d+) tokens/s, dense (\d+) tokens/s \(([\d.]+)x\)", err)
    assert speed and int(speed[1]) > 0 and int(speed[2]) > 0, err
    # Each line names what it says; the note on where skipping pays off comes only when sparse
    # decoded slower than dense here (a small model on a CPU often does).
    labels = [line.split()[0] for line in lines[1:]]
    noted = labels[-1:] == ["note"]
    assert labels == ["tokens", "MLP", "decode", "compile", "path"] + ["note"] * noted, err
    ratio = float(speed[3])  # printed to two places, so 1.00 can go either way
    assert ratio <= 1.0 if noted else ratio >= 1.0, err


@pytest.mark.parametrize(
    "flags", [["--temperature", "0"], []], ids=["greedy", "default-sampling"]
)
def test_streamed_output_equals_the_one_shot_output(monkeypatch, capsys, flags):
    argv = ["generate", "--prompt", "Return the", "--mode", "sparse", "--max-new-tokens", "24",
            *flags]
    streamed, _ = _run(monkeypatch, capsys, argv, terminal=True)
    whole, _ = _run(monkeypatch, capsys, argv, terminal=False)
    forced, _ = _run(monkeypatch, capsys, argv + ["--stream"], terminal=False)
    assert streamed.getvalue() == whole.getvalue() == forced.getvalue()
    assert len(streamed.writes) > 3
    piped, _ = _run(monkeypatch, capsys, argv + ["--no-stream"], terminal=True)
    assert piped.getvalue() == whole.getvalue() and len(piped.writes) <= 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--compare"], "--compare"),  # dense mode: nothing to compare
        (["--mode", "sparse", "--compare", "--max-new-tokens", "1"], "--max-new-tokens 2"),
        (["--mode", "sparse", "--repetition-penalty", "0.5"], "repetition_penalty"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
    ],
)
def test_generate_user_errors_exit_2_with_one_line(capsys, argv, match):
    assert main(["generate", "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
