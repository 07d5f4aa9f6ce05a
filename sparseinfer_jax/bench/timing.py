"""Timing helpers: medians and spreads, jitted loops (one dispatch for many calls), bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def spread(values: Sequence[float]) -> dict:
    """Median, quartiles, min and max of `values`."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return dict(median=statistics.median(values), q1=q1, q3=q3, min=min(values), max=max(values))


def time_calls(fn: Callable, *args, repeats: int) -> list[float]:
    """Seconds per call of `fn(*args)` (already jitted), `repeats` times after one warm-up."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - start)
    return out


def in_a_loop(fn: Callable, args: Sequence, calls: int) -> Callable:
    """jit of `fn(*args)` run `calls` times in one loop, each call after the last: a kernel's time
    inside a program, launch included, without Python's dispatch (on a GPU, dispatching one small
    call from Python costs more than the call: the gate matvec of a 7b layer took 168 us a call
    against 44 us in a loop on the H200). The loop carries args[0] and the call's first output
    through an optimization barrier and returns both, so no call is hoisted out or dropped."""
    first = lambda out: jax.tree.leaves(out)[0]  # noqa: E731
    out = jax.eval_shape(lambda *a: first(fn(*a)), *args)

    def run(x, *rest):
        def body(_, carry):
            x, _ = carry
            return lax.optimization_barrier((x, first(fn(x, *rest))))
        return lax.fori_loop(0, calls, body, (x, jnp.zeros(out.shape, out.dtype)))

    return jax.jit(run)


def time_in_a_loop(fn: Callable, args: Sequence, *, calls: int, repeats: int) -> list[float]:
    """Seconds per call of `fn(*args)` from `in_a_loop`, `repeats` times after one warm-up."""
    return [t / calls for t in time_calls(in_a_loop(fn, args, calls), *args, repeats=repeats)]


def copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of a jitted copy of an `nbytes` float32 array (bytes read + bytes written) / time."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    scale = jnp.float32(1.0)
    fn = jax.jit(lambda x, s: x * s)  # a multiply by data, so XLA cannot skip the copy
    return 2 * nbytes / statistics.median(time_calls(fn, x, scale, repeats=repeats)) / 1e9


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """GB/s of a jitted float32 matvec over an `nbytes` matrix (bytes read / time): the rate a
    decode step's weight reads can reach (on a CPU, XLA's elementwise copy may use one core)."""
    w = jnp.ones((nbytes // 4 // 2048, 2048), jnp.float32)
    x = jnp.ones((2048,), jnp.float32)
    return nbytes / statistics.median(time_calls(jax.jit(jnp.dot), w, x, repeats=repeats)) / 1e9
