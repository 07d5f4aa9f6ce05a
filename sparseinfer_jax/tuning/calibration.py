"""Per-layer alpha calibration: the most skipping alpha that meets a recall or sparsity target.

The model runs densely over non-overlapping windows of a text. For every layer and every token we
take the MLP input x (after the post-attention RMSNorm), the layer predictor's negative votes
n_neg `[N, F]` and vote totals n `[N]` (`MLP.votes`: for "sign" the negative-product counts and
the non-zero inputs; for "signmag" the same weighted by quantised |x|) and the true active mask
(act(gate x) * (up x) != 0).
For a grid of candidate alphas (`ALPHA_GRID`: 0.01 .. 4.00 step 0.01, then +inf) we count, exactly
as the model's rule does (`pallas_kernels.predict.threshold`: predicted active iff n_neg <= tau):
predicted-active neurons and neurons both predicted and truly active, summed over tokens.

Per layer, over all (token, neuron) pairs of the text, recall (missing a true activation changes
the output) and predicted sparsity as `metrics.layer_metrics` defines them.

Both only grow (recall) or shrink (sparsity) with alpha, so the choice per layer is:
- `target_recall=R`: the smallest grid alpha whose recall >= R (most skipping that meets R);
- `target_sparsity=S`: the smallest grid alpha whose predicted sparsity <= S, i.e. the largest
  sparsity not above S (never more aggressive than asked).
- `max_ppl_increase=P` (percent): perplexity depends on all layers at once, so the search runs
  over the recall-target family above: for a recall level R every layer takes its smallest alpha
  with recall >= R, and a bisection over R (`RECALL_LEVELS`) finds the lowest R whose sparse-mode
  perplexity on the same text is at most dense * (1 + P/100). R = 1 always qualifies (no truly
  active neuron is dropped on this text, so the output is the dense one). About 7 perplexity runs.
+inf (keep every neuron) always qualifies. A config.json cannot hold inf in strict JSON, so it is
written as `KEEP_ALL_ALPHA` (1e9), which keeps every neuron for any realistic width.

Safe from the first run: a checkpoint's `sparseinfer` block records how its alphas were chosen
under "calibration" (the marker; absent = never calibrated). `sparseinfer-convert` calibrates by
default (`calibrate_checkpoint`: `DEFAULT_RECALL` per layer on `DEFAULT_TEXT`, a short general
English text shipped with the package, in the model's own tokenizer), and `load(mode="sparse")` of
a checkpoint without the marker calibrates the same way in memory, with a warning
(`calibrate_in_memory`), rather than run the untuned alpha 1.0.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.predict import threshold
from pallas_kernels.signmag import quantise
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.io.text import check_windows, read_text, token_windows
from sparseinfer_jax.model.config import PREDICTORS
from sparseinfer_jax.model.metrics import layer_metrics, mlp_weights, predictor_share
from sparseinfer_jax.model.mlp import set_predictor
from sparseinfer_jax.model.positions import full_causal_inputs
from sparseinfer_jax.model.rope import rope_tables

ALPHA_GRID = np.concatenate([np.round(np.arange(1, 401) * 0.01, 2), [np.inf]]).astype(np.float32)
KEEP_ALL_ALPHA = 1e9
RECALL_LEVELS = np.round(np.linspace(0.0, 1.0, 201), 3)  # searched by max_ppl_increase
DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "calibration.txt")
# Conservative: on the shipped model recall 0.99 keeps greedy output on dense's (tests) while
# still skipping about half of the neurons.
DEFAULT_RECALL = 0.99
# Fewer tokens than MIN_TOKENS give per-layer recall counted on a handful of activations: refused.
# Fewer than FEW_TOKENS are allowed (quick checks, tests) with a warning.
MIN_TOKENS, FEW_TOKENS = 64, 1000
log = logging.getLogger(__name__)


def votes_by_matmul(bits, rows, kinds: tuple[str, ...]):
    """Negative votes `[K, N, F]` and vote totals `[K, N]` (int32) of each predictor of `kinds`
    for `rows: [N, D]`, the counts `MLP.votes` gives, from `bits: [F, W]` packed sign bits.

    The rule of `pallas_kernels`' references (`sign_predict_reference`, `signmag_reference`) as
    one float32 matmul for all kinds: with v each input's vote weight (1 for "sign", the quantised
    |x| for "signmag"), n_neg = sum of v over negative inputs + (v over positive inputs - v over
    negative inputs) . w_neg. Exact: every sum is an integer below 2^24. Over a window of rows
    this costs about one gate matmul, where XOR and popcount over `[N, F, W]` words cost several.
    """
    d = rows.shape[-1]
    shifts = jnp.arange(32, dtype=jnp.uint32)
    w_neg = ((bits[..., None] >> shifts) & 1).reshape(bits.shape[0], -1)[:, :d]
    v = jnp.stack([(rows != 0).astype(jnp.int32) if k == "sign" else quantise(rows)
                   for k in kinds]).astype(jnp.float32)  # [K, N, D]
    neg = v * (rows < 0)
    n_neg = jnp.einsum("knd,fd->knf", v * (rows > 0) - neg, w_neg.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    n_neg = n_neg + jnp.sum(neg, axis=-1, keepdims=True)
    return jnp.round(n_neg).astype(jnp.int32), jnp.sum(v, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=["kinds"])
def _layer_counts(layer, x, cos, sin, mask, alphas, kinds):
    """One layer of `window_counts`: (x after the layer, its counts). Compiled once for all the
    layers (they share one structure), so compile time does not grow with depth."""
    b, t = x.shape[:2]
    g = alphas.shape[0]
    attn, _ = layer.self_attn(layer.input_layernorm(x), cos, sin, mask, None, None)
    x = x + attn
    rows = layer.post_attention_layernorm(x).reshape(b * t, -1)
    h = layer.mlp.hidden(rows)
    true = (h != 0).ravel().astype(jnp.int32)
    n_negs, totals = votes_by_matmul(layer.mlp.gate_sign_bits[...], rows, kinds)
    predicted, both = [], []
    for n_neg, total in zip(n_negs, totals, strict=True):
        tau = threshold(alphas[None, :], total[:, None])  # [N, G], ascending in G
        # First grid index whose tau admits n_neg: the neuron is predicted active from there on.
        first = jax.vmap(lambda tr, nr: jnp.searchsorted(tr, nr, side="left"))(tau, n_neg)
        hist_all = jnp.bincount(first.ravel(), length=g + 1)[:g]
        hist_true = jnp.bincount(first.ravel(), weights=true, length=g + 1)[:g]
        predicted.append(jnp.cumsum(hist_all).astype(jnp.int32))
        both.append(jnp.cumsum(hist_true).astype(jnp.int32))
    x = x + layer.mlp.down(h).reshape(x.shape)
    return x, (jnp.stack(predicted), jnp.stack(both), jnp.sum(true, dtype=jnp.int32),
               jnp.int32(b * t))


def window_counts(model, input_ids, alphas, kinds: tuple[str, ...] | None = None):
    """Replays the decoder stack densely over `input_ids: [1, T]`.

    Returns per layer (stacked on a leading L axis): predicted-active counts and both-active
    counts for each alpha of `alphas: [G]` (sorted ascending), `[L, G]` for the model's predictor
    or, given `kinds`, `[L, K, G]` for each of those predictors (one replay serves them all);
    truly active count `[L]` and rows `[L]` (all int32).
    """
    one = kinds is None
    kinds = (model.sparsity.predictor,) if one else tuple(kinds)
    b, t = input_ids.shape
    positions, mask = full_causal_inputs(b, t)
    cos, sin = rope_tables(model.config, positions)
    x = model.embed_tokens(input_ids)
    out = []
    for layer in model.layers:
        x, counts = _layer_counts(layer, x, cos, sin, mask, alphas, kinds)
        out.append(counts)
    predicted, both, true, rows = (jnp.stack(c) for c in zip(*out, strict=True))
    if one:
        predicted, both = predicted[:, 0], both[:, 0]
    return predicted, both, true, rows


@dataclasses.dataclass
class Calibration:
    """The grid statistics over a text and the chosen alpha per layer."""

    alphas: list[float]  # chosen, per layer (inf = keep all)
    recall: list[float]  # at the chosen alpha
    predicted_sparsity: list[float]
    tokens: int
    grid: np.ndarray  # [G]
    grid_recall: np.ndarray  # [L, G]
    grid_sparsity: np.ndarray  # [L, G]
    dense_perplexity: float | None = None  # with max_ppl_increase: on the calibration text
    perplexity: float | None = None  # sparse mode at the chosen alphas
    predictor: str = "sign"
    # Per layer at the chosen alphas: MLP bytes read per token over dense (`metrics.bytes_fraction`:
    # sign bits, gate rows of the predicted, up and down rows of the predicted truly active).
    mlp_bytes_fraction: list[float] = dataclasses.field(default_factory=list)

    @property
    def mean_bytes(self) -> float:
        return float(np.mean(self.mlp_bytes_fraction))

    def config_alphas(self) -> list[float]:
        """The alphas as written to config.json (inf -> KEEP_ALL_ALPHA)."""
        return [a if math.isfinite(a) else KEEP_ALL_ALPHA for a in self.alphas]


def check_targets(
    target_recall: float | None,
    target_sparsity: float | None,
    max_ppl_increase: float | None = None,
) -> None:
    given = [t for t in (target_recall, target_sparsity, max_ppl_increase) if t is not None]
    if len(given) != 1:
        raise UserError(
            "give exactly one of --target-recall, --target-sparsity and --max-ppl-increase."
        )
    if max_ppl_increase is not None and not (0.0 <= max_ppl_increase <= 1000.0):
        raise UserError(
            f"--max-ppl-increase is a percentage in [0, 1000], got {max_ppl_increase}."
        )
    if target_recall is not None and not (0.0 < target_recall <= 1.0):
        raise UserError(f"--target-recall must be in (0, 1], got {target_recall}.")
    if target_sparsity is not None and not (0.0 <= target_sparsity < 1.0):
        raise UserError(f"--target-sparsity must be in [0, 1), got {target_sparsity}.")


def calibrate(
    model,
    windows,
    *,
    target_recall: float | None = None,
    target_sparsity: float | None = None,
    max_ppl_increase: float | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> Calibration:
    """Chooses one alpha per layer (see the module docstring) from dense runs over `windows`,
    for the model's predictor.

    Exactly one target: `target_recall` in (0, 1], `target_sparsity` in [0, 1), or
    `max_ppl_increase` in percent (`backend` is the sparse kernels' for its perplexity runs).
    """
    return _calibrate_kinds(
        model, windows, (model.sparsity.predictor,), target_recall=target_recall,
        target_sparsity=target_sparsity, max_ppl_increase=max_ppl_increase, backend=backend,
        progress=progress)[0]


def calibrate_predictors(model, windows, predictors=PREDICTORS, **kwargs) -> list[Calibration]:
    """`calibrate` for each predictor kind (one dense replay of the text serves them all); sets
    the model to the one reading the fewest MLP bytes at the target (its alphas too) and returns
    every calibration, that one first."""
    cals = _calibrate_kinds(model, windows, tuple(predictors), **kwargs)
    cals.sort(key=lambda c: c.mean_bytes)
    set_predictor(model, cals[0].predictor)
    model.set_alphas(cals[0].alphas)
    return cals


def _calibrate_kinds(
    model,
    windows,
    kinds: tuple[str, ...],
    *,
    target_recall: float | None = None,
    target_sparsity: float | None = None,
    max_ppl_increase: float | None = None,
    backend: str = "auto",
    progress: bool = False,
) -> list[Calibration]:
    """`calibrate` for each predictor of `kinds`, in that order."""
    check_targets(target_recall, target_sparsity, max_ppl_increase)
    windows = list(windows)
    check_windows(model.config, windows)
    tokens = sum(w.shape[1] for w in windows)
    if tokens < MIN_TOKENS:
        raise UserError(
            f"calibrating on {tokens} tokens would choose alphas from noise; give a text of at "
            f"least {MIN_TOKENS} tokens (thousands are better; a --max-tokens, if given, no "
            "smaller)."
        )
    if tokens < FEW_TOKENS:
        log.warning(
            "calibrating on only %d tokens; alphas from fewer than %d are rough, a "
            "longer text gives steadier ones.", tokens, FEW_TOKENS
        )
    grid = jnp.asarray(ALPHA_GRID)
    layers = model.config.num_hidden_layers
    predicted = np.zeros((layers, len(kinds), len(ALPHA_GRID)), np.float64)
    both = np.zeros_like(predicted)
    true = np.zeros((layers,), np.float64)
    rows = 0
    replay = windows
    if progress:
        from tqdm import tqdm

        replay = tqdm(windows, desc="calibrate", unit="window")
    for ids in replay:
        p, bo, tr, r = jax.device_get(window_counts(model, ids, grid, kinds))
        predicted += p
        both += bo
        true += tr
        rows += int(r[0])
    kind = model.sparsity.predictor
    try:
        return [
            _choose(model, windows, k, predicted[:, i], both[:, i], true, rows, target_recall,
                    target_sparsity, max_ppl_increase, backend, progress)
            for i, k in enumerate(kinds)
        ]
    finally:
        set_predictor(model, kind)


def _choose(model, windows, kind, predicted, both, true, rows, target_recall, target_sparsity,
            max_ppl_increase, backend, progress) -> Calibration:
    """The Calibration of predictor `kind` from its grid counts `[L, G]` over `windows`."""
    f = model.config.intermediate_size
    share = predictor_share(model.config, *mlp_weights(model))
    metrics = layer_metrics(rows, predicted, true[:, None], both, neurons=f, share=share)
    grid_recall, grid_sparsity = metrics["recall"], metrics["predicted_sparsity"]
    dense_ppl = ppl = None
    if target_sparsity is not None:
        idx = _first_ok(grid_sparsity <= target_sparsity + 1e-12)
    elif target_recall is not None:
        idx = _recall_index(grid_recall, target_recall)
    else:
        set_predictor(model, kind)
        idx, dense_ppl, ppl = _perplexity_search(
            model, windows, grid_recall, max_ppl_increase, backend, progress
        )
    pick = lambda a: [float(a[i, j]) for i, j in enumerate(idx)]  # noqa: E731
    return Calibration(
        alphas=[float(ALPHA_GRID[j]) for j in idx],
        recall=pick(grid_recall),
        predicted_sparsity=pick(grid_sparsity),
        tokens=rows,
        grid=ALPHA_GRID,
        grid_recall=grid_recall,
        grid_sparsity=grid_sparsity,
        dense_perplexity=dense_ppl,
        perplexity=ppl,
        predictor=kind,
        mlp_bytes_fraction=pick(metrics["mlp_bytes_fraction"]),
    )


def _first_ok(ok: np.ndarray) -> np.ndarray:
    """Per layer, the first grid index where `ok: [L, G]` holds (+inf, the last, always does)."""
    ok = ok.copy()
    ok[:, -1] = True  # +inf keeps everything: recall 1, sparsity 0
    return np.argmax(ok, axis=1)


def _recall_index(grid_recall: np.ndarray, target: float) -> np.ndarray:
    # float32 counts could make 0.99 print as 0.98999...: compare with a hair of slack.
    return _first_ok(grid_recall >= target - 1e-12)


def _perplexity_search(model, windows, grid_recall, max_increase, backend, progress):
    """Bisection over RECALL_LEVELS for the lowest recall level within the perplexity budget.

    Returns (grid index per layer, dense perplexity, sparse perplexity there).
    """
    from sparseinfer_jax.tuning.evaluation import perplexity

    dense = perplexity(model, windows, mode="dense", backend=backend)
    budget = dense * (1.0 + max_increase / 100.0)
    base = model.alphas()
    cache: dict[int, float] = {}

    def sparse_ppl(level: int) -> float:
        if level not in cache:
            idx = _recall_index(grid_recall, RECALL_LEVELS[level])
            model.set_alphas(ALPHA_GRID[idx])
            cache[level] = perplexity(model, windows, mode="sparse", backend=backend)
        return cache[level]

    # Invariant: level `hi` meets the budget (the top level, recall 1, gives dense output).
    lo, hi = -1, len(RECALL_LEVELS) - 1
    steps = int(np.ceil(np.log2(len(RECALL_LEVELS))))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="perplexity search", unit="eval")
    try:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sparse_ppl(mid) <= budget:
                hi = mid
            else:
                lo = mid
            if bar is not None:
                bar.update()
    finally:
        model.set_alphas(base)
        if bar is not None:
            bar.close()
    ppl = cache.get(hi, dense)
    return _recall_index(grid_recall, RECALL_LEVELS[hi]), dense, ppl


def format_table(cal: Calibration) -> str:
    lines = [f"{'layer':>5}  {'alpha':>6}  {'pred. sparsity':>14}  {'recall':>7}  {'MLP bytes':>9}"]
    rows = zip(cal.alphas, cal.predicted_sparsity, cal.recall, cal.mlp_bytes_fraction, strict=True)
    for i, (a, s, r, b) in enumerate(rows):
        lines.append(f"{i:>5}  {a:>6.2f}  {s:>14.4f}  {r:>7.4f}  {b:>9.4f}")
    return "\n".join(lines)


def calibrate_default(model, tokenizer, *, progress: bool = False
                      ) -> tuple[Calibration, str, float]:
    """Calibrates `model` for `DEFAULT_RECALL` on `DEFAULT_TEXT` (`calibrate_predictors`) and
    sets its predictor and alphas; `progress` shows a bar with the time left.

    Returns (the calibration, its description for the config's "calibration" marker, seconds).
    """
    start = time.perf_counter()
    windows = token_windows(tokenizer.encode(read_text(DEFAULT_TEXT)))
    cal = calibrate_predictors(model, windows, target_recall=DEFAULT_RECALL,
                               progress=progress)[0]
    note = (
        f"recall >= {DEFAULT_RECALL} on the built-in text ({cal.tokens} tokens), "
        f"predictor {cal.predictor}"
    )
    return cal, note, time.perf_counter() - start


def calibrate_in_memory(model, tokenizer, where: str) -> None:
    """For `load` in a sparse mode of a never-calibrated checkpoint: calibrates (or, without a
    tokenizer, cannot) and says so loudly."""
    hint = "run `sparseinfer calibrate` to choose and save alphas for your text"
    if tokenizer is None:
        warnings.warn(
            f"{where} was never calibrated and has no tokenizer to calibrate with: sparse mode "
            f"runs at alpha 1.0, which can change the output; {hint}.",
            stacklevel=3,
        )
        return
    cal, note, seconds = calibrate_default(model, tokenizer)
    alphas = ",".join(f"{a:g}" for a in cal.alphas)
    warnings.warn(
        f"{where} was never calibrated: calibrated now for {note} in {seconds:.1f} s "
        f"(alpha {alphas}, not saved); {hint}.",
        stacklevel=3,
    )
