"""Shared cases and numpy references for the gathered sparse MLP kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.xla.chunk_loop import CHUNK, DENSE_ABOVE

# Relative tolerances by input dtype, applied against max|expected| (sums of D products cancel):
# float32 kernels accumulate in a different order than numpy's float64 (~1e-6 observed);
# bfloat16 outputs (sparse_down) carry bf16 rounding, 2^-8 relative; float16 outputs carry
# float16's, 2^-11 relative (sums in float32).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 1e-3}

CASES = [  # (B, D, F, dtype, activation): D, F not multiples of 32/128, batch 1 and 4
    (1, 70, 45, jnp.float32, "relu"),
    (4, 70, 45, jnp.bfloat16, "fatrelu"),
    (4, 96, 200, jnp.float32, "fatrelu"),
    (1, 96, 200, jnp.bfloat16, "relu"),
]
FATRELU_THRESHOLD = 0.5


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    np.testing.assert_allclose(actual, expected, rtol=tol,
                               atol=tol * max(1.0, float(np.abs(expected).max(initial=0))))


def as_dtype(a: np.ndarray, dtype) -> np.ndarray:
    """`a` rounded to dtype and back to float64, what the kernels actually see."""
    return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)


def weights(b, d, f, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, gate, up, down_t = (as_dtype(rng.standard_normal(s), dtype)
                           for s in [(b, d), (f, d), (f, d), (f, d)])
    return x, gate, up, down_t


def index_list(f: int, count: int, seed: int) -> np.ndarray:
    """idx[:count] distinct ids in random order (kernels must not rely on sorting), 0 after."""
    idx = np.zeros(f, np.int32)
    idx[:count] = np.random.default_rng(seed).permutation(f)[:count]
    return idx


def act_numpy(z, activation):
    return np.where(z > FATRELU_THRESHOLD, z, 0.0) if activation == "fatrelu" else np.maximum(z, 0)


def gate_up_numpy(x, gate, up, idx, count, activation):
    h = act_numpy(x @ gate[idx].T, activation) * (x @ up[idx].T)
    h[:, count:] = 0.0
    return h


def down_numpy(h, down_t, idx, count):
    return h[:, :count] @ down_t[idx[:count]]


def counts_for(f: int) -> list[int]:
    """0, 1, F, both sides of the XLA path's chunk edges and of its dense switch point."""
    chunk, dense = CHUNK, int(DENSE_ABOVE * f)
    edges = {chunk - 1, chunk, chunk + 1, 2 * chunk + 1, dense, dense + 1}
    return sorted({0, 1, f, *(c for c in edges if 0 <= c <= f)})
