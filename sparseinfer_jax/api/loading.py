"""`load`: a converted checkpoint, or an HF folder converted on the fly -> (model, tokenizer).

A checkpoint's arrays are restored by orbax straight into their shardings (io/params.py): each
process reads only the chunks of its own devices' slices, cast to the requested dtype, with a
bounded amount in flight. An HF folder's arrays are streamed: each one is converted from its HF
tensor and put on its device(s) before the next is read. Either way the host holds little beyond
what the devices hold; on the CPU the "device" is host memory, so loading needs the model's bytes
plus a few hundred MB (benchmarks/scale.py measures it).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pallas_kernels.pack import pack_sign_bits_numpy
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io import names
from sparseinfer_jax.io.tokenizer import Tokenizer, load_tokenizer
from sparseinfer_jax.model import dtypes, layout, quant, sharding
from sparseinfer_jax.model.config import (
    LlamaConfig,
    alpha_per_layer,
    config_from_hf_dict,
    default_alpha,
)
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.model.mlp import check_mode, set_predictor

log = logging.getLogger(__name__)
Path = tuple  # a params path: ("layers", 3, "mlp", "gate")


def _dtype(name) -> np.dtype | None:
    """The dtype `load` was given (a name or a dtype), one a model runs in; None for none."""
    if name is None or isinstance(name, str):
        return None if name is None else dtypes.lookup(name)
    try:
        dtype = np.dtype(jnp.dtype(name))
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or dtype not in dtypes.DTYPES.values():
        shown = getattr(name, "__name__", None) or repr(name)  # jnp.int8 as "int8"
        raise UserError(f"dtype must be one of {', '.join(dtypes.DTYPES)}, got {shown}.")
    return dtype


def _flat(tree: dict[Any, Any], prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _put(x: Any, target: jax.sharding.Sharding | None) -> jax.Array:
    """One array onto its device(s): each device gets only its slice (its own process's devices
    only, so this works over several processes too). An array already placed there is kept."""
    if isinstance(x, jax.Array) and (target is None or x.sharding == target):
        return x
    if target is None:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def assemble(
    cfg: LlamaConfig,
    leaves: Iterable[tuple[Path, Any]],
    *,
    dtype,
    alpha=None,
    mode: str = "dense",
    backend: str = "auto",
    mesh: Mesh | None = None,
    source: str = "the parameters",
    remedy: str = "re-convert the model with sparseinfer-convert",
    quantize: str | None = None,
) -> Llama:
    """Builds a `Llama` from `(params path, array)` pairs in the model's per-layer layout.

    Each array is checked against the model's shape, cast to `dtype` (floats only; the packed
    sign bits stay uint32; no copy when already in `dtype`) and placed before the next is taken,
    with `mesh` per `sharding.model_shardings`, else on the default device. With `quantize`
    ("int8") the model's linear weights are int8 with per-row scales: float ones among the
    leaves are quantised as they come (`quant.quantize_leaves`), int8 ones taken as they are.
    Where the sparse MLP runs on the TPU kernels, bfloat16 MLP weights are then laid out for them
    (`layout.lay_out`). Errors name `source` and end with `remedy`.
    """
    check_mode(cfg, mode, backend)
    if quantize is not None:
        leaves = quant.quantize_leaves(leaves)
    if mesh is not None:
        sharding.check_config(cfg, mesh)
    if not cfg.is_relu_family:
        warnings.warn(f"hidden_act is '{cfg.hidden_act}': SparseInfer needs relu or fatrelu, so "
                      "this model runs dense only.", RuntimeWarning, stacklevel=2)
    abstract = nnx.eval_shape(
        lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), mode=mode, backend=backend,
                      quantize=quantize)
    )
    graphdef, state = nnx.split(abstract)
    expected = {p: a for p, a in _flat(nnx.to_pure_dict(state)).items() if p[-1] != "alpha"}
    targets = None if mesh is None else _flat(sharding.model_shardings(cfg, mesh))
    placed: dict[Path, jax.Array] = {}
    for path, x in leaves:
        want = expected.get(path)
        name = ".".join(str(k) for k in path)
        if want is None or tuple(x.shape) != tuple(want.shape):
            what = "an unexpected tensor" if want is None else f"tensor of shape {list(x.shape)}"
            raise UserError(f"{source} has {what} '{name}' that its config.json does not imply; "
                            f"{remedy}.")
        if jnp.issubdtype(want.dtype, jnp.floating) and x.dtype != want.dtype:
            x = x.astype(want.dtype)
        placed[path] = _put(x, None if targets is None else targets[path])
        del x  # the host copy goes before the next array is read
    missing = [p for p in expected if p not in placed]
    if missing:
        name = ".".join(str(k) for k in missing[0])
        raise UserError(f"{source} has no tensor '{name}'; {remedy}.")
    alphas = alpha_per_layer(default_alpha(cfg.num_hidden_layers) if alpha is None else alpha,
                             cfg.num_hidden_layers)
    for i, a in enumerate(alphas):
        path = ("layers", i, "mlp", "alpha")
        placed[path] = _put(np.float32(a), None if targets is None else targets[path])
    tree: dict[Any, Any] = {}
    for path, x in placed.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = x
    nnx.replace_by_pure_dict(state, tree)
    model = nnx.merge(graphdef, state)
    model.mesh = mesh
    layout.lay_out(model)  # the TPU kernels' layout, where they run the sparse MLP
    return model


def _with_sign_bits(params: dict[str, Any], layers: int) -> Iterator[tuple[Path, Any]]:
    """Leaves of a per-layer params tree (`layers: {i: ...}`) as `(path, array)`, with any missing
    `gate_sign_bits` computed from the layer's gate."""
    flat = _flat(params)
    yield from flat.items()
    for i in range(layers):
        gate, bits = (("layers", i, "mlp", k) for k in ("gate", "gate_sign_bits"))
        if bits not in flat and gate in flat:
            log.info("no gate sign bits for layer %d; computing them at load time", i)
            yield bits, pack_sign_bits_numpy(np.asarray(flat[gate]))


