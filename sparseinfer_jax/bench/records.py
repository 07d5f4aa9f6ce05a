"""Decode benchmarks: latency vs predicted active fraction, against dense and the bandwidth limit.

A model of a named shape (`SHAPES`) is built with random weights on the fly: decode speed depends
on how many neurons are computed, not on what the weights mean. Per layer, alpha is set so that
the sign-bit predictor keeps a requested fraction of the neurons on decode-time MLP inputs (the
hidden states of a greedy dense continuation, replayed by `calibration.window_counts` over an alpha
grid fine enough to hit any fraction), and the fraction actually computed is measured in the
sparse run itself.

Every figure comes from `block_until_ready` timings of compiled programs after a warm-up run:
- decode: `generate()` (a prefill program, then one call of the decode program's
  `lax.while_loop` of `tokens` steps) run `repeats` times; per-token latency = the decode call's
  time / (tokens - 1), median and spread over the repeats;
- bytes per decode step: the weights the step must read (attention, the computed MLP rows, sign
  bits, final norm and LM head, one embedding row) plus the live KV cache; / latency = achieved
  GB/s, compared with the copy bandwidth measured in the same run (`copy_bandwidth`);
- kernels: one layer's sparse MLP alone, `sparse_mlp_layer` on the path the model takes, against
  the dense MLP of the same shape; its predictors (sign, signmag) against the gate matvec; on the
  Pallas path also the older chain (`chain_mlp`) as a comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels as pk
from pallas_kernels import backend as bk
from pallas_kernels.contract import activate, matmul, matmul_t
from pallas_kernels.gpu.chain import chain_mlp
from sparseinfer_jax.bench.alphas import alpha_keeping, decode_inputs_fraction, fit_alphas
from sparseinfer_jax.bench.report import HEADER, format_row
from sparseinfer_jax.bench.shapes import DTYPES, MODES, PROMPT_TOKENS, random_model, shape_config
from sparseinfer_jax.bench.timing import copy_bandwidth, read_bandwidth, spread, time_in_a_loop
from sparseinfer_jax.errors import UserError, size_text
from sparseinfer_jax.io import names
from sparseinfer_jax.model import dtypes, quant
from sparseinfer_jax.model.config import LlamaConfig
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.model.memory import estimate_memory, parameter_count
from sparseinfer_jax.model.metrics import SCALE_BYTES, row_bytes
from sparseinfer_jax.model.mlp import BACKENDS
from sparseinfer_jax.model.positions import position_limit
from sparseinfer_jax.runtime.generation import generate
from sparseinfer_jax.runtime.requests import bucket, memory_limit


def step_bytes(cfg: LlamaConfig, itemsize: int, computed: float, context: float,
               fired: float | None = None, quantized: bool = False) -> dict:
    """Bytes one batch-1 decode step must read.

    Args:
      itemsize: bytes per value of the compute dtype (2 for bfloat16, 4 for float32): the KV
        cache, the norms, the embeddings, and every weight unless `quantized`; sign bits are
        uint32.
      computed: MLP neurons whose gate row is read per layer (F for dense; the candidates when
        sparse).
      context: KV cache slots the step attends to (the live context length).
      fired: neurons whose up and down rows are read per layer (the candidates whose gate fires,
        `pallas_kernels.sparse_mlp_layer`); default: `computed`.
      quantized: the linear weights are int8, each row with a float32 scale
        (`metrics.row_bytes`); an untied LM head too.

    Returns:
      {"attention", "predictor", "gate", "up", "down", "kv_cache", "other", "total"} in bytes,
      summed over layers. "predictor" (the packed sign bits) is 0 when every neuron is computed
      (the dense path reads none).
    """
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    fired = computed if fired is None else fired
    w = 1 if quantized else itemsize
    scale = SCALE_BYTES if quantized else 0
    row = row_bytes(cfg, w, quantized)
    head = cfg.vocab_size * (d * itemsize if cfg.tie_word_embeddings else d * w + scale)
    out = {
        # q, k, v, o (with a scale per output row when int8) and the two norms.
        "attention": layers * ((2 * d * q + 2 * d * kv) * w + (q + 2 * kv + d) * scale
                               + 2 * d * itemsize),
        "predictor": 0 if computed >= f else layers * f * cfg.sign_words * 4,
        "gate": layers * computed * row,
        "up": layers * fired * row,
        "down": layers * fired * row,
        "kv_cache": layers * 2 * context * kv * itemsize,
        # Final norm, LM head (the tied embedding when there is no head) and one embedding row.
        "other": (2 * d) * itemsize + head,
    }
    out["total"] = sum(out.values())
    return out


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one `run` measures (see the `bench` command's flags)."""

    shape: str = "tiny"
    layers: int | None = None
    dtype: str = "float32"
    modes: tuple[str, ...] = MODES
    backends: tuple[str, ...] = ("auto",)
    active: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    tokens: int = 64
    repeats: int = 5
    kernels: bool = True
    batches: tuple[int, ...] = ()
    peer: str | None = None
    seed: int = 0
    quantize: str | None = None

    def check(self) -> None:
        """Raises UserError for a bad setting (before anything is built)."""
        limit = position_limit(shape_config(self.shape, self.layers))
        if limit is not None and PROMPT_TOKENS + self.tokens > limit:
            raise UserError(f"--tokens {self.tokens} and bench's {PROMPT_TOKENS}-token prompt pass "
                            f"the shape's {limit} positions; ask for at most "
                            f"{limit - PROMPT_TOKENS}.")
        quant.check(self.quantize)
        if self.quantize is not None and self.peer is not None:
            raise UserError("--peer hf times the float weights: drop --peer or --quantize.")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'.")
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise UserError(f"--modes must be a comma list of {', '.join(MODES)}.")
        bad = [b for b in self.backends if b not in BACKENDS]
        if not self.backends or bad:
            raise UserError(f"--backend must be a comma list of {', '.join(BACKENDS)}.")
        if not self.active or any(not 0 < a <= 1 for a in self.active):
            raise UserError("--active must be a comma list of fractions in (0, 1].")
        if self.tokens < 2:
            raise UserError(f"--tokens must be at least 2, got {self.tokens}.")
        if self.repeats < 1:
            raise UserError(f"--repeats must be at least 1, got {self.repeats}.")
        if any(b < 1 for b in self.batches):
            raise UserError("--batches must be positive batch sizes.")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be a whole number in [0, 2**63), got {self.seed}.")
        if self.peer not in (None, "hf"):
            raise UserError(f"--peer must be 'hf', got '{self.peer}'.")
        missing = [m for m in ("torch", "transformers") if self.peer == "hf" and not _has(m)]
        if missing:
            raise UserError(f"--peer hf needs {' and '.join(missing)}; pip install "
                            f"{' '.join(missing)} (or drop --peer).")
        check_memory(self)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def memory_needed(settings: Settings) -> tuple[int, int]:
    """Bytes a run of `settings` needs: (on the device: the model, its sign bits, the largest
    batch's KV cache and prefill, the runtime's overhead; on the host, for `--peer hf`: the torch
    model, built in float32 and then cast, and the state dict copied into it)."""
    cfg = shape_config(settings.shape, settings.layers)
    batch = max((1, *settings.batches))
    slots = bucket(PROMPT_TOKENS) + bucket(settings.tokens)
    est = estimate_memory(cfg, batch=batch, context=slots, prompt=PROMPT_TOKENS,
                          dtype=settings.dtype)
    size = dtypes.itemsize(settings.dtype)
    peer = parameter_count(cfg) * max(4, 2 * size) if settings.peer == "hf" else 0
    return est.total_bytes, peer


