"""Weight quantisation in the model: which arrays are int8, where their scales live, and the
one matmul every quantised weight goes through.

int8 (`--quantize int8`): every linear weight (q, k, v, o, gate, up, down_t and an untied LM
head) is stored as int8 with one float32 scale per stored row (`pallas_kernels/quant.py`), at
the weight's path plus `_scale` (`layers/3/mlp/gate` [F, D] int8 and `layers/3/mlp/gate_scale`
[F] float32; `layers/3/self_attn/q_proj/weight_scale` [H*hd]). The embeddings and norms stay in
the compute dtype, and the gate sign bits come from the unquantised gate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import quant as pq
from sparseinfer_jax.errors import UserError

SCHEMES = pq.SCHEMES
SCALE_SUFFIX = "_scale"
# The last key of every quantised weight's path, and for a `Linear` the module holding it.
MLP_WEIGHTS = ("gate", "up", "down_t")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head")

Path = tuple


def check(quantize: str | None) -> str | None:
    """`quantize` itself; UserError unless it is None or one of SCHEMES."""
    if quantize is not None and quantize not in SCHEMES:
        raise UserError(f"--quantize must be one of {', '.join(SCHEMES)}, got '{quantize}'.")
    return quantize


def is_quantized(path: Path) -> bool:
    """Whether the params path is a weight int8 quantisation stores as int8."""
    return path[-1] in MLP_WEIGHTS or (path[-1] == "weight" and len(path) > 1
                                       and path[-2] in LINEARS)


def scale_path(path: Path) -> Path:
    """The path of a quantised weight's row scales."""
    return (*path[:-1], path[-1] + SCALE_SUFFIX)


def is_scale(path: Path) -> bool:
    return path[-1].endswith(SCALE_SUFFIX) if isinstance(path[-1], str) else False


def quantize_leaves(leaves: Iterable[tuple[Path, Any]]) -> Iterator[tuple[Path, Any]]:
    """`(path, array)` pairs with each weight `is_quantized` names replaced by its int8 rows and
    followed by its scales, one array at a time (the float array is dropped before the next)."""
    for path, x in leaves:
        if is_quantized(path):
            q, s = pq.quantize_rows_numpy(np.asarray(x))
            del x
            yield path, q
            yield scale_path(path), s
        else:
            yield path, x


def layout(order: Iterable[tuple[Path, tuple[int, ...], Any]]
           ) -> Iterator[tuple[Path, tuple[int, ...], Any]]:
    """`names.out_order`'s rows for a quantised checkpoint: each quantised weight followed by its
    scales' row (shape `[rows]`, target None)."""
    for path, shape, target in order:
        yield path, shape, target
        if is_quantized(path):
            yield scale_path(path), shape[:1], None


def quantized_param(w: jnp.ndarray, quantize: str | None):
    """A freshly drawn weight `w: [R, C]` as model params: `(nnx.Param(w), None)`, or for "int8"
    `(nnx.Param(q), nnx.Param(scale))`."""
    if quantize is None:
        return nnx.Param(w), None
    q, scale = pq.quantize_rows(w)
    return nnx.Param(q), nnx.Param(scale)


def dot(x: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray | None, contract: int) -> jnp.ndarray:
    """`pallas_kernels.quant.float_dot` for a float weight (`scale` None), else the int8 product
    with per-row scales (`pallas_kernels.quant.dot`): `x: [..., K]` -> `[..., N]` float32."""
    if scale is None:
        return pq.float_dot(x, w, contract)
    rows = x.reshape(-1, x.shape[-1])
    y = pq.dot(rows, w, scale, contract)
    return y.reshape(*x.shape[:-1], y.shape[-1])
