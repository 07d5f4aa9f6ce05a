"""matmul.dot against a float32 einsum, and the CPU program it compiles to (no float32 weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparseinfer_jax.model.matmul import dot

# bf16 inputs, float32 accumulation: only the summation order differs from the reference.
TOL = {jnp.bfloat16: 1e-5, jnp.float32: 1e-5}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5)])
@pytest.mark.parametrize("contract", [0, 1])
def test_dot_matches_einsum(dtype, lead, contract):
    k, n = 37, 53
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (*lead, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (k, n) if contract == 0 else (n, k), jnp.float32).astype(dtype)
    out = jax.jit(dot, static_argnums=2)(x, w, contract)
    w32 = w.astype(jnp.float32) if contract == 0 else w.astype(jnp.float32).T
    ref = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w32,
                     precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (*lead, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="about XLA's CPU backend")
@pytest.mark.parametrize("contract", [0, 1])
def test_one_row_bf16_dot_keeps_weights_bf16(contract):
    """A one-row bf16 dot compiles without a float32 copy of the weight matrix."""
    k, n = 96, 160
    shape = (k, n) if contract == 0 else (n, k)
    x = jnp.ones((1, 1, k), jnp.bfloat16)
    w = jnp.ones(shape, jnp.bfloat16)
    text = jax.jit(dot, static_argnums=2).lower(x, w, contract).compile().as_text()
    assert f"f32[{shape[0]},{shape[1]}]" not in text