def check_memory(settings: Settings) -> None:
    """Raises UserError when a run of `settings` needs more memory than there is (the device's
    limit; on the CPU the host's RAM, shared with the torch peer), before anything is built."""
    device, host = memory_needed(settings)
    have = memory_limit()
    if jax.default_backend() == "cpu":
        device, host = device + host, 0
    for need, where in ((device, "memory here"), (host, "host memory for --peer hf")):
        if have and need > have:
            raise UserError(
                f"bench --shape {settings.shape} --dtype {settings.dtype} needs about "
                f"{size_text(need)} but there is {size_text(have)} of {where}; choose a smaller "
                "--shape, fewer --layers or --dtype bfloat16."
            )


def _record(kind: str, mode: str, backend: str, active: float | None, **fields) -> dict:
    base = dict(kind=kind, mode=mode, backend=backend, active_fraction=active,
                tokens_per_s=None, decode_ms_median=None, achieved_gb_s=None)
    return {**base, **fields}


def decode_record(model: Llama, prompt: np.ndarray, settings: Settings, mode: str, backend: str,
                  alphas: np.ndarray, copy_gb_s: float, read_gb_s: float) -> dict:
    """Times `generate` (see the module docstring) and measures the computed fraction.

    A sparse record times dense decoding too, alternating with its own repeats (dense, sparse,
    dense, ...): `speedup` is the spread of the per-pair ratios dense ms / sparse ms, so a machine
    whose speed drifts during the run (a shared CPU) moves both sides of each ratio alike.
    `limit_ms` is the step's bytes over the faster of the copy and matvec read bandwidths."""
    cfg = model.config
    kw = dict(max_new_tokens=settings.tokens, mode=mode, backend=backend,
              alpha=None if mode == "dense" else alphas, stop_at_eos=False)
    first = generate(model, prompt, **kw)
    paired = mode != "dense"
    dense_kw = dict(kw, mode="dense", backend="xla", alpha=None)
    if paired:
        generate(model, prompt, **dense_kw)  # compiled (or cached) before the timing starts
    runs, dense_runs = [], []
    for _ in range(settings.repeats):
        if paired:
            dense_runs.append(generate(model, prompt, **dense_kw).timing)
        runs.append(generate(model, prompt, **kw).timing)
    computed = fired = 1.0
    if mode != "dense":
        stats = generate(model, prompt, **kw, stats="predicted", timing=False).stats
        computed = float(np.mean(stats.computed_fraction))
        fired = float(np.mean(stats.fired_fraction))
    ms = spread([t.decode_s_per_token * 1e3 for t in runs])
    pairs = {}
    if paired:
        pairs = dict(
            dense_decode_ms=spread([t.decode_s_per_token * 1e3 for t in dense_runs]),
            speedup=spread([d.decode_s_per_token / t.decode_s_per_token
                            for d, t in zip(dense_runs, runs, strict=True)]))
    batch, p = prompt.shape
    context = p + settings.tokens / 2  # mean live slots over the decode steps
    f = cfg.intermediate_size
    nbytes = step_bytes(cfg, jnp.dtype(model.dtype).itemsize, computed * f, context, fired * f,
                        quantized=model.quantize is not None)
    gb_s = nbytes["total"] / (ms["median"] * 1e-3) / 1e9
    return _record(
        "decode", mode, backend if mode != "dense" else "-", round(computed, 4),
        fired_fraction=round(fired, 4), batch=batch, tokens_per_s=1e3 / ms["median"],
        decode_ms_median=ms["median"],
        decode_ms=ms, compile_s=first.timing.compile_s,
        prefill_ms=statistics.median(t.prefill_s for t in runs) * 1e3,
        bytes_per_step=nbytes, achieved_gb_s=gb_s, fraction_of_copy=gb_s / copy_gb_s,
        limit_ms=nbytes["total"] / (max(copy_gb_s, read_gb_s) * 1e9) * 1e3, **pairs)


