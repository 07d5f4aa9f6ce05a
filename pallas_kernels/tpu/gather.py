"""The two stages of the sparse MLP as Pallas TPU (Mosaic) kernels: weight rows fetched by id.

Stage 1 (`tpu_gate`): the activated gate act(gate[idx[k]] . x) of the candidates k < count.
Stage 2 (`tpu_up_down`): sum over fired k < n of a[:, k] * (up[rows[k]] . x) * down_t[rows[k]].
Between them the caller finds the fired candidates and compacts them (`layer.py`).

How a kernel reads rows. The ids and the count are scalar-prefetched into SMEM; the weights stay
in HBM (pinned there, so XLA does not copy them into VMEM first). One program walks the live ids
in blocks of `block` neurons with a loop whose trip count is ceil(count / block), so the work
follows the count and no capacity can drop a neuron. Each neuron's row is its own async copy
(DMA) from HBM into a VMEM buffer; blocks of 8 or 16 neighbouring rows would read the inactive
neighbours too. Two buffers: while block j is computed, block j + 1's copies are in flight. Rows
past the count are never copied. Products go to the MXU (`[B, D] x [block, D]^T`), sums are
float32 in VMEM.

Row layout: `layout.py` (bfloat16 rows as uint32 column pairs, made once where the model keeps
the weights).

Reference the tests compare both stages against: `xla.chunk_loop.two_stage_reference` (all F rows
gathered through the ids, masked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import pltpu
from pallas_kernels.contract import activate
from pallas_kernels.tpu.common import interpret_mode
from pallas_kernels.tpu.layout import unpack, x_parts

# Neurons a block: their copies are in flight together (64 x 8 KiB rows = 512 KiB at the 7b
# shape in bfloat16, twice that double-buffered), and one MXU product covers them.
BLOCK = 64


def _dot(a, b, contract: int):
    """`a: [M, K]` times `b` (`[N, K]` with contract=1, `[K, N]` with 0) -> `[M, N]` float32.

    float32 operands ask for full float32 products (Mosaic's default is fewer bf16 passes);
    bf16 products are exact on the MXU already, and Mosaic refuses the flag for them: DEFAULT is
    explicit so that JAX_DEFAULT_MATMUL_PRECISION=highest does not ask for it anyway.
    """
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, (((1,), (contract,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _matvec(x_ref, rows):
    """x . rows^T summed over the parts: `[B, n]` float32."""
    parts = unpack(rows, x_ref.dtype)
    return functools.reduce(jnp.add, [_dot(x_ref[p], w, 1) for p, w in enumerate(parts)])


class _RowCopies:
    """The async copies of one block of rows: `ids_ref[start + i]` -> `buf[slot, i]` for the
    live positions (< count), all signalling `sem[slot]`."""

    def __init__(self, hbm, buf, sem, ids_ref, count, block: int):
        self.hbm, self.buf, self.sem, self.ids, self.count, self.block = (
            hbm, buf, sem, ids_ref, count, block)

    def _each(self, j, slot, act):
        start = j * self.block

        def one(i, carry):
            act(pltpu.make_async_copy(self.hbm.at[pl.ds(self.ids[start + i], 1)],
                                      self.buf.at[slot, pl.ds(i, 1)], self.sem.at[slot]))
            return carry

        lax.fori_loop(0, jnp.minimum(self.block, self.count - start), one, 0)

    def start(self, j, slot):
        self._each(j, slot, lambda c: c.start())

    def wait(self, j, slot):
        self._each(j, slot, lambda c: c.wait())


def gate_kernel(idx_ref, count_ref, x_ref, gate_hbm, a_ref, buf, sem, *, block: int,
                activation: str, threshold: float):
    """The one program of stage 1.

    Refs: idx_ref `[F]` int32, count_ref `[1]` int32 (SMEM); x_ref `[P, B, N]` (x_parts);
    gate_hbm `[F, N]` rows in HBM. Output a_ref `[nb, B, block]` float32: block j's activated
    gates, 0 at positions >= count. Scratch buf `[2, block, N]`, sem DMA `[2]`.
    """
    count = count_ref[0]
    blocks = pl.cdiv(count, block)
    copies = _RowCopies(gate_hbm, buf, sem, idx_ref, count, block)
    a_ref[...] = jnp.zeros(a_ref.shape, jnp.float32)

    @pl.when(blocks > 0)
    def _():
        copies.start(0, 0)

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < blocks)
        def _():
            copies.start(j + 1, 1 - slot)

        copies.wait(j, slot)
        g = activate(_matvec(x_ref, buf[slot]), activation, threshold)
        live = j * block + lax.broadcasted_iota(jnp.int32, g.shape, 1) < count
        a_ref[j] = jnp.where(live, g, 0.0)  # rows past the count hold stale or NaN VMEM
        return carry

    lax.fori_loop(0, blocks, body, 0)


def up_down_kernel(rows_ref, n_ref, x_ref, a_ref, up_hbm, down_hbm, o_ref, ubuf, dbuf, sem, *,
                   block: int):
    """The one program of stage 2.

    Refs: rows_ref `[F]` int32 neuron ids of the fired, n_ref `[1]` int32 (SMEM); x_ref
    `[P, B, N]`; a_ref `[nb, B, block]` float32 activated gates of the fired (0 past n); up_hbm,
    down_hbm `[F, N]` rows in HBM. Output o_ref `[P, B, N]` float32 (the parts of the output).
    Scratch ubuf, dbuf `[2, block, N]`; sem DMA `[2, 2]` (weight, slot).
    """
    n = n_ref[0]
    blocks = pl.cdiv(n, block)
    ups = _RowCopies(up_hbm, ubuf, sem.at[0], rows_ref, n, block)
    downs = _RowCopies(down_hbm, dbuf, sem.at[1], rows_ref, n, block)
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
    # Down rows past n are never copied but are multiplied by h = 0: they must not be NaN.
    dbuf[...] = jnp.zeros(dbuf.shape, dbuf.dtype)

    @pl.when(blocks > 0)
    def _():
        ups.start(0, 0)
        downs.start(0, 0)

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < blocks)
        def _():
            ups.start(j + 1, 1 - slot)
            downs.start(j + 1, 1 - slot)

        ups.wait(j, slot)
        u = _matvec(x_ref, ubuf[slot])
        live = j * block + lax.broadcasted_iota(jnp.int32, u.shape, 1) < n
        h = jnp.where(live, a_ref[j] * u, 0.0)
        downs.wait(j, slot)
        for p, w in enumerate(unpack(dbuf[slot], jnp.float32)):
            o_ref[p] += _dot(h, w, 0)
        return carry

    lax.fori_loop(0, blocks, body, 0)


def _in_hbm(w: jnp.ndarray) -> jnp.ndarray:
    """`w` pinned to HBM for a kernel: left free, XLA may copy a whole weight into VMEM before
    the kernel when it fits (a 7b layer's 86 MiB did, in a one-layer program), reading all of it
    to gather a tenth."""
    return pltpu.with_memory_space_constraint(w, pltpu.HBM)


def _blocks(f: int, block: int) -> int:
    return pl.cdiv(f, block)


@functools.partial(jax.jit, static_argnames=["activation", "threshold", "block", "interpret"])
def tpu_gate(x, gate, idx, count, *, activation: str = "relu", threshold: float = 0.0,
             block: int = BLOCK, interpret=False) -> jnp.ndarray:
    """Stage 1: act(gate[idx[k]] . x) for k < count -> `[B, F]` float32 in compact order, 0 after.

    Args:
      x: `[B, D]` float.
      gate: `[F, D]` float32 or `tpu_rows` uint32 pairs `[F, ceil(D/2)]`.
      idx: `[F]` int32 candidate ids in idx[:count]; count: `[]` int32.
      interpret: False to compile for a TPU; True or a `pltpu.InterpretParams` to interpret.
    """
    b = x.shape[0]
    f = gate.shape[0]
    xp = x_parts(x, gate)
    nb = _blocks(f, block)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(1,),
        in_specs=[pl.BlockSpec(xp.shape, lambda i, *_: (0, 0, 0)),
                  pl.BlockSpec(memory_space=pltpu.HBM)],
        out_specs=pl.BlockSpec((nb, b, block), lambda i, *_: (0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, block, gate.shape[1]), gate.dtype),
                        pltpu.SemaphoreType.DMA((2,))],
    )
    kernel = functools.partial(gate_kernel, block=block, activation=activation,
                               threshold=threshold)
    a = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((nb, b, block), jnp.float32),
        interpret=interpret_mode(interpret),
        name="tpu_gate",
    )(idx, jnp.reshape(count, (1,)), xp, _in_hbm(gate))
    return jnp.transpose(a, (1, 0, 2)).reshape(b, nb * block)[:, :f]


@functools.partial(jax.jit, static_argnames=["block", "interpret"])
def tpu_up_down(x, a, up, down_t, rows, n, *, block: int = BLOCK, interpret=False) -> jnp.ndarray:
    """Stage 2: sum_{k < n} (a[:, k] * (up[rows[k]] . x)) * down_t[rows[k]] -> `[B, D]` float32.

    Args:
      x: `[B, D]` float.
      a: `[B, F]` float32 activated gates of the fired in `rows` order, 0 at positions >= n.
      up, down_t: `[F, D]` float32 or `tpu_rows` uint32 pairs `[F, ceil(D/2)]` (the same kind).
      rows: `[F]` int32 fired neuron ids in rows[:n]; n: `[]` int32.
      interpret: False to compile for a TPU; True or a `pltpu.InterpretParams` to interpret.
    """
    assert up.dtype == down_t.dtype and up.shape == down_t.shape, (up.dtype, down_t.dtype)
    b, d = x.shape
    f, width = up.shape
    xp = x_parts(x, up)
    nb = _blocks(f, block)
    a_blocks = jnp.pad(a, ((0, 0), (0, nb * block - f))).reshape(b, nb, block).transpose(1, 0, 2)
    parts = xp.shape[0]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(1,),
        in_specs=[pl.BlockSpec(xp.shape, lambda i, *_: (0, 0, 0)),
                  pl.BlockSpec(a_blocks.shape, lambda i, *_: (0, 0, 0)),
                  pl.BlockSpec(memory_space=pltpu.HBM),
                  pl.BlockSpec(memory_space=pltpu.HBM)],
        out_specs=pl.BlockSpec((parts, b, width), lambda i, *_: (0, 0, 0)),
        scratch_shapes=[pltpu.VMEM((2, block, width), up.dtype),
                        pltpu.VMEM((2, block, width), down_t.dtype),
                        pltpu.SemaphoreType.DMA((2, 2))],
    )
    out = pl.pallas_call(
        functools.partial(up_down_kernel, block=block),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((parts, b, width), jnp.float32),
        interpret=interpret_mode(interpret),
        name="tpu_up_down",
    )(rows, jnp.reshape(n, (1,)), xp, a_blocks, _in_hbm(up), _in_hbm(down_t))
    # Pairs: interleave the even and odd columns back.
    return jnp.moveaxis(out, 0, -1).reshape(b, parts * width)[:, :d]
