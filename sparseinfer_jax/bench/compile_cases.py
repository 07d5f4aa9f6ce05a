"""What the GPU compile report compiles: every Pallas kernel at one layer's shapes, and the whole
`generate` program per MLP mode, all on abstract arguments (no weight is ever allocated)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels as pk
from pallas_kernels import pack
from pallas_kernels.gpu import chain, masked_down, predict, predict_gate_up, signmag
from pallas_kernels.gpu import pack as gpu_pack
from sparseinfer_jax.bench.shapes import PROMPT_TOKENS
from sparseinfer_jax.model import layout
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.runtime import generation, requests

NEW_TOKENS = 16  # decode slots of the compiled program (its kernels do not depend on it)


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing to compile: `fn(*args)`; `live(count)` = its programs with work at `count`
    active neurons (None for whole programs)."""

    name: str
    kind: str
    fn: Callable
    args: tuple
    live: Callable[[int], int] | None = None
    kernel: str | None = None  # the Pallas kernel's name in the compiled module


def kernel_cases(cfg: LlamaConfig, batch: int, dtype, sds: Callable, *,
                 pack_weights: bool = True) -> list[Case]:
    """Every Pallas kernel at one layer's shapes (the decode step's arguments). pack_sign_bits
    packs W_gate `[F, D]` (its use), whatever the batch: only with `pack_weights`."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    x, w = sds((batch, d), dtype), sds((f, d), dtype)
    idx, count = sds((f,), jnp.int32), sds((), jnp.int32)
    bits = sds((f, pack.num_words(d)), jnp.uint32)
    gate_up = lambda act: functools.partial(  # noqa: E731
        chain.sparse_gate_up_pallas, activation=act,
        threshold=0.0 if act == "relu" else 0.1)
    # The sparse MLP op's two kernels (`gpu/layer.py`): each vote, the
    # mask input (oracle, or a union over a mesh axis), and both ways of adding the down blocks.
    fused = lambda vote, act, zero: functools.partial(  # noqa: E731
        predict_gate_up.predict_gate_up_pallas, vote=vote, activation=act,
        threshold=0.0 if act == "relu" else 0.1, zero_out=zero)
    alpha = sds((), jnp.float32)
    h, acc = sds((batch, f), jnp.float32), sds((batch, d), jnp.float32)
    fused_live = lambda c: predict_gate_up.num_programs(f)  # noqa: E731
    down_new_live = lambda c: masked_down.num_live_programs(c, f, d)  # noqa: E731
    cases = [
        Case("predict_gate_up_sign", "kernel",
             lambda x, g, u, a, b: fused("sign", "relu", False)(x, g, u, alpha=a, bits=b),
             (x, w, w, alpha, bits), fused_live, "predict_gate_up"),
        Case("predict_gate_up_signmag", "kernel",
             lambda x, g, u, a, b: fused("signmag", "fatrelu", True)(x, g, u, alpha=a, bits=b),
             (x, w, w, alpha, bits), fused_live, "predict_gate_up"),
        Case("predict_gate_up_mask", "kernel",
             lambda x, g, u, m: fused("mask", "relu", False)(x, g, u, mask=m),
             (x, w, w, sds((f,), jnp.bool_)), fused_live, "predict_gate_up"),
        Case("masked_down", "kernel", masked_down.masked_down_pallas, (h, w), down_new_live,
             "masked_down"),
        Case("masked_down_atomic", "kernel",
             functools.partial(masked_down.masked_down_pallas, accumulate="atomic"), (h, w, acc),
             down_new_live, "masked_down"),
        Case("sign_predict", "kernel", predict.sign_predict_pallas, (x, bits, alpha),
             lambda c: predict.num_programs(f), "sign_predict"),
        Case("signmag_predict", "kernel", signmag.signmag_pallas, (x, bits),
             lambda c: signmag.num_programs(f), "signmag_predict"),
        # The older chain (`gpu/chain.py`), compiled as the comparison it is.
        Case("chain_gate_up_relu", "kernel", gate_up("relu"), (x, w, w, idx, count),
             lambda c: chain.gate_up_live_programs(c, d), "sparse_gate_up"),
        Case("chain_gate_up_fatrelu", "kernel", gate_up("fatrelu"), (x, w, w, idx, count),
             lambda c: chain.gate_up_live_programs(c, d), "sparse_gate_up"),
        Case("chain_down", "kernel", chain.sparse_down_pallas,
             (sds((batch, f), jnp.float32), w, idx, count),
             lambda c: chain.down_live_programs(c, d), "sparse_down"),
    ]
    if pack_weights:  # the batch-independent kernel, at the first batch only
        cases.insert(0, Case("pack_sign_bits", "kernel", gpu_pack.pack_sign_bits_pallas, (w,),
                             lambda c: gpu_pack.num_programs(f, d), "pack_sign_bits"))
    return cases


def layer_case(cfg: LlamaConfig, batch: int, dtype, sds: Callable) -> Case:
    """One decode step's sparse MLP layer as `auto` runs it on the target (the per-layer op),
    weights abstract."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    w = sds((f, d), dtype)
    return Case("sparse_mlp_layer", "layer", pk.sparse_mlp_layer,
                (sds((batch, d), dtype), w, w, w, sds((f, pack.num_words(d)), jnp.uint32),
                 sds((), jnp.float32)))


def _generate_program(state, tokens, pad, follow, temperature, top_p, penalty, key, stop, alpha,
                      *, graphdef, sparsity, top_k, eos_ids, pad_id):
    """What `generate` runs, as one program: the dense prefill, then the decode loop as
    `sparsity` says."""
    shared = dict(graphdef=graphdef, top_k=top_k, eos_ids=eos_ids, pad_id=pad_id)
    cache, loop = generation._prefill(state, tokens, pad, follow, temperature, top_p, penalty, key,
                                      **shared)
    return generation._decode(state, cache, loop, pad, stop, temperature, top_p, penalty, alpha,
                              sparsity=sparsity, stats=None, **shared)


def program_cases(cfg: LlamaConfig, batch: int, dtype, sds: Callable,
                  modes: tuple[str, ...] = ("dense", "sparse"), backend: str = "auto"
                  ) -> list[Case]:
    """The whole `generate` (dense prefill + decode loop) per MLP mode, weights abstract, the
    sparse MLP on `backend`."""
    cases = []
    prompt, new = requests.bucket(PROMPT_TOKENS), requests.bucket(NEW_TOKENS)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    scalar = sds((), jnp.float32)
    for mode in modes:
        model = nnx.eval_shape(
            lambda mode=mode: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0), mode=mode,
                                    backend=backend))
        layout.lay_out(model)  # as `load` leaves it: the TPU kernels' layout where they run
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: sds(a.shape, a.dtype), state)
        statics = dict(sparsity=model.sparsity, top_k=None,
                       eos_ids=tuple(cfg.eos_token_ids), pad_id=int(cfg.pad_token_id or 0))
        args = (state, sds((batch, prompt), jnp.int32), sds((batch,), jnp.int32),
                sds((batch, new), jnp.int32), scalar, scalar, scalar, sds(key.shape, key.dtype),
                sds((), jnp.int32), sds((cfg.num_hidden_layers,), jnp.float32))
        fn = functools.partial(_generate_program, graphdef=graphdef, **statics)
        cases.append(Case(f"generate_{mode}", "program", fn, args))
    return cases