KERNEL_CALLS = 20  # calls per timed loop in the kernel table


def kernel_records(model: Llama, settings: Settings, backend: str, fraction: float,
                   copy_gb_s: float) -> list[dict]:
    """Layer 0's sparse MLP alone, `sparse_mlp_layer` as the model calls it on `backend`'s path,
    against the dense MLP; its predictors alone beside the gate matvec, to find a slow piece; on
    the Pallas path also the older chain it replaced (`gpu/chain.py`), as a comparison.

    alpha is fitted to keep `fraction` of the neurons for a random input; the layer's bytes count
    the sign bits, the gate rows of the candidates and the up and down rows of the fired ones,
    as the op itself counts them.
    """
    mlp = model.layers[0].mlp
    gate, up, down_t = (a[...] for a in (mlp.gate, mlp.up, mlp.down_t))
    bits = mlp.gate_sign_bits[...]
    f, d = gate.shape
    dt, item = gate.dtype, gate.dtype.itemsize
    rng = np.random.default_rng(settings.seed)
    x = jnp.asarray(rng.standard_normal((1, d)), dt)
    alpha = alpha_keeping(x, bits, fraction)

    # The weights are arguments, never closed over: jit would embed a closed-over array in the
    # program as a constant, which on a GPU takes minutes to compile at the 7b shape.
    def dense_mlp(x, gate, up, down_t):
        hh = activate(matmul_t(x, gate), "relu", 0.0) * matmul_t(x, up)
        return matmul(hh.astype(dt), down_t).astype(dt)

    layer = functools.partial(pk.sparse_mlp_layer, backend=backend)
    weights = (gate, up, down_t, bits)
    _, candidates, fired = (int(c) for c in layer(x, *weights, alpha)[1])
    read_bits = f * bits.shape[1] * 4
    # (op, mode, function, arguments, bytes it must read)
    cases = [
        ("gate_matvec", "dense", matmul_t, (x, gate), f * d * item),
        ("predictor", "sparse", functools.partial(pk.sign_predict, backend=backend),
         (x, bits, alpha), read_bits),
        ("signmag", "sparse", functools.partial(pk.signmag_predict, backend=backend),
         (x, bits, alpha), read_bits),
        ("mlp", "dense", dense_mlp, (x, gate, up, down_t), 3 * f * d * item),
        ("sparse_mlp_layer", "sparse", layer, (x, *weights, alpha),
         (candidates + 2 * fired) * d * item + read_bits),
    ]
    if pk.choose(backend).path == "pallas":
        def chain(x, alpha, bits, gate, up, down_t):
            idx, count = pk.compact(pk.sign_predict(x, bits, alpha, backend="pallas")[0])
            return chain_mlp(x, gate, up, down_t, idx, count, interpret=bk.interpret())[0]

        cases.append(("chain_mlp", "sparse", chain, (x, alpha, bits, gate, up, down_t),
                      3 * candidates * d * item + read_bits))
    out = []
    for op, mode, fn, args, nbytes in cases:
        ms = spread([s * 1e3 for s in time_in_a_loop(fn, args, calls=KERNEL_CALLS,
                                                     repeats=max(5, settings.repeats))])
        gb_s = nbytes / (ms["median"] * 1e-3) / 1e9
        sparse = mode == "sparse"
        out.append(_record("kernel", mode, backend if sparse else "-",
                           fraction if sparse else 1.0, op=op, ms=ms, bytes=nbytes,
                           achieved_gb_s=gb_s, fraction_of_copy=gb_s / copy_gb_s))
    return out


