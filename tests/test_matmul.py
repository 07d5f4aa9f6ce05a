"""quant.float_dot against a float32 einsum, and the programs it compiles to (no f32 weights)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend as bk
from pallas_kernels.quant import GPU_GEMV_MIN_ELEMS
from pallas_kernels.quant import float_dot as dot
from sparseinfer_jax.bench.loop_ops import decode_loop_ops

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


# One float16 rounding of the float32 sum (2^-11 relative), and the order of summation.
F16_ROUNDING = 2.0**-11


@pytest.mark.parametrize("contract", [0, 1])
def test_t4_one_row_float16_dot_is_the_float32_sum_rounded_once(contract):
    """Built for a T4 (sm_75) a one-row float16 dot with a weight cuBLAS takes has a float16
    result (run here on the CPU: the semantics, not cuBLAS): within one float16 rounding of the
    float32 sum."""
    k = 4096
    n = -(-GPU_GEMV_MIN_ELEMS // k)  # a weight as large as cuBLAS takes
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (1, 1, k), jnp.float32).astype(jnp.float16)
    w = jax.random.normal(kw, (k, n) if contract == 0 else (n, k), jnp.float32).astype(jnp.float16)
    w32 = w.astype(jnp.float32) if contract == 0 else w.astype(jnp.float32).T
    ref = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w32,
                     precision=jax.lax.Precision.HIGHEST)
    with bk.targeting_gpu(compute_capability=(7, 5)):
        out = jax.jit(dot, static_argnums=2)(x, w, contract)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=F16_ROUNDING, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(out, out.astype(jnp.float16).astype(jnp.float32))


def gpu_loop(gpu: str, batch: int, n: int, weights: int) -> str:
    """The optimised HLO of a loop whose step multiplies `[batch, 4096]` float16 rows by
    `weights` float16 weights `[n, 4096]^T` (each step's input taken from the last output),
    compiled for `gpu`'s spec at the default matmul precision a user runs with (conftest sets
    "highest" for the CPU)."""
    pytest.importorskip("jax_plugins", reason="the CUDA plugin compiles for GPUs")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sparseinfer_jax.bench.gpu_spec import gpu_spec
    from sparseinfer_jax.bench.toolchain import mesh_for

    def steps(x, *ws):
        step = lambda i, x: sum(dot(x, w, 1)[:, :4096] for w in ws).astype(x.dtype)  # noqa: E731
        return jax.lax.fori_loop(0, 4, step, x)

    spec = gpu_spec(gpu)
    mesh = mesh_for(spec)
    sds = lambda s: jax.ShapeDtypeStruct(s, jnp.float16,  # noqa: E731
                                         sharding=NamedSharding(mesh, P()))
    with (bk.targeting_gpu(mesh.abstract_mesh, compute_capability=spec.compute_capability),
          jax.default_matmul_precision("default")):
        return jax.jit(steps).trace(sds((batch, 4096)), *[sds((n, 4096))] * weights).lower(
        ).compile().as_text()


@pytest.mark.parametrize("gpu, batch, n, weights", [
    ("t4", 1, 11008, 1),  # a one-row float32 result made a float32 copy of the weight
    ("t4", 16, 11008, 1),
    ("t4", 16, 4096, 3),  # q, k and v: XLA's dot merger concatenated them every step
    ("l4", 1, 11008, 1),
])
def test_gpu_float16_dots_read_the_weights_as_they_are(gpu, batch, n, weights):
    """No op in the loop copies a float16 weight, compiled for a T4 or an L4; on the T4 cuBLAS
    reads the float16 weights."""
    text = gpu_loop(gpu, batch, n, weights)
    assert decode_loop_ops(text, weight_bytes=n * 4096 * 2, row_elems=4096) == []
    if gpu == "t4":
        assert re.search(r'custom-call\(%[\w.\-]+, %[\w.\-]+\), custom_call_target="__cublas', text)
