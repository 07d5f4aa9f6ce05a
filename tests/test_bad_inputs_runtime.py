"""Bad input to `sparseinfer` and the Python API: one line, the right exit code, before the work.

One parametrised table: each row names the case, the command line (or API call), a fragment the
one-line message must contain, and the exit code (None for an API call, which raises UserError).
Every row also checks that nothing was written next to the outputs it names and that the error
came before the work (no progress bar of eval or calibrate was started).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from unittest import mock

import numpy as np
import pytest
from conftest import cli_lines

from sparseinfer_jax import UserError, generate, load
from sparseinfer_jax.api.loading import SHIPPED_MODEL
from sparseinfer_jax.bench import records
from sparseinfer_jax.bench.gpu_spec import SPECS_DIR as GPU_SPECS
from sparseinfer_jax.bench.records import Settings
from sparseinfer_jax.cli.main import main
from sparseinfer_jax.io.text import token_windows
from sparseinfer_jax.tuning.calibration import calibrate
from sparseinfer_jax.tuning.evaluation import evaluate, perplexity

TEXT = os.path.join(SHIPPED_MODEL, "validation.txt")
CAL = ["calibrate", "--target-recall", "0.9"]
EV = ["eval", "--text", TEXT]


def _ids(n: int) -> list[int]:
    return np.random.default_rng(n).integers(3, 500, size=n).tolist()


# (case, argv with {tmp} for the test's folder, or an API call on (model, tokenizer, tmp),
#  message fragment, exit code)
CASES = [
    ("temperature nan", ["generate", "--prompt", "x", "--temperature", "nan"], "temperature", 2),
    ("--quantize a bad value", [*EV, "--quantize", "int4"], "--quantize must be one of", 2),
    ("bench --quantize a bad value", ["bench", "--quantize", "fp8"], "--quantize must be", 2),
    ("bench --tokens past the positions", ["bench", "--tokens", "5000"], "ask for at most", 2),
    ("bench --quantize with --peer hf", ["bench", "--quantize", "int8", "--peer", "hf"],
     "drop --peer or --quantize", 2),
    ("API load quantize a bad value", lambda m, t, tmp: load(quantize="int4"),
     "--quantize must be one of", None),
    ("API quantise a quantised checkpoint",
     lambda m, t, tmp: load(_quantized_checkpoint(tmp), quantize="int8"), "quantised already",
     None),
    ("API int8 over several devices",
     lambda m, t, tmp: load(quantize="int8", mesh=_two_devices()), "do not shard", None),
    ("temperature inf", ["generate", "--prompt", "x", "--temperature", "inf"], "temperature", 2),
    ("temperature < 0", ["generate", "--prompt", "x", "--temperature", "-1"], "temperature", 2),
    ("top-p nan", ["generate", "--prompt", "x", "--top-p", "nan"], "top_p", 2),
    ("top-k 0", ["generate", "--prompt", "x", "--top-k", "0"], "top_k", 2),
    ("absurd --max-new-tokens", ["generate", "--prompt", "x", "--max-new-tokens", "1000000000"],
     "1024 positions", 2),
    ("prompt + new tokens > positions", ["generate", "--prompt", "word " * 1100],
     "1024 positions", 2),
    ("non-UTF-8 --prompt", ["generate", "--prompt", "caf\udce9"], "not valid UTF-8", 2),
    ("eval window > positions", [*EV, "--window", "4096"], "1024 positions", 2),
    ("eval Latin-1 text", ["eval", "--text", "{tmp}/latin1.txt"], "not UTF-8", 2),
    ("eval binary text", ["eval", "--text", "{tmp}/binary.txt"], "not UTF-8", 2),
    ("calibrate Latin-1 text", [*CAL, "--text", "{tmp}/latin1.txt"], "not UTF-8", 2),
    ("eval --text a folder", ["eval", "--text", "{tmp}"], "is a folder", 2),
    ("calibrate --text a folder", [*CAL, "--text", "{tmp}"], "is a folder", 2),
    ("calibrate window > positions", [*CAL, "--text", TEXT, "--window", "2048"],
     "1024 positions", 2),
    ("calibrate on 1 character", [*CAL, "--text", "{tmp}/one.txt"], "at least 64 tokens", 2),
    ("calibrate read-only checkpoint", [*CAL, "{tmp}/ckpt", "--text", TEXT], "cannot write", 2),
    ("calibrate immutable config.json", [*CAL, "{tmp}/ckpt", "--text", TEXT],
     "config.json cannot be replaced", 2),
    ("--sweep negative", [*EV, "--plot", "{tmp}/p.png", "--sweep=-1,1"], "--sweep", 2),
    ("--sweep not numbers", [*EV, "--plot", "{tmp}/p.png", "--sweep", "abc"], "--sweep", 2),
    ("--sweep inf", [*EV, "--plot", "{tmp}/p.png", "--sweep", "1,inf"], "--sweep", 2),
    ("eval --json missing folder", [*EV, "--json", "{tmp}/no/r.json"], "does not exist", 2),
    ("eval --json a folder", [*EV, "--json", "{tmp}"], "is a folder", 2),
    ("eval --plot a folder", [*EV, "--plot", "{tmp}"], "is a folder", 2),
    ("eval --json under a file", [*EV, "--json", "{tmp}/one.txt/r.json"], "is a file", 2),
    ("bench --json missing folder", ["bench", "--json", "{tmp}/no/b.json"], "does not exist", 2),
    ("Ctrl-C during eval", ["sigint", *EV, "--json", "{tmp}/r.json"], "interrupted", 130),
    ("--distributed-timeout 0", ["generate", "--prompt", "x", "--distributed",
                                 "--distributed-timeout", "0"], "--distributed-timeout", 2),
    ("coordinator unreachable", ["job:1", "generate", "--prompt", "x", "--distributed",
                                 "--distributed-timeout", "3"], "could not reach", 2),
    ("other processes never join", ["job:0", "generate", "--prompt", "x", "--distributed",
                                    "--distributed-timeout", "3"], "did not form", 2),
    # Issue 23: a seed outside int64, --distributed outside a job, output into a closed pipe.
    ("--seed 2**63", ["generate", "--prompt", "x", "--seed", str(2**63)], "seed must be", 2),
    ("--seed -2**63-1", ["generate", "--prompt", "x", f"--seed={-(2**63) - 1}"], "seed must be",
     2),
    ("--distributed without a job", ["job:", "generate", "--prompt", "x", "--distributed"],
     "set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID", 2),
    ("closed pipe, --stream", ["pipe", "generate", "--prompt", "Return the", "--stream"], "",
     141),
    ("closed pipe, --no-stream", ["pipe", "generate", "--prompt", "Return the", "--no-stream"],
     "", 141),
    # Issue 30: one line where a traceback was.
    ("output onto a full device, --stream", ["full", "generate", "--prompt", "x", "--stream"],
     "error: writing to standard output failed (No space left on device)", 1),
    ("output onto a full device, --no-stream", ["full", "generate", "--prompt", "x",
                                                "--no-stream"],
     "error: writing to standard output failed (No space left on device)", 1),
    ("JAX_PLATFORMS=cuda without a GPU", ["env:JAX_PLATFORMS=cuda", "generate", "--prompt", "x"],
     "error: JAX cannot start the platform JAX_PLATFORMS=cuda names", 2),
    ("JAX_PLATFORMS=tpu without a TPU", ["env:JAX_PLATFORMS=tpu", "generate", "--prompt", "x"],
     "error: JAX cannot start the platform JAX_PLATFORMS=tpu names", 2),
    ("JAX_PLATFORMS=rocm without a GPU", ["env:JAX_PLATFORMS=rocm", "generate", "--prompt", "x"],
     "error: JAX cannot start the platform JAX_PLATFORMS=rocm names", 2),
    ("compile-report --gpu a binary file", ["compile-report", "--gpu", "{tmp}/binary.txtpb"],
     "is not text", 2),
    ("compile-report --gpu core_count abc", ["compile-report", "--gpu", "{tmp}/typed.txtpb"],
     "field core_count must be a whole number, got 'abc'", 2),
    ("compile-report --gpu unreadable", ["modes", "compile-report", "--gpu",
                                         "{tmp}/locked.txtpb"],
     "error: cannot read GPU spec", 2),
    ("compile-report --gpu missing file", ["compile-report", "--gpu", "{tmp}/no.txtpb"],
     "was not found", 2),
    ("compile-report --gpu ''", ["compile-report", "--gpu="], "--gpu names no GPU", 2),
    ("compile-report --json ''", ["compile-report", "--json="], "--json is empty", 2),
    ("API seed 2**64", lambda m, t, tmp: generate(m, [[3]], seed=2**64), "seed must be", None),
    ("API seed float", lambda m, t, tmp: generate(m, [[3]], seed=1.5), "seed must be", None),
    ("API float ids", lambda m, t, tmp: generate(m, np.asarray([[3.0, 4.0]])), "integers", None),
    ("API model(ids) 1-D", lambda m, t, tmp: m(np.asarray([3, 4])), r"ids\[None\]", None),
    ("API model(ids) a list", lambda m, t, tmp: m([[3, 4]]), r"\[batch, tokens\]", None),
    ("API model(ids) float", lambda m, t, tmp: m(np.asarray([[3.0, 4.0]])), "integers", None),
    ("API model(ids) id >= vocab", lambda m, t, tmp: m(np.asarray([[3, 10**6]])),
     "outside the vocabulary", None),
    ("API model(ids) negative id", lambda m, t, tmp: m(np.asarray([[-1, 3]])),
     "outside the vocabulary", None),
    ("API model(ids) mask shape", lambda m, t, tmp: m(np.asarray([[3, 4]]), np.ones((1, 3))),
     "attention_mask", None),
    # Issue 23: bench checks its memory and its --peer before building anything.
    ("bench more than memory", ["mem:1", "bench", "--shape", "1b", "--layers", "2"],
     "needs about 1.", 2),
    ("bench --peer hf without torch", ["no-torch", "bench", "--peer", "hf"],
     "--peer hf needs torch; pip install torch", 2),
    ("API bench 7b float32 on 24 GiB",
     lambda m, t, tmp: _on_a_machine_of(24, Settings(shape="7b", dtype="float32").check),
     "needs about 26.35 GiB but there is 24.00 GiB of memory", None),
    ("API bench 13b bfloat16 on 24 GiB",
     lambda m, t, tmp: _on_a_machine_of(24, Settings(shape="13b", dtype="bfloat16").check),
     "needs about 25.64 GiB", None),
    # Issue 23's smaller flaws.
    ("--alpha with --mode dense", ["generate", "--prompt", "x", "--alpha", "2"],
     "--mode dense does not use", 2),
    ("--mesh axis twice", ["generate", "--prompt", "x", "--mesh", "model=1,model=1"],
     "names axis 'model' twice", 2),
    ("API temperature nan", lambda m, t, tmp: generate(m, [[3]], temperature=float("nan")),
     "temperature", None),
    ("API prompt + new tokens > positions",
     lambda m, t, tmp: generate(m, [_ids(1000)], max_new_tokens=30), "1024 positions", None),
    ("API non-UTF-8 prompt", lambda m, t, tmp: generate(m, ["caf\udce9"], tokenizer=t),
     "not valid UTF-8", None),
    ("API evaluate window > positions",
     lambda m, t, tmp: evaluate(m, [np.asarray([_ids(1100)], np.int32)]), "1024 positions", None),
    ("API perplexity window > positions",
     lambda m, t, tmp: perplexity(m, [np.asarray([_ids(1100)], np.int32)]), "1024 positions",
     None),
    ("API max_new_tokens 0", lambda m, t, tmp: generate(m, [[3]], max_new_tokens=0),
     "max_new_tokens must be at least 1", None),
    ("API token_windows window 1", lambda m, t, tmp: token_windows(_ids(10), 1),
     "--window must be at least 2", None),
    ("API token_windows max_tokens 1", lambda m, t, tmp: token_windows(_ids(10), 4, 1),
     "--max-tokens must be at least 2", None),
    ("eval --window 1", [*EV, "--window", "1"], "--window must be at least 2", 2),
    ("generate --max-new-tokens 0", ["generate", "--prompt", "x", "--max-new-tokens", "0"],
     "--max-new-tokens must be at least 1", 2),
    ("API evaluate unknown mode",
     lambda m, t, tmp: evaluate(m, [np.asarray([_ids(8)], np.int32)], modes=("fast",)),
     "modes must name one or more of dense", None),
    ("eval --modes unknown", [*EV, "--modes", "dense,fast"], "--modes must name", 2),
    # A second QA pass: outputs that would replace an input or a user's file, flags checked late.
    ("eval --json onto its --text", ["eval", "--text", "{tmp}/text.txt", "--json",
                                     "{tmp}/text.txt"], "would overwrite the input", 2),
    ("eval --json into its checkpoint", ["eval", "{tmp}/ckpt", "--text", TEXT, "--json",
                                         "{tmp}/ckpt/config.json"],
     "would overwrite the input", 2),
    ("bench --json onto a file it did not write", ["bench", "--json", "{tmp}/one.txt"],
     "was not written by sparseinfer", 2),
    ("eval --plot onto a file it did not write", [*EV, "--plot", "{tmp}/text.txt"],
     "was not written by sparseinfer", 2),
    # Issue 30: only a report or PNG this tool wrote is replaced, not a file that mentions it.
    ("eval --json onto a script importing sparseinfer_jax",
     [*EV, "--modes", "dense", "--json", "{tmp}/my_experiment.py"],
     "was not written by sparseinfer", 2),
    ("eval --json onto JSON naming sparseinfer elsewhere",
     [*EV, "--modes", "dense", "--json", "{tmp}/mine.json"], "was not written by sparseinfer", 2),
    ("eval --plot onto notes mentioning Matplotlib", [*EV, "--plot", "{tmp}/notes.pdf"],
     "was not written by sparseinfer", 2),
    ("eval --plot onto a user's own matplotlib PNG", [*EV, "--plot", "{tmp}/figure.png"],
     "was not written by sparseinfer", 2),
    ("--json and --plot one file", [*EV, "--json", "{tmp}/r.png", "--plot", "{tmp}/r.png"],
     "name the same file", 2),
    ("eval --plot .txt", [*EV, "--plot", "{tmp}/p.txt"], "matplotlib cannot write .txt", 2),
    ("bench --plot .txt", ["bench", "--plot", "{tmp}/p.txt"], "matplotlib cannot write .txt", 2),
    ("eval --plot without dense", [*EV, "--modes", "sparse", "--plot", "{tmp}/p.png"],
     "--plot draws sparse against dense", 2),
    ("bench --seed -5", ["bench", "--seed", "-5"], "--seed must be a whole number", 2),
    ("bench --layers beyond the shape", ["bench", "--layers", "100"],
     "--layers cuts tiny's depth: give 1 to 4", 2),
    ("MODEL and --model differ", ["eval", "{tmp}", "--model", SHIPPED_MODEL, "--text", TEXT],
     "name two models", 2),
    ("generate --stats in dense mode", ["generate", "--prompt", "x", "--stats"],
     "--stats is about the sparse MLP", 2),
    ("generate --backend in dense mode", ["generate", "--prompt", "x", "--backend", "portable"],
     "--backend portable is about the sparse MLP", 2),
    ("calibrate --alpha", [*CAL, "--text", TEXT, "--alpha", "2"], "calibrate chooses alpha", 2),
    ("calibrate --mode sparse", [*CAL, "--text", TEXT, "--mode", "sparse"], "drop --mode", 2),
    ("eval --mode sparse", [*EV, "--mode", "sparse"], "give --modes instead of --mode", 2),
    ("eval --alpha without sparse", [*EV, "--modes", "dense", "--alpha", "5"],
     "add sparse to --modes", 2),
    ("eval --sweep without --plot", [*EV, "--sweep", "1,2"], "add --plot FILE", 2),
    ("--model empty", ["generate", "--prompt", "x", "--model", ""], "model path is empty", 2),
    ("API generate on a path", lambda m, t, tmp: generate(SHIPPED_MODEL, [[3]]),
     "load it first", None),
    ("API max_new_tokens 2.5", lambda m, t, tmp: generate(m, [[3]], max_new_tokens=2.5),
     "max_new_tokens must be a whole number", None),
    ("API temperature a string", lambda m, t, tmp: generate(m, [[3]], temperature="0.5"),
     "temperature must be a number", None),
    ("API stream not callable", lambda m, t, tmp: generate(m, [[3]], stream=5),
     "stream must be a function", None),
    ("API tokenizer a string", lambda m, t, tmp: generate(m, ["hi"], tokenizer="tok"),
     "tokenizer must be the one load returns", None),
    ("API alpha in dense mode", lambda m, t, tmp: generate(m, [[3]], mode="dense", alpha=2.0),
     "dense mode does not use", None),
    ("API load a number", lambda m, t, tmp: load(5), "load takes a folder path", None),
    # Issue 30's Python API flaws: each a one-line UserError.
    ("API load empty path", lambda m, t, tmp: load(""), "load got an empty path", None),
    ("API load alpha 'x'", lambda m, t, tmp: load(alpha="x", mode="sparse"),
     "alpha must be a positive number", None),
    ("API load mesh=5", lambda m, t, tmp: load(mesh=5), "mesh must be a jax Mesh", None),
    ("API model(ids) no tokens", lambda m, t, tmp: m(np.zeros((1, 0), np.int32)),
     "the model takes 1 to 1024 tokens", None),
    ("API model(ids) past the positions", lambda m, t, tmp: m(np.ones((1, 1025), np.int32)),
     "the model takes 1 to 1024 tokens", None),
    ("API set_alphas wrong length", lambda m, t, tmp: m.set_alphas([1.0]),
     "alpha must be a positive number or 4", None),
    ("API set_alphas -1", lambda m, t, tmp: m.set_alphas([-1.0] * 4),
     "alpha must be a positive number", None),
    ("API set_alphas nan", lambda m, t, tmp: m.set_alphas([float("nan")] * 4),
     "alpha must be a positive number", None),
    ("API calibrate on 20 tokens",
     lambda m, t, tmp: calibrate(m, [np.asarray([_ids(20)], np.int32)], target_recall=0.9),
     "at least 64 tokens", None),
]


def _on_a_machine_of(gib: float, call) -> None:
    """`call()` as on a machine with `gib` GiB of memory."""
    with mock.patch.object(records, "memory_limit", lambda: int(gib * 2**30)):
        call()


def _quantized_checkpoint(tmp: str) -> str:
    from convert import convert

    return convert(SHIPPED_MODEL, os.path.join(tmp, "int8"), quantize="int8")


def _two_devices():
    import jax

    if jax.device_count() < 2:
        pytest.skip("one device: no mesh to refuse")
    return jax.make_mesh((1, 2), ("data", "model"))


@pytest.fixture(scope="module")
def shipped():
    return load()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait, crème brûlée\n".encode("latin-1") * 20)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "text.txt").write_text(open(TEXT).read())
    (tmp_path / "my_experiment.py").write_text("import sparseinfer_jax\n")
    (tmp_path / "binary.txtpb").write_bytes(bytes(range(256)))
    h100 = open(os.path.join(GPU_SPECS, "h100.txtpb")).read()
    (tmp_path / "typed.txtpb").write_text(re.sub(r"core_count: \d+", "core_count: abc", h100))
    (tmp_path / "locked.txtpb").write_text(h100)
    os.chmod(tmp_path / "locked.txtpb", 0)
    (tmp_path / "mine.json").write_text('{"results": [1, 2], "written_by": "sparseinfer eval"}')
    (tmp_path / "notes.pdf").write_text("%PDF-1.4 notes: the figures came from Matplotlib\n")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    Figure().savefig(tmp_path / "figure.png")
    return tmp_path


def _read_only(path: str) -> None:
    """Makes `path` unwritable, for root too (chattr +i); skips where that is impossible (a file
    without root: mode bits do not stop a rename over it)."""
    if os.geteuid() != 0 and os.path.isfile(path):
        pytest.skip("not root: cannot make a file that rename cannot replace")
    if os.geteuid() != 0:
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        return
    if subprocess.run(["chattr", "+i", path], capture_output=True).returncode != 0:
        pytest.skip("root without chattr +i: cannot make a read-only folder")


def _writable(path: str) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", path], capture_output=True)
    else:
        os.chmod(path, stat.S_IRWXU)


def _alone_in_a_job(process_id: str, argv: list[str]) -> tuple[int, str]:
    """Runs `sparseinfer ARGV` as one process of a 2-process job whose other process never
    starts (the coordinator is a free port nobody listens on unless this is process 0); with no
    `process_id`, outside any job (no JAX_* variables)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    if process_id:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=process_id)
    child = subprocess.run([sys.executable, "-m", "sparseinfer_jax.cli", *argv], env=env,
                           capture_output=True, text=True, timeout=120)
    return child.returncode, cli_lines(child.stderr)