def hf_peer_record(model: Llama, prompt: np.ndarray, settings: Settings, copy_gb_s: float) -> dict:
    """Hugging Face transformers (torch, CPU) greedy decoding with the same shape and weights.

    `generate` greedy with its default KV cache, under `torch.inference_mode()`, on as many torch
    threads as this process may use. Per-token time is measured as ours: (a run of `tokens` new
    tokens - a prefill-only run of 1) / (tokens - 1), paired per repeat, after a warm-up.
    OpenMP threads wait passively unless OMP_WAIT_POLICY is set: torch's default spin-waiting
    made a 4-layer model 30-50x slower (450 vs 10 ms/token) on 2 cores shared with other work.
    """
    # libgomp reads this once, when torch loads it (nothing in this package imports torch before).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # `Settings.check` found both
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    cfg = model.config
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[jnp.dtype(model.dtype).name]
    hf_cfg = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)}
    hf = LlamaForCausalLM(HFConfig(**hf_cfg)).to(tdtype).eval()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    state = {name: torch.from_numpy(np.array(jnp.asarray(a, jnp.float32))).to(tdtype)
             for name, a in names.to_hf(params, cfg)}
    missing, _ = hf.load_state_dict(state, strict=False)
    assert not [m for m in missing if "rotary" not in m], missing
    ids = torch.from_numpy(prompt.astype(np.int64))
    kw = dict(do_sample=False, use_cache=True, pad_token_id=cfg.pad_token_id)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - start

    run(1)  # warm-up
    run(settings.tokens)
    per_token, prefills = [], []
    for _ in range(settings.repeats):
        prefills.append(run(1))
        per_token.append((run(settings.tokens) - prefills[-1]) / (settings.tokens - 1) * 1e3)
    ms = spread(per_token)
    nbytes = step_bytes(cfg, jnp.dtype(model.dtype).itemsize, cfg.intermediate_size,
                        prompt.shape[1] + settings.tokens / 2)
    gb_s = nbytes["total"] / (ms["median"] * 1e-3) / 1e9
    return _record("decode", "hf-dense", f"torch {torch.__version__}", 1.0, batch=prompt.shape[0],
                   tokens_per_s=1e3 / ms["median"], decode_ms_median=ms["median"], decode_ms=ms,
                   prefill_ms=statistics.median(prefills) * 1e3, bytes_per_step=nbytes,
                   achieved_gb_s=gb_s, fraction_of_copy=gb_s / copy_gb_s, torch_threads=threads,
                   omp_wait_policy=os.environ["OMP_WAIT_POLICY"])


