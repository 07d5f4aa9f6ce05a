"""`load`: a converted checkpoint, or an HF folder converted in memory -> (model, tokenizer)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.pack import pack_sign_bits_reference
from sparseinfer_jax.config import LlamaConfig, alpha_per_layer, config_from_hf_dict, default_alpha
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.mlp import check_mode
from sparseinfer_jax.model import Llama
from sparseinfer_jax.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def _dtype(name) -> jnp.dtype:
    if name is None or not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got '{name}'.")
    return DTYPES[name]


def model_from_params(
    cfg: LlamaConfig,
    params: dict[str, Any],
    *,
    dtype=None,
    alpha=None,
    mode: str = "dense",
    backend: str = "auto",
) -> Llama:
    """Builds a `Llama` around a nested dict of arrays in the checkpoint layout (see DESIGN.md).

    Missing `gate_sign_bits` (checkpoints from before the sparse core) are computed here.
    """
    check_mode(cfg, mode, backend)
    if not cfg.is_relu_family:
        log.warning(
            "hidden_act is '%s': SparseInfer needs relu or fatrelu, so this model runs dense only.",
            cfg.hidden_act,
        )
    dtype = _dtype(dtype) or params["embed_tokens"]["embedding"].dtype
    abstract = nnx.eval_shape(
        lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), mode=mode, backend=backend)
    )
    graphdef, state = nnx.split(abstract)
    params = jax.tree.map(
        lambda a: jnp.asarray(a) if a.dtype == np.uint32 else jnp.asarray(a, dtype), params
    )
    mlp = params["layers"]["mlp"]
    if "gate_sign_bits" not in mlp:
        log.info("checkpoint has no gate sign bits; computing them at load time")
        mlp["gate_sign_bits"] = jax.jit(pack_sign_bits_reference)(mlp["gate"])
    layers = cfg.num_hidden_layers
    alpha = default_alpha(layers) if alpha is None else alpha
    params["layers"]["mlp"]["alpha"] = jnp.asarray(alpha_per_layer(alpha, layers))
    expected = nnx.to_pure_dict(state)
    got_shapes = jax.tree.map(lambda a: a.shape, params)
    want_shapes = jax.tree.map(lambda a: a.shape, expected)
    if got_shapes != want_shapes:
        raise UserError(
            "the checkpoint's arrays do not match its config.json "
            "(shapes or names differ); re-convert it with sparseinfer-convert."
        )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), "models", "tiny-relu-llama")


def load(
    path: str | os.PathLike = SHIPPED_MODEL,
    *,
    dtype=None,
    mode: str = "dense",
    backend: str = "auto",
    alpha=None,
) -> tuple[Llama, Tokenizer | None]:
    """Loads a model and its tokenizer.

    Args:
      path: a checkpoint written by `sparseinfer-convert`, or a Hugging Face model folder (or hub
        id), converted in memory; default: the small ReLU-Llama shipped with the package.
      dtype: weights' dtype ("bfloat16", "float32"); default: the checkpoint's.
      mode: the decode-step MLP mode: "dense", "sparse" or "oracle".
      backend: sparse kernel backend: "auto", "pallas", "xla" or "reference".
      alpha: per-layer conservativeness override (a number or one per layer); default: the
        checkpoint's calibrated values.
    Returns:
      (model, tokenizer); the tokenizer is None when the folder has no tokenizer files.
    """
    from sparseinfer_jax import checkpoint

    path = os.fspath(path)
    if checkpoint.is_checkpoint(path):
        hf, block = checkpoint.read_checkpoint_config(path)
        params = checkpoint.restore_params(path)
        alpha = block.get("alpha") if alpha is None else alpha
        folder = path
    else:
        from convert import convert_in_memory
        from convert.reader import resolve_source

        folder = resolve_source(path)
        hf, params = convert_in_memory(
            folder, dtype=np.dtype(jnp.dtype(_dtype(dtype) or jnp.bfloat16)).name
        )
        if alpha is None:  # an HF folder may carry calibrated alphas in the same block
            alpha = (hf.get("sparseinfer") or {}).get("alpha")
    cfg = config_from_hf_dict(hf)
    model = model_from_params(cfg, params, dtype=dtype, alpha=alpha, mode=mode, backend=backend)
    return model, load_tokenizer(folder)
