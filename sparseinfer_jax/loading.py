"""`load`: a converted checkpoint, or an HF folder converted in memory -> (model, tokenizer)."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pallas_kernels.pack import pack_sign_bits_reference
from sparseinfer_jax import sharding
from sparseinfer_jax.config import (
    LlamaConfig,
    alpha_per_layer,
    config_from_hf_dict,
    default_alpha,
    is_calibrated,
    predictor_kind,
)
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.mlp import check_mode, set_predictor
from sparseinfer_jax.model import Llama, unstack_layers
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
    mesh: Mesh | None = None,
) -> Llama:
    """Builds a `Llama` around a nested dict of arrays in the checkpoint layout (see DESIGN.md).

    The stacked `layers` subtree of `params` is emptied (moved into the model's per-layer
    arrays). Missing `gate_sign_bits` (checkpoints from before the sparse core) are computed here.
    With a `mesh`, every array is placed per `sharding.model_shardings` (each device receives only
    its slice; arrays already placed that way stay where they are); else on the default device.
    """
    check_mode(cfg, mode, backend)
    if mesh is not None:
        sharding.check_config(cfg, mesh)
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
    mlp = params["layers"]["mlp"]
    if "gate_sign_bits" not in mlp:
        log.info("checkpoint has no gate sign bits; computing them at load time")
        mlp["gate_sign_bits"] = jax.jit(pack_sign_bits_reference)(mlp["gate"])
    layers = cfg.num_hidden_layers
    alpha = default_alpha(layers) if alpha is None else alpha
    mlp["alpha"] = alpha_per_layer(alpha, layers)
    expected = nnx.to_pure_dict(state)
    stacked_shape = lambda a: (layers, *a.shape)  # noqa: E731
    want_shapes = {
        **jax.tree.map(lambda a: a.shape, {k: v for k, v in expected.items() if k != "layers"}),
        "layers": jax.tree.map(stacked_shape, expected["layers"][0]),
    }
    if jax.tree.map(lambda a: a.shape, params) != want_shapes:
        raise UserError(
            "the checkpoint's arrays do not match its config.json "
            "(shapes or names differ); re-convert it with sparseinfer-convert."
        )
    # The model holds one array per layer: move the stacked checkpoint arrays out of `params`
    # (the caller's tree too, so the weights are never held twice), then cast each where it is
    # (numpy on the host, jax.Array on its devices): no gather.
    alphas = mlp.pop("alpha")  # float32 whatever the weights' dtype
    params = {**params, "layers": unstack_layers(params["layers"], layers)}
    params = jax.tree.map(lambda a: a if a.dtype == np.uint32 else a.astype(dtype), params)
    for i in range(layers):
        params["layers"][i]["mlp"]["alpha"] = alphas[i]
    shardings = None if mesh is None else sharding.model_shardings(cfg, mesh)
    nnx.replace_by_pure_dict(state, jax.device_put(params, shardings))
    model = nnx.merge(graphdef, state)
    model.mesh = mesh
    return model


def _auto(mesh: str, cfg: LlamaConfig, dtype) -> Mesh | None:
    if mesh != "auto":
        raise UserError(f"mesh must be a jax Mesh, None or 'auto', got '{mesh}'.")
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    return sharding.auto_mesh(cfg, name if name in DTYPES else "bfloat16")


SHIPPED_MODEL = os.path.join(os.path.dirname(__file__), "models", "tiny-relu-llama")


def load(
    path: str | os.PathLike = SHIPPED_MODEL,
    *,
    dtype=None,
    mode: str = "dense",
    backend: str = "auto",
    alpha=None,
    mesh: Mesh | str | None = "auto",
) -> tuple[Llama, Tokenizer | None]:
    """Loads a model and its tokenizer.

    Args:
      path: a checkpoint written by `sparseinfer-convert`, or a Hugging Face model folder (or hub
        id), converted in memory; default: the small ReLU-Llama shipped with the package.
      dtype: weights' dtype ("bfloat16", "float32"); default: the checkpoint's.
      mode: the decode-step MLP mode: "dense", "sparse" or "oracle".
      backend: sparse kernel backend: "auto", "pallas", "xla" or "reference".
      alpha: per-layer conservativeness override (a number or one per layer); default: the
        checkpoint's calibrated values. A sparse mode on a checkpoint never calibrated (no
        "calibration" marker) calibrates in memory first, with a warning
        (`calibration.calibrate_in_memory`).
      mesh: a `(data, model)` device mesh (`sharding.make_mesh`) to shard the model over; a
        converted checkpoint is read straight into that layout (each device reads its own
        slices), an HF folder is converted on the host and each slice sent to its device.
        None: one device. "auto" (default): one device when the model fits it, else every
        local device on `model` (`sharding.auto_mesh`).
    Returns:
      (model, tokenizer); the tokenizer is None when the folder has no tokenizer files.
    """
    from sparseinfer_jax import checkpoint

    path = os.fspath(path)
    override = alpha is not None
    if checkpoint.is_checkpoint(path):
        hf, block = checkpoint.read_checkpoint_config(path)
        cfg = config_from_hf_dict(hf)
        if isinstance(mesh, str):
            mesh = _auto(mesh, cfg, dtype or block.get("dtype"))
        shardings = None
        if mesh is not None:  # checked before restoring, so a bad mesh fails before any read
            sharding.check_config(cfg, mesh)
            shardings = sharding.param_shardings(cfg, mesh)
        # Cast on read: a cast after restoring would hold two copies of the weights at once.
        params = checkpoint.restore_params(path, shardings=shardings, dtype=_dtype(dtype))
        alpha = block.get("alpha") if alpha is None else alpha
        folder = path
    else:
        from convert import convert_in_memory
        from convert.reader import resolve_source

        folder = resolve_source(path)
        hf, params = convert_in_memory(
            folder, dtype=np.dtype(jnp.dtype(_dtype(dtype) or jnp.bfloat16)).name
        )
        block = hf.get("sparseinfer") or {}  # an HF folder may carry calibrated alphas
        if alpha is None:
            alpha = block.get("alpha")
        cfg = config_from_hf_dict(hf)
        if isinstance(mesh, str):
            mesh = _auto(mesh, cfg, dtype or "bfloat16")
    model = model_from_params(
        cfg, params, dtype=dtype, alpha=alpha, mode=mode, backend=backend, mesh=mesh
    )
    set_predictor(model, predictor_kind(block))
    tokenizer = load_tokenizer(folder)
    if mode == "sparse" and not override and not is_calibrated(block):
        from sparseinfer_jax.calibration import calibrate_in_memory

        calibrate_in_memory(model, tokenizer, path)
    return model, tokenizer