def run(settings: Settings, *, log: Callable[[str], None] = print,
        save: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Builds the model and measures everything `settings` asks for; returns the JSON records.

    `save(records)`, when given, gets the records so far after each one, so a run stopped by a
    time limit still leaves every figure it measured.
    """
    settings.check()
    cfg = shape_config(settings.shape, settings.layers)
    shared = dict(shape=settings.shape, layers=cfg.num_hidden_layers, dtype=settings.dtype,
                  tokens=settings.tokens)
    records: list[dict] = []

    def add(*new: dict, show: bool = True) -> None:
        for rec in new:
            records.append({**rec, **shared})
            if show:
                log(format_row(records[-1]))
        if save is not None:
            save(records)

    copy_gb_s, read_gb_s = copy_bandwidth(), read_bandwidth()
    add(_record("copy", "copy", jax.default_backend(), None, achieved_gb_s=copy_gb_s,
                read_gb_s=read_gb_s, device=str(jax.devices()[0]), jax=jax.__version__),
        show=False)
    log(f"copy bandwidth {copy_gb_s:.1f} GB/s, matvec read bandwidth {read_gb_s:.1f} GB/s "
        f"({jax.devices()[0]})")
    start = time.perf_counter()
    model = random_model(cfg, settings.dtype, seed=settings.seed, quantize=settings.quantize)
    weights = settings.dtype if settings.quantize is None else f"{settings.quantize} weights, "\
        f"{settings.dtype} compute"
    log(f"built {settings.shape} x {cfg.num_hidden_layers} layers ({weights}) in "
        f"{time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(settings.seed)
    prompt = rng.integers(3, cfg.vocab_size, (1, PROMPT_TOKENS)).astype(np.int32)
    start = time.perf_counter()
    fits = fitted_alphas(model, prompt, settings) if "sparse" in settings.modes else {}
    if fits:
        log(f"fitted alphas in {time.perf_counter() - start:.1f} s")
    log(HEADER)
    if "dense" in settings.modes:
        add(decode_record(model, prompt, settings, "dense", "xla", None, copy_gb_s, read_gb_s))
    for backend in settings.backends if "sparse" in settings.modes else ():
        for target in settings.active:
            fit = fits[target]
            rec = decode_record(model, prompt, settings, "sparse", backend, fit["alphas"],
                                copy_gb_s, read_gb_s)
            add(dict(rec, requested_fraction=target, fitted_fraction=fit["fitted_fraction"],
                     alphas=[float(a) for a in fit["alphas"]]))
        if settings.kernels and settings.quantize is None:  # the kernel table times floats
            for target in settings.active:
                add(*kernel_records(model, settings, backend, target, copy_gb_s), show=False)
        for b in settings.batches:
            batch = rng.integers(3, cfg.vocab_size, (b, PROMPT_TOKENS)).astype(np.int32)
            alphas = fits[min(settings.active)]["alphas"]
            for mode in settings.modes:
                rec = decode_record(model, batch, settings, mode, backend, alphas, copy_gb_s,
                                    read_gb_s)
                add(dict(rec, kind="batch"))
    if settings.peer == "hf":
        add(hf_peer_record(model, prompt, settings, copy_gb_s))
    return records


def fitted_alphas(model: Llama, prompt: np.ndarray, settings: Settings) -> dict[float, dict]:
    """For each requested fraction: per-layer alphas fitted on decode-time MLP inputs.

    The inputs are those of `prompt[:1]` and its greedy dense continuation of `tokens` tokens.
    """
    dense = generate(model, prompt[:1], max_new_tokens=settings.tokens, mode="dense",
                     stop_at_eos=False, timing=False)
    ids = np.concatenate([prompt[:1], dense.tokens], axis=1)
    grid, fraction = decode_inputs_fraction(model, ids)
    out = {}
    for target in settings.active:
        alphas, got = fit_alphas(grid, fraction, target)
        out[target] = dict(alphas=alphas, fitted_fraction=float(np.mean(got)))
    return out
