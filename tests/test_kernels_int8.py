"""int8 weights with per-row scales (`pallas_kernels/quant.py`): quantising, the int8 products
against the dequantised weight, every sparse MLP path against the reference on int8 rows, and no
weight-sized convert in a decode-like loop."""

from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import assert_close

import pallas_kernels as pk
from pallas_kernels import backend as bk
from pallas_kernels import layer, quant

# Odd sizes: D and F not multiples of 32, 64 (the chunk) or the conversion block.
CASES = [(1, 70, 45, jnp.float32), (3, 96, 203, jnp.bfloat16), (4, 130, 333, jnp.float32)]


def test_quantize_rows_bounds_and_zero_rows():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 53)).astype(np.float32)
    w[5] = 0.0
    q, s = quant.quantize_rows_numpy(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (37,)
    assert np.abs(q).max() == quant.QMAX
    assert np.all(q[5] == 0) and s[5] == 1.0
    # Round to nearest: each weight within half a step of its row's scale.
    assert np.all(np.abs(q * s[:, None] - w) <= s[:, None] / 2 * (1 + 1e-6))
    qj, sj = quant.quantize_rows(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_allclose(np.asarray(sj), s, rtol=1e-7)


def test_quantize_rows_numpy_reads_16_bit_weights_in_blocks():
    w = np.random.default_rng(1).standard_normal((2**21 // 64 + 7, 64)).astype(np.float32)
    q, s = quant.quantize_rows_numpy(jnp.asarray(w, jnp.bfloat16))
    q32, s32 = quant.quantize_rows_numpy(np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(q, q32)
    np.testing.assert_array_equal(s, s32)


@pytest.mark.parametrize("block_bytes", [None, 4 * 70 * 8])  # one block; 8-row blocks + a tail
@pytest.mark.parametrize("contract", [0, 1])
@pytest.mark.parametrize("n", [1, 5])
def test_dot_equals_the_dequantised_product(monkeypatch, block_bytes, contract, n):
    if block_bytes is not None:
        monkeypatch.setattr(quant, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(2)
    rows, cols = 45, 70
    q, s = quant.quantize_rows_numpy(rng.standard_normal((rows, cols)).astype(np.float32))
    w = np.asarray(q, np.float64) * s[:, None]
    k = cols if contract == 1 else rows
    x = rng.standard_normal((n, k)).astype(np.float32)
    got = quant.dot(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), contract)
    want = x @ (w.T if contract == 1 else w)
    assert got.dtype == jnp.float32
    assert_close(got, want, jnp.float32)


def weights(b, d, f, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, d)), dtype)
    floats = [rng.standard_normal((f, d)).astype(np.float32) for _ in range(3)]
    bits = pk.pack_sign_bits_numpy(floats[0])  # from the unquantised gate, as the converter does
    pairs = [quant.quantize_rows_numpy(w) for w in floats]
    return (x, *(jnp.asarray(q) for q, _ in pairs), jnp.asarray(bits),
            tuple(jnp.asarray(s) for _, s in pairs))


@pytest.mark.parametrize("backend", ["xla", "portable"])
@pytest.mark.parametrize("predictor", ["sign", "signmag", "oracle"])
@pytest.mark.parametrize("b,d,f,dtype", CASES)
def test_int8_paths_match_the_reference(backend, predictor, b, d, f, dtype):
    x, gate, up, down_t, bits, scales = weights(b, d, f, dtype)
    kw = dict(predictor=predictor, activation="relu", scales=scales)
    want, want_counts = pk.sparse_mlp_layer(x, gate, up, down_t, bits, 1.0, backend="reference",
                                            **kw)
    got, counts = pk.sparse_mlp_layer(x, gate, up, down_t, bits, 1.0, backend=backend, **kw)
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
    assert_close(got, np.asarray(want.astype(jnp.float32), np.float64), dtype)


@pytest.mark.parametrize("backend", ["xla", "portable"])
def test_int8_dense_branches_match_the_reference(backend):
    """alpha = inf keeps every neuron: both stages take their dense branch (`quant.dot`)."""
    x, gate, up, down_t, bits, scales = weights(2, 96, 203, jnp.float32, seed=3)
    want, _ = pk.sparse_mlp_layer(x, gate, up, down_t, bits, jnp.inf, backend="reference",
                                  scales=scales)
    got, counts = pk.sparse_mlp_layer(x, gate, up, down_t, bits, jnp.inf, backend=backend,
                                      scales=scales)
    assert int(counts[1]) == 203
    assert_close(got, np.asarray(want, np.float64), jnp.float32)


def test_reference_is_the_float_layer_on_dequantised_weights():
    x, gate, up, down_t, bits, scales = weights(3, 70, 45, jnp.float32, seed=4)
    floats = [quant.dequantize(w, s) for w, s in zip((gate, up, down_t), scales, strict=True)]
    want, want_counts = pk.sparse_mlp_layer(x, *floats, bits, 1.0, backend="reference")
    got, counts = pk.sparse_mlp_layer(x, gate, up, down_t, bits, 1.0, backend="reference",
                                      scales=scales)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))


def test_paths_without_int8_fall_back_to_portable_once(monkeypatch):
    monkeypatch.setattr(bk, "_SAID", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert layer.int8_path("pallas") == "portable"
        assert layer.int8_path("pallas") == "portable"
        assert layer.int8_path("xla") == "xla"
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1 and "int8" in str(said[0].message)


@pytest.mark.parametrize("case", ["no scales", "scales for floats", "scale shape"])
def test_bad_scales_are_refused(case):
    x, gate, up, down_t, bits, scales = weights(1, 70, 45, jnp.float32)
    if case == "no scales":
        scales = None
    elif case == "scales for floats":
        gate, up, down_t = (quant.dequantize(w, s)
                            for w, s in zip((gate, up, down_t), scales, strict=True))
    else:
        scales = (scales[0][:-1], *scales[1:])
    with pytest.raises((ValueError, AssertionError)):
        pk.sparse_mlp_layer(x, gate, up, down_t, bits, 1.0, backend="xla", scales=scales)


def weight_sized_converts(text: str, rows: int, cols: int) -> list[str]:
    shape = re.compile(rf"\[({rows},{cols}|{cols},{rows})\]")
    return [line for line in text.splitlines() if " convert(" in line and shape.search(line)]


@pytest.mark.parametrize("backend", ["dense", "xla", "portable"])
def test_no_weight_sized_convert_in_a_decode_loop(monkeypatch, backend):
    """The optimised HLO of a loop over steps (as the decode loop is) converts no int8 weight
    to a float whole, inside the loop or hoisted out of it (blocks of 128 rows here)."""
    b, d, f = 1, 256, 1536
    monkeypatch.setattr(quant, "BLOCK_BYTES", 4 * d * 128)
    jax.clear_caches()
    x, gate, up, down_t, bits, scales = weights(b, d, f, jnp.float32, seed=5)

    def step(x, gate, up, down_t, bits, scales):
        if backend == "dense":
            h = jnp.maximum(quant.dot(x, gate, scales[0], 1), 0) * quant.dot(x, up, scales[1], 1)
            return quant.dot(h, down_t, scales[2], 0)
        return pk.sparse_mlp_layer(x, gate, up, down_t, bits, 1.0, backend=backend,
                                   scales=scales)[0]

    @jax.jit
    def loop(x, gate, up, down_t, bits, scales):
        body = lambda i, x: x + 1e-3 * step(x, gate, up, down_t, bits, scales)  # noqa: E731
        return jax.lax.fori_loop(0, 3, body, x)

    text = loop.lower(x, gate, up, down_t, bits, scales).compile().as_text()
    assert weight_sized_converts(text, f, d) == []