def model_from_params(
    cfg: LlamaConfig,
    params: dict[str, Any],
    *,
    dtype=None,
    alpha=None,
    mode: str = "dense",
    backend: str = "auto",
    mesh: Mesh | None = None,
    quantize: str | None = None,
) -> Llama:
    """Builds a `Llama` around a nested dict of arrays (numpy or jax).

    `params` is in the model's per-layer layout (`io.hf.convert_in_memory`,
    `{"layers": {i: ...}}`). Missing `gate_sign_bits` are computed here. With a `mesh`,
    every array is placed per `sharding.model_shardings` (each device receives only its slice);
    else on the default device. `dtype`: default, the embedding's. `quantize`: as `assemble`.
    """
    dtype = _dtype(dtype) or params["embed_tokens"]["embedding"].dtype
    return assemble(cfg, _with_sign_bits(params, cfg.num_hidden_layers), dtype=dtype, alpha=alpha,
                    mode=mode, backend=backend, mesh=mesh, quantize=quantize)


def _restore(path: str, cfg: LlamaConfig, block, dtype, mesh: Mesh | None,
             quantize: str | None = None) -> Iterable[tuple[Path, jax.Array]]:
    """The arrays of checkpoint `path` (its `SparseInferBlock` is `block`), each restored onto its
    sharding on `mesh` (else on the default device), floats as `dtype`. A quantised checkpoint's
    int8 weights and scales as stored; with `quantize` (an unquantised checkpoint to quantise),
    the weights to quantise in the stored dtype, one layer at a time."""
    from sparseinfer_jax.io import checkpoint

    if mesh is not None:
        sharding.check_config(cfg, mesh)
        targets = _flat(sharding.model_shardings(cfg, mesh))
    else:
        targets = {}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    order = names.out_order(cfg)
    if block.quantize is not None:
        order = quant.layout(order)

    def stored_as(p, target):
        if quant.is_scale(p):
            return np.float32
        if quant.is_quantized(p):
            if block.quantize is not None:
                return np.int8
            if quantize is not None:
                return dtypes.DTYPES[block.dtype]
        return np.uint32 if target is None else dtype

    abstract = {
        p: jax.ShapeDtypeStruct(shape, stored_as(p, target), sharding=targets.get(p, device))
        for p, shape, target in order
    }
    if quantize is None:
        return checkpoint.restore_params(path, abstract, dtype=block.dtype).items()
    return checkpoint.restore_params(path, abstract, dtype=block.dtype,
                                     groups=lambda p: p[:2] if p[0] == "layers" else p)


def _auto(mesh: str, cfg: LlamaConfig, dtype) -> Mesh | None:
    if mesh != "auto":
        raise UserError(f"mesh must be a jax Mesh, None or 'auto', got '{mesh}'.")
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    return sharding.auto_mesh(cfg, name if name in dtypes.DTYPES else "bfloat16")


def _quantized_mesh(mesh, quantized: str | None):
    """`mesh` for a model with `quantized` weights: int8 weights do not shard yet, so "auto" is
    one device and a mesh of several devices is refused."""
    if quantized is None or mesh is None:
        return mesh
    if isinstance(mesh, str):
        return None if mesh == "auto" else mesh
    if mesh.size > 1:
        raise UserError(f"{quantized} weights do not shard over several devices yet: load on one "
                        "device (mesh=None, --mesh none) or without --quantize.")
    return mesh


PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__))
SHIPPED_MODEL = os.path.join(PACKAGE_DIR, "models", "tiny-relu-llama")


def _stored_alpha(block, cfg, where: str):
    """The block's alpha, checked as `alpha_per_layer` checks one given; errors name the file."""
    if block.alpha is not None:
        try:
            alpha_per_layer(block.alpha, cfg.num_hidden_layers)
        except UserError:
            raise UserError(
                f"{where} field 'sparseinfer.alpha' must be a positive number or "
                f"{cfg.num_hidden_layers} of them, one per layer, got {list(block.alpha)}; "
                "calibrate again (sparseinfer calibrate) or fix it.") from None
    return block.alpha


