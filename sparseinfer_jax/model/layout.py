"""The MLP weights in the layout the sparse path of the device reads, made once at load.

The Pallas TPU kernels fetch one neuron's row at a time by DMA, and a bfloat16 `[F, D]` array in
TPU memory packs two neighbouring rows in each 32-bit word, so a row cannot be fetched alone: the
kernels read bfloat16 weights as `pallas_kernels.tpu.layout.tpu_rows` (`[F, ceil(D/2)]` uint32,
each word two neighbouring columns of one row). Re-laid on every call, that is a full pass over
each MLP weight per decode step (a v5e's compiled sparse program accessed 3.3x the dense one's
bytes). So where the model's sparse MLP runs on the TPU kernels and its weights are bfloat16,
`lay_out` re-lays gate, up and down_t once, in place, and every MLP path reads them as they are:
the kernels, and the dense products of prefill and dense mode (`MLP.hidden`, `MLP.down`). A
sharded array keeps its sharding (the layout changes only the row's width).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels.tpu.layout import tpu_rows


def wants_tpu_rows(model) -> bool:
    """Whether `model`'s sparse MLP runs on the TPU kernels with bfloat16 weights."""
    return (model.config.is_relu_family and pk.choose(model.backend).path == "mosaic"
            and model.dtype == jnp.bfloat16)


def _relaid(w):
    """`tpu_rows(w)` with w's sharding; the old array donated. Abstract in, abstract out (for
    compiling a model's programs from shapes alone)."""
    sharding = getattr(w, "sharding", None)
    if isinstance(w, jax.ShapeDtypeStruct):
        out = jax.eval_shape(tpu_rows, w)
        return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=sharding)
    return jax.jit(tpu_rows, donate_argnums=0, out_shardings=sharding)(w)


def lay_out(model) -> None:
    """Re-lays `model`'s MLP weights for the TPU kernels where they run them (`wants_tpu_rows`),
    one array at a time, each keeping its sharding."""
    if not wants_tpu_rows(model):
        return
    for layer in model.layers:
        for name in ("gate", "up", "down_t"):
            param = getattr(layer.mlp, name)
            if param.value.dtype == jnp.bfloat16:
                param.value = _relaid(param.value)