def _in_a_child(argv: list[str], env: dict[str, str] | None = None, stdout=subprocess.DEVNULL,
                modes: bool = False) -> tuple[int, str]:
    """Runs `sparseinfer ARGV` in a child with `env` added and `stdout`; with `modes`, where file
    modes apply to it (root ignores them)."""
    prefix = []
    if modes and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: file modes do not apply")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    child = subprocess.run([*prefix, sys.executable, "-m", "sparseinfer_jax.cli", *argv],
                           env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
                           stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
    return child.returncode, cli_lines(child.stderr)


def _into_closed_pipe(argv: list[str]) -> tuple[int, str]:
    """Runs `sparseinfer ARGV` with stdout a pipe whose reader has gone (`| head -c 0`)."""
    code = "from sparseinfer_jax.cli.console import sparseinfer; sparseinfer()"
    child = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    child.stdout.close()
    err = child.communicate(timeout=300)[1].decode()
    return child.returncode, cli_lines(err)


def _interrupt(argv: list[str]) -> tuple[int, str]:
    """Runs `sparseinfer ARGV` in a child, sends SIGINT once its progress bar shows, returns
    (exit code, stderr)."""
    # Python's own Ctrl-C handler, set again: a child of a shell's background job (CI) would
    # otherwise start with SIGINT ignored, which a user's terminal never does.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from sparseinfer_jax.cli.console import sparseinfer; sparseinfer()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    err = b""
    os.set_blocking(child.stderr.fileno(), False)
    deadline = time.monotonic() + 120
    while b"eval:" not in err and child.poll() is None and time.monotonic() < deadline:
        try:
            err += os.read(child.stderr.fileno(), 1 << 16)
        except BlockingIOError:
            time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    os.set_blocking(child.stderr.fileno(), True)
    err += child.communicate(timeout=120)[1]
    return child.returncode, err.decode()


