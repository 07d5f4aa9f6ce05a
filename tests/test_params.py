"""io/params.py: the chunks orbax stores, the groups the writer hands to its partial save, and a
restore onto shardings, compared with the arrays written."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import params

F32, U32 = np.dtype(np.float32), np.dtype(np.uint32)
# shape, dtype, the chunk shape `chunk_bytes` promises
CASES = {
    ("mlp", "gate"): ((4096, 1024), F32, (512, 1024)),  # tall: row blocks only, 8 of them
    ("mlp", "gate_sign_bits"): ((11008, 128), U32, (2752, 128)),  # 5.5 MiB: 4 row blocks
    ("attn", "q"): ((1024, 1024), F32, (512, 512)),  # square: 4 chunks of 1 MiB, both axes
    ("attn", "k"): ((256, 1024), F32, (256, 1024)),  # 1 MiB: one chunk
    ("norm",): ((1024,), F32, (1024,)),
}


def random(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if dtype == U32:
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    return rng.standard_normal(shape, dtype=np.float32)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("params") / "params")
    arrays = {p: random(shape, dtype, i) for i, (p, (shape, dtype, _)) in enumerate(CASES.items())}
    with params.Writer(folder) as writer:
        for p, x in arrays.items():
            writer.add(p, x)
        writer.finish()
    return folder, arrays


def test_chunks_are_the_promised_ones(written):
    folder, _ = written
    meta = params.flatten(params.ocp.metadata(folder).metadata)
    for p, (shape, dtype, chunk) in CASES.items():
        assert meta[p].shape == shape
        assert tuple(meta[p].storage_metadata.chunk_shape) == chunk, p
        size = params.chunk_bytes(shape, dtype.itemsize)
        assert math.prod(chunk) * dtype.itemsize == (size or math.prod(shape) * dtype.itemsize)


def test_restore_onto_shardings_and_as_saved(written):
    folder, arrays = written
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
                for p, x in arrays.items()}
    for got in (params.restore(folder, abstract, error=UserError),
                params.restore(folder, None, error=UserError)):
        assert set(got) == set(arrays)
        for p, x in arrays.items():
            np.testing.assert_array_equal(np.asarray(got[p]), x)


def test_groups_stay_within_group_bytes(tmp_path, monkeypatch):
    groups = []
    save_async = params.ocp.partial.save_async

    def counting(path, tree, **kwargs):
        groups.append(params.flatten(tree))
        return save_async(path, tree, **kwargs)

    monkeypatch.setattr(params.ocp.partial, "save_async", counting)
    monkeypatch.setattr(params, "GROUP_BYTES", 5 * 2**20)
    sizes = [4, 2, 2, 8, 1, 1]  # MiB
    arrays = {("layers", i): np.full(s * 2**18, i, np.float32) for i, s in enumerate(sizes)}
    with params.Writer(str(tmp_path / "params")) as writer:
        for p, x in arrays.items():
            writer.add(p, x)
        writer.finish()
    assert [sorted(p[1] for p in g) for g in groups] == [[0], [1, 2], [3], [4, 5]]
    got = params.restore(str(tmp_path / "params"), None, error=UserError)
    assert all(np.array_equal(got[p], x) for p, x in arrays.items())
