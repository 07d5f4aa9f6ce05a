"""Tensor parallelism: a `data` x `model` device mesh and where every array lives on it.

Attention heads and MLP neurons are split over `model`, the batch over `data`. KV heads are split
over `model` when their count divides it, and replicated when the axis is a multiple of it (each
device then holds every KV head, as in other tensor-parallel servers). The sparse MLP runs per
neuron shard under `shard_map` (see `mlp.py`): shard s holds neurons [s F/m, (s+1) F/m) of every
layer. Everything else is placed with `NamedSharding`s and left to XLA's sharding propagation.
The vocabulary (embedding and LM head) is split over `model` when the axis divides it.

Shapes: L layers, V vocab, D hidden, F intermediate, H heads, K kv heads, hd head_dim.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.positions import full_causal_inputs
from sparseinfer_jax.model.rope import rope_tables

AXES = ("data", "model")
log = logging.getLogger(__name__)


def parse_mesh(text: str) -> dict[str, int]:
    """Parses "data=1,model=4" into `{"data": 1, "model": 4}` (a missing axis is 1)."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        name = name.strip()
        if name in seen:
            raise UserError(f"mesh names axis '{name}' twice in '{text}'; give each axis once.")
        seen.add(name)
        if name not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise UserError(
                f"mesh must look like 'data=1,model=4' (axes {', '.join(AXES)}, sizes >= 1), "
                f"got '{text}'."
            )
        sizes[name] = int(value)
    return sizes


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A `(data, model)` mesh over the first `data * model` of `devices` (default: all devices).

    With several processes (`jax.distributed.initialize`), `jax.devices()` lists every host's
    devices, so the mesh spans hosts; keep `model` within one host (fast links) and `data` across.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = data * model
    if n > len(devices):
        raise UserError(
            f"the mesh data={data},model={model} needs {n} devices but only {len(devices)} are "
            "visible; choose a smaller mesh."
        )
    return jax.make_mesh(
        (data, model), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[:n]
    )


def as_mesh(mesh: Mesh) -> Mesh:
    """`mesh` as the `(data, model)` mesh with Auto axes that the rest of this module expects.

    Accepts any `jax.sharding.Mesh` whose axes are named `data` and/or `model` (in any order,
    any axis types: on jax 0.10 `jax.make_mesh` makes Explicit axes, which
    `with_sharding_constraint` refuses); a missing axis gets size 1, and other axes are allowed
    only with size 1. Same devices, same layout.
    """
    auto = jax.sharding.AxisType.Auto
    if mesh.axis_names == AXES and all(t == auto for t in mesh.axis_types):
        return mesh
    names = tuple(mesh.axis_names)
    others = [n for n in names if n not in AXES and mesh.shape[n] != 1]
    if others:
        raise UserError(
            f"the mesh has axes {', '.join(map(str, names))}; SparseInfer uses 'data' and "
            f"'model' (other axes only of size 1), e.g. jax.make_mesh((1, 4), {AXES})."
        )
    kept = [n for n in names if n in AXES]
    devices = np.asarray(mesh.devices).reshape([mesh.shape[n] for n in kept])
    devices = np.transpose(devices, [kept.index(a) for a in AXES if a in kept])
    sizes = tuple(mesh.shape.get(a, 1) for a in AXES)
    return Mesh(devices.reshape(sizes), AXES, axis_types=(auto,) * len(AXES))


def mesh_from_text(text: str | None) -> Mesh | None:
    """The mesh for a `--mesh` option value; None (one device, no mesh) when text is None."""
    return None if text is None else make_mesh(**parse_mesh(text))


def auto_mesh(cfg: LlamaConfig, dtype: str = "bfloat16", devices=None) -> Mesh | None:
    """The default placement: one device (None) when the model fits it, else every local device
    on `model`.

    "Fits" compares `memory.estimate_memory` (weights, sign bits and a 2k-token KV cache at batch
    1) with the first device's memory limit; devices that report none (the CPU) count as fitting.
    """
    from sparseinfer_jax.model.memory import estimate_memory

    devices = jax.local_devices() if devices is None else list(devices)
    limit = (devices[0].memory_stats() or {}).get("bytes_limit") if devices else None
    if len(devices) < 2 or not limit:
        return None
    context = min(2048, cfg.max_position_embeddings)
    need = estimate_memory(cfg, context=context, dtype=dtype).total_bytes
    if need <= limit:
        return None
    mesh = make_mesh(1, len(devices), devices)
    check_config(cfg, mesh)
    log.warning(
        "the model needs about %.1f GiB, more than one device's %.1f GiB: sharding it over %d "
        "devices (data=1,model=%d); pass a mesh to choose another layout.",
        need / 2**30, limit / 2**30, len(devices), len(devices),
    )
    return mesh


def check_config(cfg: LlamaConfig, mesh: Mesh) -> None:
    """Raises UserError when the model cannot be split over the mesh's `model` axis."""
    m = as_mesh(mesh).shape["model"]
    for name in ("num_attention_heads", "intermediate_size"):
        n = getattr(cfg, name)
        if n % m:
            raise UserError(
                f"{name} ({n}) is not divisible by the mesh's model axis ({m}); choose a model "
                "axis size that divides it."
            )
    k = cfg.num_key_value_heads
    if k % m and m % k:
        raise UserError(
            f"num_key_value_heads ({k}) and the mesh's model axis ({m}) must divide one another; "
            "choose another model axis size."
        )


