"""RoPE positions and the causal mask, built once for prefill, decode and full forwards."""

from __future__ import annotations

import numpy as np
import pytest

from sparseinfer_jax.model.positions import causal_inputs, full_causal_inputs


def _reference(pad: np.ndarray, query_slots: np.ndarray, num_slots: int):
    """Loops: a real token's position counts the real tokens before it; it sees real slots up to
    its own."""
    b, t = len(pad), len(query_slots)
    positions = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t, num_slots), bool)
    for r in range(b):
        for i, q in enumerate(query_slots):
            positions[r, i] = max(q - pad[r], 0)
            for s in range(num_slots):
                mask[r, i, s] = pad[r] <= s <= q
    return positions, mask


@pytest.mark.parametrize("b, p, n", [(1, 5, 3), (3, 7, 4), (2, 1, 1)])
def test_prefill_and_decode_match_reference(b, p, n):
    rng = np.random.default_rng(b * 100 + p)
    pad = rng.integers(0, p, b).astype(np.int32)
    for query in (np.arange(p), np.array([p + rng.integers(0, n)])):  # prefill, one decode step
        positions, mask = causal_inputs(pad, query, p + n)
        ref_positions, ref_mask = _reference(pad, query, p + n)
        np.testing.assert_array_equal(np.asarray(positions), ref_positions)
        np.testing.assert_array_equal(np.asarray(mask), ref_mask)


def test_full_forward_is_arange_and_tril():
    positions, mask = full_causal_inputs(2, 6)
    np.testing.assert_array_equal(np.asarray(positions), np.tile(np.arange(6), (2, 1)))
    np.testing.assert_array_equal(np.asarray(mask), np.broadcast_to(np.tri(6, dtype=bool),
                                                                     (2, 6, 6)))
