"""One decode layer's sparse MLP pieces on a GPU, timed across block sizes: which launch shapes
read fastest at the 7b shape, and where the time between the kernels goes.

Each case runs `--calls` times inside one jitted loop (`bench.in_a_loop`: each call depends on
the last through an optimization barrier), so a figure is the kernel's time in a decode program,
launch included, without Python's dispatch. The active set is random, `--active` of F. Prints
one line per case: microseconds per call and GB/s of the bytes the case must read.

    python benchmarks/gpu_variants.py --json variants.json            # on a GPU (7b layer)
    python benchmarks/gpu_variants.py --d 256 --f 688 --calls 2       # CPU smoke check (interpret)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import backend as bk
from pallas_kernels.compact import compact_pallas, compact_xla
from pallas_kernels.predict import sign_predict_pallas
from pallas_kernels.signmag import signmag_pallas
from pallas_kernels.sparse_down import sparse_down_pallas
from pallas_kernels.sparse_gate_up import activate, matmul_t, sparse_gate_up_pallas
from pallas_kernels.sparse_mlp import sparse_mlp_xla
from sparseinfer_jax.bench.alphas import alpha_keeping
from sparseinfer_jax.bench.timing import time_in_a_loop


def time_case(fn, args, calls: int, repeats: int) -> float:
    """Median microseconds per call of fn(*args), `calls` calls a loop (`bench.in_a_loop`)."""
    return statistics.median(time_in_a_loop(fn, args, calls=calls, repeats=repeats)) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--f", type=int, default=11008)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--active", type=float, default=0.1)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    d, f, b = a.d, a.f, a.batch
    interpret = bk.interpret()
    rng = np.random.default_rng(0)
    dt, item = jnp.bfloat16, 2
    x = jnp.asarray(rng.standard_normal((b, d)), dt)
    gate, up, down_t = (jnp.asarray(rng.standard_normal((f, d)) / np.sqrt(d), dt) for _ in "gud")
    bits = pk.pack_sign_bits(gate)
    count = max(1, round(a.active * f))
    mask = np.zeros((f,), bool)
    mask[rng.choice(f, count, replace=False)] = True
    active = jnp.asarray(mask)
    idx, cnt = pk.compact(active)
    h = jnp.asarray(rng.standard_normal((b, f)) * (np.arange(f) < count), jnp.float32)
    words = bits.shape[1]
    alpha = alpha_keeping(x, bits, a.active)
    print(f"{jax.devices()[0]} jax {jax.__version__}: D={d} F={f} B={b} active {count} "
          f"({a.active:.0%}), {a.calls} calls a loop", flush=True)

    cases = [  # (name, fn(first, *rest), args, bytes it must read)
        ("dense gate matvec", lambda x, w: matmul_t(x, w), (x, gate), f * d * item),
        ("dense mlp", lambda x, g, u, w: (activate(matmul_t(x, g), "relu", 0.0)
                                          * matmul_t(x, u)).astype(dt) @ w,
         (x, gate, up, down_t), 3 * f * d * item),
        ("compact xla", compact_xla, (active,), f),
    ]
    for chunk in (1024, 4096, 16384):
        for nw in (4, 8, 16):
            cases.append((f"compact pallas chunk={chunk} warps={nw}", functools.partial(
                compact_pallas, chunk=chunk, num_warps=nw, interpret=interpret), (active,), f))
    for bf in (8, 16):
        for nw in (2, 4):
            cases.append((f"sign_predict block_f={bf} warps={nw}",
                          functools.partial(sign_predict_pallas, block_f=bf, num_warps=nw,
                                            interpret=interpret),
                          (x, bits, jnp.float32(1.0)), f * words * 4))
    for bf in (8, 16):
        cases.append((f"signmag block_f={bf}", functools.partial(
            signmag_pallas, block_f=bf, interpret=interpret), (x, bits), f * words * 4))
    for bn in (1, 2, 4):
        for nw in (2, 4):
            cases.append((f"gate_up block_n={bn} warps={nw}", functools.partial(
                sparse_gate_up_pallas, block_n=bn, num_warps=nw, interpret=interpret),
                (x, gate, up, idx, cnt), 2 * count * d * item))
    for prefetch in (False, True):
        for bd, ns, nw, bn in ((64, 24, 4, 16), (64, 24, 2, 16), (128, 24, 4, 16),
                               (256, 24, 4, 16), (64, 48, 4, 16), (64, 24, 4, 8),
                               (128, 48, 4, 8)):
            cases.append((f"down block_d={bd} splits={ns} warps={nw} n={bn} prefetch={prefetch}",
                          functools.partial(sparse_down_pallas, block_d=bd, num_splits=ns,
                                            num_warps=nw, block_n=bn, prefetch=prefetch,
                                            interpret=interpret),
                          (h, down_t, idx, cnt), count * d * item))

    def chain(x, alpha, bits, gate, up, down_t, backend):
        act, _ = pk.sign_predict(x, bits, alpha, backend=backend)
        i, c = pk.compact(act)
        return pk.sparse_mlp(x, gate, up, down_t, i, c, backend=backend)

    def fixed_set(x, gate, up, down_t, idx, cnt, backend):
        return pk.sparse_mlp(x, gate, up, down_t, idx, cnt, backend=backend)

    for backend in ("pallas", "xla"):
        cases.append((f"sparse_mlp {backend} (fixed set)",
                      functools.partial(fixed_set, backend=backend),
                      (x, gate, up, down_t, idx, cnt), 3 * count * d * item))
        cases.append((f"predict+compact+sparse_mlp {backend}",
                      functools.partial(chain, backend=backend),
                      (x, alpha, bits, gate, up, down_t), None))
    cases.append(("sparse_mlp xla (fixed set, direct)", functools.partial(
        sparse_mlp_xla, activation="relu", threshold=0.0), (x, gate, up, down_t, idx, cnt),
        3 * count * d * item))

    records = []
    for name, fn, args, nbytes in cases:
        try:
            us = time_case(fn, args, a.calls, a.repeats)
            gb_s = nbytes / (us * 1e-6) / 1e9 if nbytes else None
            rec = dict(name=name, us=us, bytes=nbytes, gb_s=gb_s)
            print(f"{name:<46} {us:9.2f} us" + (f"  {gb_s:8.1f} GB/s" if gb_s else ""),
                  flush=True)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a finding
            rec = dict(name=name, error=f"{type(e).__name__}: {str(e)[:200]}")
            print(f"{name:<46} FAILED {rec['error']}", flush=True)
        records.append(rec)
        if a.json:
            with open(a.json, "w") as out:
                json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, d=d, f=f,
                               batch=b, active=count, records=records), out, indent=1)


if __name__ == "__main__":
    main()