@pytest.mark.parametrize("case, call, fragment, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_before_the_work(case, call, fragment, code, folder, capsys,
                                                  request):
    tmp = str(folder)
    before = sorted(os.listdir(tmp))
    if callable(call):
        model, tokenizer = request.getfixturevalue("shipped")
        with pytest.raises(UserError, match=fragment):
            call(model, tokenizer, tmp)
        return
    argv = [a.replace("{tmp}", tmp) for a in call]
    if argv[0].startswith("job:"):
        status, err = _alone_in_a_job(argv[0][4:], argv[1:])
        assert status == code and err.startswith("error: ") and fragment in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1
        return
    if argv[0].startswith("mem:"):
        limit = int(argv.pop(0)[4:]) * 2**30
        request.getfixturevalue("monkeypatch").setattr(records, "memory_limit", lambda: limit)
    elif argv[0] == "no-torch":
        request.getfixturevalue("monkeypatch").setitem(sys.modules, "torch", None)
        argv.pop(0)
    if argv[0] in ("full", "modes") or argv[0].startswith("env:"):
        first = argv.pop(0)
        env = dict([first[4:].split("=", 1)]) if first.startswith("env:") else None
        with open("/dev/full" if first == "full" else os.devnull, "w") as out:
            status, err = _in_a_child(argv, env, stdout=out, modes=first == "modes")
        assert status == code and err.startswith(fragment), err[-2000:]
        assert len(err.strip().splitlines()) == 1
        assert sorted(os.listdir(tmp)) == before
        return
    if argv[0] == "pipe":
        status, err = _into_closed_pipe(argv[1:])
        assert status == code and not err.strip(), err[-2000:]  # quiet, as `yes | head`
        return
    if argv[0] == "sigint":
        status, err = _interrupt(argv[1:])
        lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
        assert status == code and lines[-1] == fragment, err[-2000:]
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert sorted(os.listdir(tmp)) == before  # neither r.json nor a temporary file
        return
    if "ckpt" in " ".join(argv):
        from convert import convert

        ckpt = convert(SHIPPED_MODEL, os.path.join(tmp, "ckpt"), calibrate=False)
        capsys.readouterr()
        config = open(os.path.join(ckpt, "config.json")).read()
        before = sorted(os.listdir(tmp))
        locked = os.path.join(ckpt, "config.json") if "config.json" in case else ckpt
        _read_only(locked)
        try:
            status = main(argv)
        finally:
            _writable(locked)
        assert open(os.path.join(ckpt, "config.json")).read() == config
    else:
        status = main(argv)
    out, err = capsys.readouterr()
    assert status == code
    assert err.startswith("error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "eval:" not in err and "calibrate:" not in err and not out  # refused before the work
    assert sorted(os.listdir(tmp)) == before


FINALISER = """
import os, signal, sys, time
from sparseinfer_jax.errors import run_command

# A job started in the background (`cmd &` in a script) inherits SIGINT ignored: Ctrl-C as a
# terminal delivers it is what is tested here.
signal.signal(signal.SIGINT, signal.default_int_handler)

class Slow:
    def __del__(self):  # busy in Python, so the Ctrl-C lands in here
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass

def command():
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    for _ in range(10):
        Slow()
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            pass
    print("finished")
    return 0

sys.exit(run_command(command))
"""


def test_ctrl_c_inside_a_finaliser_still_interrupts():
    # Python drops a KeyboardInterrupt raised in a finaliser ("Exception ignored in"), so a Ctrl-C
    # that lands there would be lost; run_command delivers it again.
    done = subprocess.run([sys.executable, "-c", FINALISER], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130 and "finished" not in done.stdout, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"


IMPORTING = """
import importlib, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
real = importlib.import_module

def import_module(name, *args, **kwargs):
    if name == sys.argv[1]:  # a Ctrl-C just as the command line (and jax) starts importing
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)

importlib.import_module = import_module
from sparseinfer_jax.cli import console
getattr(console, sys.argv[2])()
"""


@pytest.mark.parametrize("module, script", [("sparseinfer_jax.cli.main", "sparseinfer"),
                                            ("convert.cli", "sparseinfer_convert")])
def test_ctrl_c_while_jax_imports(module, script):
    """The console scripts import jax inside their Ctrl-C handling: one line, exit 130."""
    done = subprocess.run([sys.executable, "-c", IMPORTING, module, script, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted" and not done.stdout


def test_a_warning_is_the_tools_own_line(capsys):
    """A warning inside a command (a never-calibrated checkpoint in sparse mode) prints as
    `warning: ...`, one line, without Python's file name, line number and source line."""
    import warnings

    from sparseinfer_jax.errors import run_command

    def command() -> int:
        warnings.warn("the checkpoint was never calibrated", UserWarning, stacklevel=1)
        return 0

    assert run_command(command) == 0
    assert capsys.readouterr().err == "warning: the checkpoint was never calibrated\n"


# Entries of one program in the compile cache, each (name, intact, minutes since written), when
# JAX warns that it could not read that program's entry: which are removed, and what is said.
READ_FAILURES = {
    "killed while writing, an hour ago": (
        [("a", False, 60), ("b", True, 60)], {"a"}, "could not be read; it is compiled again"),
    "another run writing it now": ([("a", False, 0), ("b", True, 60)], set(), None),
    "every entry intact": ([("a", True, 60)], set(), "Error reading persistent compilation"),
}


@pytest.mark.parametrize("entries, removed, said", READ_FAILURES.values(), ids=READ_FAILURES)
def test_compile_cache_read_failure(tmp_path, monkeypatch, entries, removed, said):
    """Only an entry that fails to decompress and that no run can still be writing is removed
    (JAX's warning names the program, not the entry, and JAX writes entries in place)."""
    from jax._src.compilation_cache import compress_executable

    from sparseinfer_jax.cli import common

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: shown.append(message))
    data = compress_executable(os.urandom(4096))
    for key, intact, minutes in entries:
        path = tmp_path / f"jit_f-{key}-cache"
        path.write_bytes(data if intact else data[: len(data) // 2])
        os.utime(path, (time.time() - 60 * minutes,) * 2)
    common._replace_damaged_entries(str(tmp_path))
    warnings.showwarning(
        "Error reading persistent compilation cache entry for 'jit_f': ValueError: x",
        UserWarning, "compiler.py", 1)
    left = {path.name.split("-")[1] for path in tmp_path.iterdir()}
    assert left == {key for key, _, _ in entries} - removed
    assert [said in str(message) for message in shown] == ([True] if said else [])


def test_a_damaged_compile_cache_entry_is_replaced(tmp_path):
    """An entry of the compile cache cut short (a run killed while JAX wrote it) is reported in
    one line and written again, so the run after loads it instead of compiling again (JAX alone
    keeps the damaged file and recompiles in every run)."""
    env = {**os.environ, "SPARSEINFER_COMPILE_CACHE": str(tmp_path),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = [sys.executable, "-m", "sparseinfer_jax.cli", "generate", "--prompt", "Return the",
            "--max-new-tokens", "2", "--no-stream"]

    def warnings_of_a_run() -> list[str]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        return [line for line in done.stderr.splitlines() if line.startswith("warning:")]

    assert warnings_of_a_run() == []
    entries = {path: os.path.getsize(path) for path in glob.glob(str(tmp_path / "*-cache"))}
    assert entries
    victim = max(entries, key=entries.get)
    with open(victim, "r+b") as f:
        f.truncate(entries[victim] // 2)
    os.utime(victim, (time.time() - 3600,) * 2)  # a run killed an hour ago, not one writing now
    program = os.path.basename(victim).rsplit("-", 2)[0]
    found = warnings_of_a_run()
    assert len(found) == 1 and f"'{program}'" in found[0] and "could not be read" in found[0]
    assert os.path.getsize(victim) > entries[victim] // 2  # written again
    assert warnings_of_a_run() == []


@pytest.mark.parametrize("kind", ["json report", "matplotlib plot"])
def test_a_report_or_plot_written_before_may_be_replaced(tmp_path, kind):
    """Outputs are refused over a user's file but not over this tool's own earlier output, so a
    command can be run again with the same --json / --plot."""
    from sparseinfer_jax.errors import check_output_file, write_plot, write_report

    if kind == "json report":
        path = tmp_path / "r.json"
        write_report(path, {"tokens": 3}, "eval")
    else:
        matplotlib = pytest.importorskip("matplotlib")
        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        path = tmp_path / "p.png"
        write_plot(path, Figure().savefig, "eval")
    check_output_file(path, "--json")
    path.write_bytes(path.read_bytes().replace(b"sparseinfer", b"elsewhere!!"))  # same length
    with pytest.raises(UserError, match="was not written by sparseinfer"):
        check_output_file(path, "--json")
