"""SparseInfer's sign-bit predictor: which ReLU neurons will be zero, from sign bits alone.

The rule. `x: [B, D]` is the MLP input (after the post-attention RMSNorm), `W_gate: [F, D]`, its
sign bits packed as in `pack.py` (`w_bits: [F, W]`, W = ceil(D/32)). For row b and neuron i:
- n_nz(b) = number of non-zero x[b, j] (+0.0 and -0.0 are both zero);
- N_neg(b, i) = popcount((sign(x_b) XOR sign(W_i)) AND nonzero(x_b)) summed over the W words: the
  non-zero inputs whose product with W_i is negative (W = 0 counts as positive). Zero inputs never
  vote, and padding bits are 0 in both words so they never count;
- N_pos(b, i) = n_nz(b) - N_neg(b, i).
Neuron i is predicted zero for row b iff N_neg > alpha * N_pos, the paper's ratio form with
conservativeness alpha >= 0 (larger alpha = more conservative = fewer neurons skipped; alpha = 1
is a majority vote; alpha = +inf keeps every neuron). The product alpha * N_pos is evaluated in
float32 (alpha is a float32 array), exactly what `jnp` computes for the ratio form.

Kernels never evaluate the ratio: `threshold(alpha, n_nz)` returns the integer tau with
`N_neg > tau  <=>  N_neg > alpha * (n_nz - N_neg)` for every 0 <= N_neg <= n_nz, and every backend
compares `n_neg > tau`. Predicted active = not predicted zero; for a batch, `sign_predict` returns
the union over rows. alpha is data (an array), so changing it never recompiles.

Here: the rule's threshold, and the vote in plain XLA (packed XOR + popcount) and as the reference
(unpacked bits, integer matmuls). The Triton kernel is `gpu/predict.py`, the TPU one
`tpu/predict.py`; `layer.sign_predict` dispatches by backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.pack import (
    WORD_BITS,
    pack_nonzero_bits,
    pack_sign_bits,
)

# tau is found by checking the float32 ratio rule on a window around the estimate
# floor(alpha * n / (1 + alpha)): float error moves the estimate by well under one for any realistic
# n (< 2**20), and the float32 product alpha * N_pos can round across an integer, one more step.
_WINDOW = 2


@jax.jit
def threshold(alpha: jnp.ndarray, n_nonzero: jnp.ndarray) -> jnp.ndarray:
    """The integer form of the ratio rule: predicted zero iff `n_neg > threshold(alpha, n_nz)`.

    `threshold_rule` is the same function unjitted, for kernels that trace it in their body.

    Args:
      alpha: `[]` or `[L]` float32 conservativeness (>= 0; negative values act as 0; +inf keeps
        everything: tau = n_nonzero).
      n_nonzero: int32 count of non-zero inputs, broadcasting against `alpha`.

    Returns:
      int32 tau in [0, n_nonzero] (broadcast shape), the largest t with NOT(t > alpha * (n - t))
      in float32. Because that predicate only grows with t, `n_neg > tau` matches the ratio rule
      for every n_neg in [0, n].
    """
    return threshold_rule(alpha, n_nonzero)


def threshold_rule(alpha: jnp.ndarray, n_nonzero: jnp.ndarray) -> jnp.ndarray:
    """`threshold`'s body: plain jnp a Pallas kernel can trace. The estimate's division may be
    approximate there (Triton divides float32 with `div.full`, within 2 ulp); the window check
    that follows uses only multiplies and compares, so tau is exact either way."""
    alpha = jnp.maximum(jnp.asarray(alpha, jnp.float32), 0.0)
    n = jnp.asarray(n_nonzero, jnp.int32)
    nf = n.astype(jnp.float32)
    # The estimate's alpha stays under 1e30: `div.full` returns 0 for divisors over 2^126, and
    # every alpha that large has tau = n, which the window still finds.
    capped = jnp.minimum(alpha, 1e30)
    est = jnp.floor(capped * nf / (1.0 + capped))
    # inf / inf (alpha = +inf, or alpha * n overflowing) is NaN: the window below then settles it.
    est = jnp.where(jnp.isnan(est), nf, jnp.clip(est, 0.0, nf)).astype(jnp.int32)
    tau = est - _WINDOW - 1
    for j in range(-_WINDOW, _WINDOW + 1):
        t = est + j
        kept = ~(t.astype(jnp.float32) > alpha * (n - t).astype(jnp.float32))
        tau = tau + kept.astype(jnp.int32)
    return jnp.clip(tau, 0, n)


def x_words(x: jnp.ndarray, alpha: jnp.ndarray):
    """Packed sign and non-zero words `[B, W]` of x, and each row's tau `[B]`."""
    n_nz = jnp.sum(x != 0, axis=-1, dtype=jnp.int32)
    return pack_sign_bits(x), pack_nonzero_bits(x), threshold(alpha, n_nz)


def sign_predict_xla(x, w_bits, alpha):
    """Packed XOR + popcount in plain XLA: (active `[F]` bool, n_neg `[B, F]` int32)."""
    xs, xnz, tau = x_words(x, alpha)
    neg = (w_bits[None] ^ xs[:, None]) & xnz[:, None]
    n_neg = jnp.sum(lax.population_count(neg), axis=-1, dtype=jnp.int32)
    return jnp.any(~(n_neg > tau[:, None]), axis=0), n_neg


def sign_predict_reference(x, w_bits, alpha):
    """The rule on unpacked bits (no popcount): (active `[F]` bool, n_neg `[B, F]` int32)."""
    d = x.shape[-1]
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)
    w_neg = ((w_bits[..., None] >> shifts) & 1).reshape(w_bits.shape[0], -1)[:, :d]
    w_neg = w_neg.astype(jnp.int32)
    x_pos, x_neg = (x > 0).astype(jnp.int32), (x < 0).astype(jnp.int32)
    # A non-zero input votes negative iff its sign differs from the weight's (W = 0 is positive).
    n_neg = x_pos @ w_neg.T + x_neg @ (1 - w_neg).T
    tau = threshold(alpha, jnp.sum(x != 0, axis=-1, dtype=jnp.int32))
    return jnp.any(~(n_neg > tau[:, None]), axis=0), n_neg
