"""Two processes, one job: `jax.distributed.initialize` on this machine gives the single-process
tokens.

Three children run this file as a script, in parallel: two form a job (coordinator on localhost on
a free port, gloo CPU collectives, 2 CPU devices each, so 4 in the job) and one runs alone as the
reference. Each runs the same `sparseinfer generate` command on the shipped model (the job's with
`--distributed --mesh data=2,model=2`: one replica per process, the batch split over them), then
the Python API with dense and sparse decoding (the job's over `data=1,model=4`: every layer's
neurons split over both processes, a gloo psum per layer), and `sparseinfer eval --distributed`
over that mesh, and prints the API's tokens and eval's output as JSON.
A second test loads a converted checkpoint the same way (2 processes x 2 devices, `model=4`) and
counts the bytes each process reads from disk (/proc/self/io rchar, every read() and pread()):
orbax restores only the chunks of a process's own slices, so each reads about half.
float32 weights: the split sums differ from one device only in summation order, far below what
could change a greedy token. All children compile with JAX_DISABLE_MOST_OPTIMIZATIONS, so they
compare like with like (compiling is most of their time).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_hf_checkpoint

PROMPTS = ("Once upon a time", "The capital of France is")
NEW_TOKENS = 8
CLI = ["generate", "--dtype", "float32", "--mode", "sparse", "--max-new-tokens", str(NEW_TOKENS)]
MARK = "FOUND "


def _child(role: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from sparseinfer_jax import generate, load
    from sparseinfer_jax.api.loading import SHIPPED_MODEL
    from sparseinfer_jax.cli.main import main
    from sparseinfer_jax.model.sharding import make_mesh

    job = role == "job"
    argv = [*CLI, *(a for p in PROMPTS for a in ("--prompt", p))]
    eval_argv = ["eval", "--dtype", "float32", "--modes", "dense", "--window", "32",
                 "--max-tokens", "64", "--text", os.path.join(SHIPPED_MODEL, "validation.txt")]
    if job:
        argv += ["--distributed", "--distributed-timeout", "60", "--mesh", "data=2,model=2"]
        eval_argv += ["--distributed", "--mesh", "data=1,model=4"]
    printed = {}
    for name, command in (("generate", argv), ("eval", eval_argv)):
        out = io.StringIO()  # not fd 1, where gloo's C++ code writes its own lines
        with contextlib.redirect_stdout(out):
            assert main(command) == 0
        printed[name] = out.getvalue()
    model, tokenizer = load(dtype="float32", mesh=make_mesh(1, 4) if job else None)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    tokens = {
        mode: generate(model, ids, max_new_tokens=NEW_TOKENS, mode=mode, timing=False)
        .tokens.tolist()
        for mode in ("dense", "sparse")
    }
    found = {"process": jax.process_index(), "tokens": tokens, **printed}
    print(MARK + json.dumps(found), flush=True)


# Wide enough that every 2-D array is stored in several chunks (io/params.py: at least 1 MiB each).
READ_MODEL = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=True)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def _read_child(role: str, ckpt: str) -> None:
    """Loads `ckpt` (alone on one device, or in the job over `model=4`) and prints the bytes it
    read and two sums of its logits."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import jax.numpy as jnp

    from sparseinfer_jax import load
    from sparseinfer_jax.io import checkpoint  # noqa: F401  (orbax too: imported before counting)
    from sparseinfer_jax.model.sharding import make_mesh
    from sparseinfer_jax.runtime.distributed import initialize_distributed

    job = role == "read-job"
    if job:
        initialize_distributed(60)
    before = _rchar()
    model, _ = load(ckpt, mesh=make_mesh(1, 4) if job else None)
    read = _rchar() - before
    logits = model(jnp.arange(3, 19)[None])
    sums = [float(jnp.sum(logits)), float(jnp.sum(logits * logits))]
    print(MARK + json.dumps({"read": read, "sums": sums}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(role: str, *args: str, **env: str) -> subprocess.Popen:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        SPARSEINFER_COMPILE_CACHE="off",  # every child compiles: nothing read half-written
        **env,
    )
    return subprocess.Popen(
        [sys.executable, __file__, role, *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def _found(stdout: str) -> dict:
    """The child's JSON line (gloo's C++ code writes its own lines to the same stdout)."""
    api = [json.loads(ln[len(MARK):]) for ln in stdout.splitlines() if ln.startswith(MARK)]
    assert len(api) == 1, stdout
    return api[0]


def _perplexity(printed: str) -> float:
    return float(printed.split("[dense] perplexity ")[1].split()[0])


def _run(role: str, *args: str) -> dict[str, tuple[dict, str]]:
    """Runs `role` alone and as a job of 2 processes, in parallel; their JSON and stderr."""
    coordinator = f"127.0.0.1:{_free_port()}"
    children = {
        "alone": _start(role, *args),
        **{
            f"process {i}": _start(
                role + "-job" if args else "job",
                *args,
                JAX_COORDINATOR_ADDRESS=coordinator,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            )
            for i in (0, 1)
        },
    }
    found = {}
    try:
        for name, child in children.items():
            out, err = child.communicate(timeout=300)
            assert child.returncode == 0, f"{name} failed:\n{err[-3000:]}"
            found[name] = (_found(out), err)
    finally:  # one failed or hung: do not leave the others waiting for it
        for child in children.values():
            if child.poll() is None:
                child.kill()
    return found


def test_two_processes_give_the_single_process_tokens():
    found = _run("alone")
    alone, first, other = (found[k][0] for k in ("alone", "process 0", "process 1"))
    alone_text = alone["generate"].splitlines()
    assert len(alone_text) == len(PROMPTS) and alone_text[0].startswith(PROMPTS[0])
    assert first["generate"] == alone["generate"]  # process 0 prints the single-process text
    assert other["generate"] == other["eval"] == ""  # the others stay quiet
    assert "tokens/s" in found["process 0"][1] and "tokens/s" not in found["process 1"][1]
    assert "[dense] perplexity" in alone["eval"]
    assert _perplexity(first["eval"]) == pytest.approx(_perplexity(alone["eval"]), rel=1e-4)
    assert (first["process"], other["process"]) == (0, 1)
    for mode in ("dense", "sparse"):
        assert len(alone["tokens"][mode]) == len(PROMPTS)
        assert first["tokens"][mode] == alone["tokens"][mode], mode
        assert other["tokens"][mode] == alone["tokens"][mode], mode


def test_each_process_reads_only_its_share_of_a_checkpoint(tmp_path):
    from convert import convert
    from sparseinfer_jax.io import checkpoint, params

    hf = make_hf_checkpoint(str(tmp_path / "hf"), **READ_MODEL)
    ckpt = convert(hf, tmp_path / "ckpt", dtype="float32", calibrate=False)
    stored = params.stored(os.path.join(ckpt, checkpoint.PARAMS_DIR), error=AssertionError)
    weights = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in stored.values())
    found = {name: got for name, (got, _) in _run("read", ckpt).items()}
    alone = found.pop("alone")
    assert weights <= alone["read"] <= 1.05 * weights  # rchar sees orbax's reads: all of them
    for name, got in found.items():
        # Each process holds half of every split array (and all of the replicated norms).
        assert 0.45 * weights <= got["read"] <= 0.6 * weights, (name, got["read"] / weights)
        assert got["sums"] == pytest.approx(alone["sums"], rel=1e-4), name


if __name__ == "__main__":
    if sys.argv[1].startswith("read"):
        _read_child(*sys.argv[1:])
    else:
        _child(sys.argv[1])
