"""A converted checkpoint's params/ is a plain orbax checkpoint: the lines the README and
docs/design.md show restore it onto a mesh with orbax alone, and give our arrays."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import read_params

from convert import convert
from sparseinfer_jax.api.loading import SHIPPED_MODEL

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What the test adds after the documented lines: proof that nothing of ours was imported, and what
# was restored.
CHECK = textwrap.dedent("""
    import json, sys
    assert not [m for m in sys.modules if m.split(".")[0] in ("sparseinfer_jax", "convert")]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    print(json.dumps({"devices": [len(gate.addressable_shards), jax.device_count()],
                      "shard": list(gate.addressable_shards[0].data.shape),
                      "sums": {jax.tree_util.keystr(path): float(abs(x.astype("float32")).sum())
                               for path, x in leaves}}))
""")


def documented_lines(doc: str) -> str:
    """The python block of `doc` that imports orbax."""
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / doc).read_text(), re.S)
    found = [b for b in blocks if "import orbax.checkpoint" in b]
    assert len(found) == 1, doc
    return found[0]


def test_the_documented_lines_restore_a_checkpoint_with_orbax_alone(tmp_path):
    lines = documented_lines("README.md")
    assert documented_lines("docs/design.md") == lines
    out = convert(SHIPPED_MODEL, tmp_path / "prosparse-7b")  # the name the lines use
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env.pop("PYTHONPATH", None)  # ours: the lines must not need it
    result = subprocess.run([sys.executable, "-c", lines + "\n" + CHECK], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    params = read_params(out)
    gate = params["layers"][0]["mlp"]["gate"]
    assert found["devices"] == [2, 2]
    assert found["shard"] == [gate.shape[0] // 2, gate.shape[1]]
    want = {"".join(f"['{k}']" for k in path): float(np.abs(x.astype(np.float32)).sum())
            for path, x in _leaves(params)}
    assert found["sums"] == pytest.approx(want, rel=1e-5)  # float32 sums, summed in any order


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value
