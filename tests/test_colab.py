"""The Colab notebook runs top to bottom on CPU against the shipped model, downloads off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest

from sparseinfer_jax.api.loading import SHIPPED_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "sparseinfer_jax.ipynb")
FIGURES = ("layer_sparsity.png", "alpha_sweep.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_TIMEOUT_S = 300


def test_committed_notebook_is_stripped_and_built_from_the_script():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == 7  # the seven steps
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    script = os.path.join(ROOT, "colab", "build_notebook.py")
    check = subprocess.run([sys.executable, script, "--check"], capture_output=True)
    assert check.returncode == 0, "the notebook differs from colab/build_notebook.py; rebuild it"


@pytest.mark.slow
def test_notebook_runs_on_the_shipped_model(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    out = tmp_path / "out"
    env = {
        "SPARSEINFER_MODEL": SHIPPED_MODEL,
        "SPARSEINFER_SKIP_INSTALL": "1",
        "SPARSEINFER_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        # Headless, and still renders figures into the cells' outputs (Agg would drop them).
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "JAX_PLATFORMS": "cpu",
        # The kernel imports the package from this checkout, whatever is installed.
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, naming the cell, on any error.
    client = NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # to read when a cell fails

    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == len(FIGURES)
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "sparse/dense decode speed" in text and "greedy next token" in text
    assert (out / "checkpoints" / "tiny-relu-llama" / "config.json").is_file()


def test_first_cell_says_where_sparse_runs_and_refuses_a_model_too_big_before_downloading(
        tmp_path):
    """The first code cell alone, on this CPU, with a 13B-shaped folder (config.json only: a
    download would fail): it names the runtime, the path and dtype sparse mode takes, and that
    the model does not fit, then falls back to the shipped model."""
    from sparseinfer_jax.bench.shapes import shape_config

    big = tmp_path / "llama-13b"
    big.mkdir()
    cfg = shape_config("13b").to_hf_dict()
    (big / "config.json").write_text(json.dumps(cfg))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code").source
    env = {**os.environ, "SPARSEINFER_MODEL": str(big), "SPARSEINFER_SKIP_INSTALL": "1",
           "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=CELL_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("runtime: cpu"), lines
    assert lines[1].startswith("sparse mode: CPU: sparse MLP runs the XLA chunk loop"), lines
    assert "weights in bfloat16" in lines[1]
    assert "running the shipped small model instead" in lines[2], lines
    assert not (tmp_path / "sparseinfer_out").exists()  # nothing converted, nothing written
