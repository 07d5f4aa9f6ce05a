"""The sparse MLP layer on a CUDA GPU: two Triton kernels per layer and decode step.

`predict_gate_up` (the vote, the gate rows of the predicted and the up rows of the fired, h in
natural order) then `masked_down` (down over the rows where h != 0), with no compaction and no
id list between them. With `union_axis`, or the "oracle" predictor, the active mask is computed
first (the predictor's own kernel, or XLA's dense gate), OR-ed over the axis, and read by
`predict_gate_up` instead of its vote. The reference the tests compare it with:
`pallas_kernels.layer.layer_reference`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from pallas_kernels import backend as bk
from pallas_kernels import contract
from pallas_kernels.gpu.masked_down import masked_down_pallas
from pallas_kernels.gpu.predict import sign_predict_pallas
from pallas_kernels.gpu.predict_gate_up import predict_gate_up_pallas
from pallas_kernels.gpu.signmag import signmag_pallas

# How the down kernel adds its row blocks (`masked_down.ACCUMULATE`).
ACCUMULATE = "partials"


def layer_pallas(x, gate, up, down_t, gate_sign_bits, alpha, *, predictor: str, activation: str,
                 threshold: float, union_axis=None, accumulate: str = ACCUMULATE,
                 interpret: bool | None = None, **blocks):
    """`predict_gate_up` then `masked_down` (Triton; interpret mode off a GPU).

    `blocks` go to `predict_gate_up_pallas` (prefix `up_`: block_f, slots, tile, num_warps) and
    `masked_down_pallas` (prefix `down_`: block_r, block_d, slots, tile, num_warps): for timing
    launch shapes (`benchmarks/gpu_variants.py`).
    """
    interpret = bk.interpret() if interpret is None else interpret
    up_blocks = {k[3:]: v for k, v in blocks.items() if k.startswith("up_")}
    down_blocks = {k[5:]: v for k, v in blocks.items() if k.startswith("down_")}
    assert len(up_blocks) + len(down_blocks) == len(blocks), blocks
    kind = dict(activation=activation, threshold=threshold, zero_out=accumulate == "atomic",
                interpret=interpret, **up_blocks)
    if predictor == "oracle" or union_axis is not None:
        per_row = contract.row_masks(
            x, gate, gate_sign_bits, alpha, predictor=predictor, activation=activation,
            threshold_value=threshold,
            votes=contract.votes_of(functools.partial(sign_predict_pallas, interpret=interpret),
                                    functools.partial(signmag_pallas, interpret=interpret)))
        active = contract.union(jnp.any(per_row, axis=0), union_axis)
        h, flags, _, *acc = predict_gate_up_pallas(x, gate, up, mask=active, vote="mask", **kind)
        predicted = contract.total(jnp.sum(per_row, dtype=jnp.int32), union_axis)
    else:
        h, flags, partial, *acc = predict_gate_up_pallas(x, gate, up, alpha=alpha,
                                                         bits=gate_sign_bits, vote=predictor,
                                                         **kind)
        predicted = jnp.sum(partial)
    out = masked_down_pallas(h, down_t, *acc, accumulate=accumulate, interpret=interpret,
                             **down_blocks)
    computed, fired = (flags & 1) != 0, contract.union((flags & 2) != 0, union_axis)
    return out, contract.counts(predicted, computed, fired)