def load(
    path: str | os.PathLike = SHIPPED_MODEL,
    *,
    dtype=None,
    mode: str = "dense",
    backend: str = "auto",
    alpha=None,
    mesh: Mesh | str | None = "auto",
    quantize: str | None = None,
) -> tuple[Llama, Tokenizer | None]:
    """Loads a model and its tokenizer.

    Args:
      path: a checkpoint written by `sparseinfer-convert`, or a Hugging Face model folder (or hub
        id), converted array by array as it loads; default: the small ReLU-Llama shipped with
        the package.
      dtype: weights' dtype ("bfloat16", "float32"); default: the checkpoint's.
      mode: the decode-step MLP mode: "dense", "sparse" or "oracle".
      backend: sparse kernel backend: "auto", "pallas", "xla" or "reference".
      alpha: per-layer conservativeness override (a number or one per layer); default: the
        checkpoint's calibrated values. A sparse mode on a checkpoint never calibrated (no
        "calibration" marker) calibrates in memory first, with a warning
        (`calibration.calibrate_in_memory`).
      mesh: a `(data, model)` device mesh (`sharding.make_mesh`) to shard the model over; each
        device receives only its slice (a checkpoint's read from disk by orbax, an HF folder's
        converted on the host one array at a time).
        None: one device. "auto" (default): one device when the model fits it, else every
        local device on `model` (`sharding.auto_mesh`); one device for int8 weights, which do
        not shard yet.
      quantize: None, or "int8": quantise an unquantised checkpoint or HF folder in memory as it
        loads, one array at a time (every linear weight int8 with per-row scales,
        `model/quant.py`). A checkpoint converted with `--quantize` loads as it is stored.
    Returns:
      (model, tokenizer); the tokenizer is None when the folder has no tokenizer files.
    """
    from sparseinfer_jax.io import checkpoint

    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"load takes a folder path or a hub id, got {path!r}.")
    path = os.fspath(path)
    if not path.strip():
        raise UserError("load got an empty path; name a checkpoint folder, or call load() for "
                        "the shipped model.")
    if mesh is not None and not isinstance(mesh, (str, Mesh)):
        raise UserError(f"mesh must be a jax Mesh, None or 'auto', got {mesh!r}.")
    override = alpha is not None
    quant.check(quantize)
    if checkpoint.claims_converted(path):
        hf, block = checkpoint.read_checkpoint_config(path)
        cfg = config_from_hf_dict(hf)
        check_mode(cfg, mode, backend)
        if quantize is not None and block.quantize is not None:
            raise UserError(f"{path} is quantised already ({block.quantize}); load it without "
                            "--quantize.")
        tokenizer = load_tokenizer(path)  # a broken tokenizer fails before the weights load
        alpha = _stored_alpha(block, cfg, f"{path}/config.json") if alpha is None else alpha
        dtype = _dtype(dtype) or dtypes.DTYPES[block.dtype]
        quantized = quantize or block.quantize
        mesh = _quantized_mesh(mesh, quantized)
        if isinstance(mesh, str):
            mesh = _auto(mesh, cfg, dtype)
        leaves = _restore(path, cfg, block, dtype, mesh, quantize)
        source = f"the checkpoint {path}"
        remedy = "convert the model again with sparseinfer-convert"
    else:
        from sparseinfer_jax.io import hf as hf_folder
        from sparseinfer_jax.io.source import resolve_source

        folder = resolve_source(path)
        dtype = _dtype(dtype) or jnp.bfloat16
        stream_dtype = "float32" if dtype != jnp.bfloat16 else "bfloat16"  # one rounding only
        hf, cfg, leaves = hf_folder.stream(folder, dtype=stream_dtype)
        tokenizer = load_tokenizer(folder)
        # An HF folder may carry a calibration (alphas, predictor) in the same block.
        block = checkpoint.SparseInferBlock.from_json(hf.get(checkpoint.BLOCK_KEY),
                                                      f"{folder}/config.json")
        alpha = _stored_alpha(block, cfg, f"{folder}/config.json") if alpha is None else alpha
        source, remedy = folder, "the checkpoint and its config.json disagree"
        quantized = quantize
        mesh = _quantized_mesh(mesh, quantized)
    if isinstance(mesh, str):
        mesh = _auto(mesh, cfg, dtype)
    model = assemble(cfg, leaves, dtype=dtype, alpha=alpha, mode=mode, backend=backend, mesh=mesh,
                     source=source, remedy=remedy, quantize=quantized)
    set_predictor(model, block.predictor)
    if mode == "sparse" and not override and not block.is_calibrated:
        from sparseinfer_jax.tuning.calibration import calibrate_in_memory

        calibrate_in_memory(model, tokenizer, path)
    return model, tokenizer
