"""loop_ops.decode_loop_ops on programs compiled here for the CPU (toy decode loops at tiny
shapes) and on hand-written HLO for what a CPU compile does not show (TPU layouts, branches,
nested loops, a prefill beside the loop)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from sparseinfer_jax.bench.loop_ops import MIN_ROWS, decode_loop_ops

D, F = 256, 1024
STEPS = 3


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower().compile().as_text()


def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def decode(step):
    """A decode loop: `step(x, w) -> x` run STEPS times with the weight `w: [F, D]`."""
    return lambda x, w: jax.lax.fori_loop(0, STEPS, lambda i, x: step(x, w), x)


def widened(x, w):
    """Each step reads a float32 copy of the bf16 weight (XLA hoists the convert)."""
    y = x.astype(jnp.float32) @ w.astype(jnp.float32).T
    return y[:, :D].astype(x.dtype)


def native(x, w):
    """Each step multiplies the bf16 weight as it is (two rows: XLA CPU's native bf16 dot)."""
    rows = jnp.pad(x, ((0, 1), (0, 0)))
    y = jax.lax.dot_general(rows, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y[:1, :D].astype(x.dtype)


def gathered(n_rows):
    """Each step gathers `n_rows` rows chosen by x and multiplies them in float32."""
    def step(x, w):
        ids = (jnp.arange(n_rows) * 7 + x[0, 0].astype(jnp.int32)) % F
        # Else XLA CPU gathers from a float32 copy of the whole table (design.md, bf16 on the CPU)
        w, ids = jax.lax.optimization_barrier((w, ids))
        rows = jnp.take(w, ids, axis=0).astype(jnp.float32)  # [n_rows, D] float32
        y = (x.astype(jnp.float32) @ rows.T) @ rows
        return (y / n_rows).astype(x.dtype)
    return step


def ops(fn, w_shape=(F, D), x_shape=(1, D), dtype=jnp.bfloat16, **kw):
    text = compiled_text(decode(fn), sds(x_shape, dtype), sds(w_shape, dtype))
    rows, cols = w_shape
    return decode_loop_ops(text, weight_bytes=rows * cols * jnp.dtype(dtype).itemsize,
                           row_elems=cols, **kw)


def test_a_bf16_weight_widened_every_step_is_listed_as_hoisted():
    (op,) = ops(widened)
    assert (op.why, op.where, op.shape, op.bytes) == ("weight copy", "hoisted", f"f32[{F},{D}]",
                                                      F * D * 4)
    assert "test_loop_ops.py:" in op.origin and op.origin.endswith("(widened)")
    assert "convert_element_type" in op.op_name


def test_a_weight_read_as_it_is_lists_nothing():
    assert ops(native) == []


def test_float32_weights_read_as_they_are_list_nothing():
    """A dot that reads a weight and writes less than it is the step's work, not a copy."""
    assert ops(widened, dtype=jnp.float32) == []


@pytest.mark.parametrize("n_rows, listed", [(MIN_ROWS + 44, True), (64, False)])
def test_gathered_rows_widened_to_float32_are_listed_from_min_rows(n_rows, listed):
    found = ops(gathered(n_rows))
    assert [(op.why, op.where) for op in found] == ([("float32 rows", "loop")] if listed else [])
    if listed:
        assert found[0].shape == f"f32[{n_rows},{D}]"


@pytest.mark.parametrize("w_shape", [(257, 129), (3, 5)])
def test_odd_and_tiny_weights_widened_are_listed(w_shape):
    rows, cols = w_shape

    def step(x, w):
        y = x.astype(jnp.float32) @ w.astype(jnp.float32).T
        return (x.astype(jnp.float32) + y.sum()).astype(x.dtype)
    (op,) = ops(step, w_shape, (1, cols))
    assert op.why == "weight copy" and op.shape == f"f32[{rows},{cols}]"


def test_a_program_without_a_loop_lists_nothing():
    text = compiled_text(lambda x, w: x.astype(jnp.float32) @ w.astype(jnp.float32).T,
                         sds((1, D)), sds((F, D)))
    assert decode_loop_ops(text, weight_bytes=F * D * 2, row_elems=D) == []


def test_a_weight_under_weight_bytes_is_no_weight():
    """Parameters smaller than the smallest weight (tokens, a cache) are not weights."""
    text = compiled_text(decode(widened), sds((1, D)), sds((F, D)))
    assert decode_loop_ops(text, weight_bytes=F * D * 2 + 1, row_elems=D) == []


# What a TPU compile prints, written by hand: tiled layouts, a re-layout of the weight (bf16 to
# uint32 pairs) in the loop body, a weight widened in a branch of it and rows in an inner loop; the
# decode loop is the bigger of two loops; the prefill converts the weight without passing the copy
# into the loop, a hoisted convert is passed in through a copy, the weight's even columns through
# a copy into VMEM; a big iota reads no weight, a Mosaic kernel multiplies.
HAND_WRITTEN = os.path.join(os.path.dirname(__file__), "hlo", "decode_loop_tpu_like.hlo")


def test_hand_written_tpu_like_module():
    with open(HAND_WRITTEN) as f:
        hlo = f.read()
    found = {op.name: op for op in decode_loop_ops(hlo, weight_bytes=1024 * 256 * 2,
                                                   row_elems=256)}
    assert {n: (op.where, op.why) for n, op in found.items()} == {
        "relaid": ("loop", "weight copy"),  # a re-layout, every step
        "widen": ("loop", "weight copy"),  # in a branch of the step
        "rows": ("loop", "float32 rows"),  # in a loop inside the step
        "hoist": ("hoisted", "weight copy"),  # passed into the loop
        "hoist_copy": ("hoisted", "weight copy"),
        "even": ("hoisted", "weight copy"),  # half of it, passed in as uint16
    }  # not: the prefill's copy, the big iota (no weight read), a kernel's output, the copy kept
    # in VMEM (S(1): a step reads it there), parameters, tuples, the bitcast-convert (bits
    # reinterpreted)
    assert found["relaid"].shape == "u32[1024,128]" and found["relaid"].bytes == 1024 * 256 * 2
    assert found["relaid"].op_name == "jit(g)/while/body/tpu_rows"
