"""The sign-bit predictors as a Pallas TPU (Mosaic) kernel: per neuron, the batch rows that keep it.

Both predictors count weighted negative votes from the packed sign bits of W_gate (`predict.py`,
`signmag.py`): for row b and neuron i,

    n_neg(b, i) = sum_p 2^p popcount((sign(W_i) XOR sign(x_b)) AND mask_p(x_b))

with one mask for the sign vote (the non-zero words of x: zero inputs never vote) and the
magnitude bit planes for signmag. Row b keeps neuron i iff `n_neg <= tau(b)`, tau from
`predict.threshold` on the row's vote total. The x side (words, masks, tau) is a few `[B, W]`
arrays made in jnp; the kernel reads the `[F, W]` sign bits once.

Layout. A program takes `block_f` neurons: its `[block_f, W]` block of sign bits (the grid
pipeline double-buffers it) is transposed once in VMEM to `[W, block_f]`, so every row's votes
reduce over sublanes and land lane-dense as one `[1, block_f]` int32 row. The other way round
(reducing over the W lanes) costs a cross-lane reduction per 8 neurons per batch row, and leaves
the counts down a column. The x words come in as columns `[W, B]` and each batch row is a static
slice broadcast along the lanes; the batch is unrolled (decoding batches are small and static).

Output: `kept: [F] int32`, the number of rows that predict each neuron active. The union over
the batch is `kept > 0`; the op's "predicted" count is `sum(kept)`.

References the tests compare against: `pallas_kernels.predict.sign_predict_reference` and
`pallas_kernels.signmag.signmag_reference` (unpacked bits, integer matmuls).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import pltpu
from pallas_kernels.pack import pack_nonzero_bits, pack_sign_bits
from pallas_kernels.predict import threshold
from pallas_kernels.signmag import PLANES, x_words
from pallas_kernels.tpu.common import interpret_mode

PREDICTORS = ("sign", "signmag")
# 512 neurons a program: a 256 KiB block of sign bits at W = 128 (the 7b shape), 22 programs at
# F = 11008. A multiple of 128 (the output block's lanes).
BLOCK_F = 512


def votes_kernel(tau_ref, w_ref, xs_ref, xm_ref, kept_ref):
    """One program: neurons [i * block_f, (i + 1) * block_f).

    Refs: tau_ref `[B]` int32 (SMEM, scalar prefetch); w_ref `[block_f, W]` int32 sign bits;
    xs_ref `[W, B]` int32 sign words of x; xm_ref `[P, W, B]` int32 vote masks (plane p weighs
    2^p). Output kept_ref `[1, block_f]` int32.
    """
    wt = w_ref[...].T  # [W, block_f]
    planes, _, b = xm_ref.shape
    kept = jnp.zeros(kept_ref.shape, jnp.int32)
    for r in range(b):
        differ = wt ^ xs_ref[:, r:r + 1]
        n_neg = jnp.zeros(kept_ref.shape, jnp.int32)
        for p in range(planes):
            votes = lax.population_count(differ & xm_ref[p, :, r:r + 1])
            n_neg = n_neg + (jnp.sum(votes, axis=0, keepdims=True) << p)
        kept = kept + (n_neg <= tau_ref[r]).astype(jnp.int32)
    kept_ref[...] = kept


def vote_inputs(x: jnp.ndarray, alpha: jnp.ndarray, predictor: str):
    """The x side: sign words `[B, W]`, masks `[B, P, W]` (uint32) and each row's tau `[B]`."""
    if predictor == "signmag":
        xs, masks, total = x_words(x, PLANES)
        return xs, masks, threshold(alpha, total)
    n_nz = jnp.sum(x != 0, axis=-1, dtype=jnp.int32)
    return (pack_sign_bits(x), pack_nonzero_bits(x)[:, None],
            threshold(alpha, n_nz))


@functools.partial(jax.jit, static_argnames=["predictor", "block_f", "interpret"])
def tpu_votes(x: jnp.ndarray, w_bits: jnp.ndarray, alpha: jnp.ndarray, *, predictor: str = "sign",
              block_f: int = BLOCK_F, interpret=False) -> jnp.ndarray:
    """Rows of `x: [B, D]` that predict each neuron active: `[F]` int32 (Mosaic kernel).

    Args:
      x: `[B, D]` float MLP input.
      w_bits: `[F, ceil(D/32)]` uint32 packed sign bits of W_gate (`pack.py`).
      alpha: `[]` float32 conservativeness (data).
      predictor: "sign" or "signmag" (static).
      block_f: neurons a program (a multiple of 128; F itself when F is smaller).
      interpret: False to compile for a TPU; True or a `pltpu.InterpretParams` to interpret.
    """
    assert predictor in PREDICTORS, predictor
    assert block_f % 128 == 0, "block_f: a multiple of 128"
    f, w = w_bits.shape
    xs, masks, tau = vote_inputs(x, alpha, predictor)
    as_i32 = lambda a: lax.bitcast_convert_type(a, jnp.int32)  # noqa: E731
    xs_cols, mask_cols = as_i32(xs.T), as_i32(jnp.transpose(masks, (1, 2, 0)))
    block_f = f if f <= block_f else block_f
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(pl.cdiv(f, block_f),),
        in_specs=[pl.BlockSpec((block_f, w), lambda i, tau: (i, 0)),
                  pl.BlockSpec(xs_cols.shape, lambda i, tau: (0, 0)),
                  pl.BlockSpec(mask_cols.shape, lambda i, tau: (0, 0, 0))],
        out_specs=pl.BlockSpec((1, block_f), lambda i, tau: (0, i)),
    )
    kept = pl.pallas_call(
        votes_kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((1, f), jnp.int32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret_mode(interpret),
        name=f"{predictor}_votes",
    )(tau, as_i32(w_bits), xs_cols, mask_cols)
    return kept[0]