def _kv_axis(cfg: LlamaConfig, mesh: Mesh) -> str | None:
    return "model" if cfg.num_key_value_heads % as_mesh(mesh).shape["model"] == 0 else None


def param_specs(cfg: LlamaConfig, mesh: Mesh) -> dict[str, Any]:
    """PartitionSpecs of the params tree, one per kind of layer array written with a leading L
    axis (`[L, F, D]`, ...); `model_shardings` drops that axis for each layer."""
    kv = _kv_axis(cfg, mesh)
    vocab = "model" if cfg.vocab_size % as_mesh(mesh).shape["model"] == 0 else None
    neurons = P(None, "model", None)  # [L, F, D] and [L, F, W]: each device its own neurons
    specs = {
        "embed_tokens": {"embedding": P(vocab, None)},
        "norm": {"weight": P()},
        "layers": {
            "input_layernorm": {"weight": P()},
            "post_attention_layernorm": {"weight": P()},
            "self_attn": {
                "q_proj": {"weight": P(None, "model", None)},  # [L, H*hd, D]
                "k_proj": {"weight": P(None, kv, None)},  # [L, K*hd, D]
                "v_proj": {"weight": P(None, kv, None)},
                "o_proj": {"weight": P(None, None, "model")},  # [L, D, H*hd]
            },
            "mlp": {
                "gate": neurons,
                "up": neurons,
                "down_t": neurons,
                "gate_sign_bits": neurons,
                "alpha": P(),  # [L]
            },
        },
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = {"weight": P(vocab, None)}  # [V, D]
    return specs


def _named(mesh: Mesh, specs: dict[str, Any]) -> dict[str, Any]:
    mesh = as_mesh(mesh)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def model_shardings(cfg: LlamaConfig, mesh: Mesh) -> dict[str, Any]:
    """NamedShardings of the model's own layout: `param_specs` with the leading L axis dropped,
    once per layer (`{"layers": {i: ...}}`)."""
    specs = param_specs(cfg, mesh)
    layer = jax.tree.map(lambda p: P(*p[1:]), specs["layers"], is_leaf=lambda x: isinstance(x, P))
    specs["layers"] = {i: layer for i in range(cfg.num_hidden_layers)}
    return _named(mesh, specs)


def batch_axis(mesh: Mesh, batch: int) -> str | None:
    """The "data" axis when the batch splits evenly over it, else None (rows replicated)."""
    return "data" if batch % as_mesh(mesh).shape["data"] == 0 else None


def batch_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Sharding of a `[B, ...]` array: rows over `data`."""
    return NamedSharding(as_mesh(mesh), P(batch_axis(mesh, batch)))


def cache_sharding(cfg: LlamaConfig, mesh: Mesh, batch: int) -> NamedSharding:
    """Sharding of one layer's KV cache array `[B, S, K, hd]`: batch over data, KV heads over
    model."""
    return NamedSharding(
        as_mesh(mesh), P(batch_axis(mesh, batch), None, _kv_axis(cfg, mesh), None)
    )


def shard_model(model, mesh: Mesh):
    """Moves every array of `model` (a `Llama`) onto `mesh` per `param_specs`; returns the model.

    Later calls (forward, `generate`) run tensor-parallel; the sparse MLP runs per neuron shard.
    """
    mesh = as_mesh(mesh)
    check_config(model.config, mesh)
    state = nnx.state(model)
    placed = jax.device_put(nnx.to_pure_dict(state), model_shardings(model.config, mesh))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)
    model.mesh = mesh
    return model


def shard_active_counts(model, input_ids: jnp.ndarray, num_shards: int) -> np.ndarray:
    """Predicted-active neurons of each neuron shard, per layer and token: `[L, T, num_shards]`.

    Replays `input_ids: [1, T]` through the model (dense MLP, so every token sees the same inputs
    it would when decoding) and counts, on each of `num_shards` contiguous slices of the F
    neurons, the neurons the sign-bit predictor keeps: the work each device of a `model` axis of
    that size does per decoded token. Needs no mesh.
    """
    assert model.config.intermediate_size % num_shards == 0, num_shards
    return np.asarray(_shard_counts(model, jnp.asarray(input_ids), num_shards))


@nnx.jit(static_argnames="num_shards")
def _shard_counts(model, input_ids, num_shards):
    b, t = input_ids.shape
    positions, mask = full_causal_inputs(b, t)
    cos, sin = rope_tables(model.config, positions)
    x = model.embed_tokens(input_ids)
    counts = []
    for layer in model.layers:
        attn, _ = layer.self_attn(layer.input_layernorm(x), cos, sin, mask)
        x = x + attn
        h = layer.post_attention_layernorm(x)
        per_row = layer.mlp.predict(h.reshape(b * t, -1), model.sparsity.predictor, "xla")[1]
        counts.append(per_row.reshape(b * t, num_shards, -1).sum(-1, dtype=jnp.int32))
        y, _ = layer.mlp(h)  # dense
        x = x + y
    return jnp.stack(counts)
