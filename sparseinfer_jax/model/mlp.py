"""The Llama MLP with SparseInfer: dense, sparse (sign-bit predicted) and oracle modes.

Weight layout (DESIGN.md): every neuron's weights are contiguous rows, `gate`, `up` and
`down_t` all `[F, D]` (down_t is W_down transposed), plus the packed sign bits of `gate`,
`gate_sign_bits: [F, ceil(D/32)] uint32`. Reading only the active rows of the three matrices is
what makes the sparse path cheaper.

Modes:
- `dense`: act(x W_gate^T) * (x W_up^T) W_down^T, every neuron.
- `sparse`: predict each neuron's sign from sign bits and compute only predicted-active ones.
  Predictors (`MLP.predictor`): "sign", the paper's vote (pallas_kernels.sign_predict: zero iff
  the negative products outnumber alpha times the positive ones); "signmag", the same vote with
  each input weighted by its quantised magnitude (pallas_kernels.signmag_predict), same knob.
- `oracle`: the true activation mask from the full gate, the accuracy ceiling of any predictor.

With one token per row (decoding) `sparse` and `oracle` call one op per layer,
`pallas_kernels.sparse_mlp_layer`, over the union of the rows' active sets: the gate rows of every
candidate, then the up and down rows of the candidates whose gate fires (act != 0 for some row),
on the path the backend picks for the device.
Bytes read per token and layer are therefore predictor + gate(candidates) + up and down(fired),
reported over the dense MLP's as `bytes_fraction`.

With several tokens per row (a full forward, for evaluation) they apply each
token's own mask to the dense computation: the same numbers the kernels would give that token,
without pretending the union over a prompt is sparse.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from pallas_kernels import contract
from pallas_kernels.contract import activate
from pallas_kernels.pack import pack_sign_bits
from pallas_kernels.tpu import layout as tpu_layout
from sparseinfer_jax.errors import UserError
from sparseinfer_jax.model import sharding
from sparseinfer_jax.model.config import PREDICTORS, LlamaConfig
from sparseinfer_jax.model.quant import dot, quantized_param

MODES = ("dense", "sparse", "oracle")
BACKENDS = pk.BACKENDS
# Per-layer predictor statistics, summed over rows (one token each): see `MLP.__call__`.
STAT_FIELDS = ("rows", "predicted_active", "true_active", "both_active", "computed", "fired")


@dataclasses.dataclass(frozen=True)
class Sparsity:
    """How every MLP of a model runs: static (hashable; a change recompiles), held once by the
    model (`Llama.sparsity`) and handed down to each layer's call. The per-layer alphas are data
    beside it (`Llama.alphas`), so changing them never recompiles.

    mode: one of MODES. backend: the sparse kernels' backend, one of BACKENDS. predictor: one of
    PREDICTORS (the checkpoint's, set by `load`).
    """

    mode: str = "dense"
    backend: str = "auto"
    predictor: str = "sign"

    def check(self, cfg: LlamaConfig) -> Sparsity:
        """Returns self; UserError for an unknown field or a sparse mode on a non-ReLU model."""
        check_mode(cfg, self.mode, self.backend)
        if self.predictor not in PREDICTORS:
            raise UserError(
                f"predictor must be one of {', '.join(PREDICTORS)}, got '{self.predictor}'."
            )
        return self


def set_predictor(model, kind: str) -> None:
    """Sets the predictor of `model` (a `Llama`) to `kind`, one of PREDICTORS."""
    model.sparsity = dataclasses.replace(model.sparsity, predictor=kind).check(model.config)


def check_mode(cfg: LlamaConfig, mode: str, backend: str) -> None:
    """Raises UserError for an unknown mode or backend, or a sparse mode on a non-ReLU model."""
    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got '{mode}'.")
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'.")
    if mode != "dense" and not cfg.is_relu_family:
        raise UserError(
            f"mode '{mode}' needs a ReLU-family activation; this model uses "
            f"'{cfg.hidden_act}', run it with mode='dense'."
        )


class SignBits(nnx.Variable):
    """Packed sign bits of W_gate: derived from the weights, never trained."""


class Alpha(nnx.Variable):
    """The layer's conservativeness (data, so changing it never recompiles)."""


class MLP(nnx.Module):
    """Gated MLP `[N, D] -> [N, D]` with a ReLU-family activation and the SparseInfer predictor."""

    def __init__(self, cfg: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs,
                 quantize: str | None = None):
        f, d = cfg.intermediate_size, cfg.hidden_size
        self.hidden_size = d
        init = nnx.initializers.normal(0.02)
        gate = init(rngs.params(), (f, d), dtype)
        self.gate_sign_bits = SignBits(pack_sign_bits(gate))  # from the unquantised gate
        self.gate, self.gate_scale = quantized_param(gate, quantize)
        self.up, self.up_scale = quantized_param(init(rngs.params(), (f, d), dtype), quantize)
        self.down_t, self.down_t_scale = quantized_param(init(rngs.params(), (f, d), dtype),
                                                         quantize)
        self.dtype = dtype  # the compute dtype (the weights' unless quantised)
        self.alpha = Alpha(jnp.float32(1.0))
        self.activation = (
            "relu" if cfg.hidden_act == "fatrelu" and cfg.act_threshold == 0 else cfg.hidden_act
        )
        self.threshold = cfg.act_threshold

    def act(self, z: jnp.ndarray) -> jnp.ndarray:
        """The activation on float32 pre-activations."""
        if self.activation == "silu":
            return jax.nn.silu(z)
        return activate(z, self.activation, self.threshold)

    def scales(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray] | None:
        """The `[F]` row scales of int8 (gate, up, down_t), or None when not quantised."""
        if self.gate_scale is None:
            return None
        return self.gate_scale[...], self.up_scale[...], self.down_t_scale[...]

    def hidden(self, x: jnp.ndarray) -> jnp.ndarray:
        """act(gate x) * (up x) for every neuron: `x: [N, D]` -> `[N, F]` float32."""
        gate, up = self.gate[...], self.up[...]
        if gate.dtype == jnp.uint32:  # the TPU kernels' layout (`model.layout`), read as it is
            return self.act(tpu_layout.rows_matmul_t(x, gate)) * tpu_layout.rows_matmul_t(x, up)
        gs, us, _ = self.scales() or (None, None, None)
        return self.act(dot(x, gate, gs, 1)) * dot(x, up, us, 1)

    def down(self, h: jnp.ndarray) -> jnp.ndarray:
        """`h: [N, F]` float32 -> `[N, D]` in the compute dtype."""
        w, scales = self.down_t[...], self.scales()
        if w.dtype == jnp.uint32:
            return tpu_layout.rows_matmul(h, w, self.hidden_size).astype(jnp.bfloat16)
        if scales is None:
            return dot(h.astype(w.dtype), w, None, 0).astype(w.dtype)
        return dot(h, w, scales[2], 0).astype(self.dtype)

    def votes(
        self, x: jnp.ndarray, predictor: str, backend: str
    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """The predictor's counts for `x: [N, D]`: (union mask `[F]`, negative votes `[N, F]`,
        vote totals `[N]`); a row predicts a neuron active iff `n_neg <= threshold(alpha, total)`.
        """
        bits, alpha = self.gate_sign_bits[...], self.alpha[...]
        if predictor == "signmag":
            return pk.signmag_predict(x, bits, alpha, backend=backend)
        active, n_neg = pk.sign_predict(x, bits, alpha, backend=backend)
        return active, n_neg, jnp.sum(x != 0, axis=-1, dtype=jnp.int32)

    def predict(
        self, x: jnp.ndarray, predictor: str, backend: str
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Prediction for `x: [N, D]` -> (union mask `[F]`, per-row mask `[N, F]`)."""
        active, n_neg, total = self.votes(x, predictor, backend)
        return active, n_neg <= pk.threshold(self.alpha[...], total[:, None])

    def __call__(
        self,
        x: jnp.ndarray,
        *,
        sparsity: Sparsity = Sparsity(),
        stats: str | None = None,
        mesh: Mesh | None = None,
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Applies the MLP.

        Args:
          x: `[B, T, D]` activations after the post-attention RMSNorm.
          sparsity: mode, backend and predictor (static; the model's `Llama.sparsity`).
          stats: None, "predicted" (predictor statistics) or "diagnostic" (also the true mask,
            which costs the full gate matvec).
          mesh: a `(data, model)` mesh to run tensor-parallel on (see `sharded`), or None.

        Returns:
          `[B, T, D]` output, and with `stats` an int32 vector over STAT_FIELDS: rows, rows'
          predicted-active neurons, truly active neurons, neurons both predicted and truly active
          (all summed over rows; the last two are 0 unless "diagnostic"), neurons whose gate row
          the layer read (the candidates, one union over the rows), and neurons whose up and down
          rows it read (the candidates that fired; see `pallas_kernels.sparse_mlp_layer`).
        """
        b, t, _ = x.shape
        if mesh is None:
            y, counts = self.apply(x, sparsity, stats)
        else:
            y, counts = self.sharded(x, sparsity, stats, mesh)
        if not stats:
            return y, None
        return y, jnp.concatenate([jnp.full((1,), b * t, jnp.int32), counts])

    def apply(
        self, x: jnp.ndarray, sparsity: Sparsity, stats: str | None, data_axis=None
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """The MLP on `x: [B, T, D]` -> (`[B, T, D]` in the weights' dtype, counts `[5]` or None).

        counts are STAT_FIELDS without "rows". `data_axis` names the mesh axis the batch is split
        over inside `shard_map`: the union of active neurons is then taken over every row.
        """
        b, t, d = x.shape
        rows = x.reshape(b * t, d)
        f = self.gate.shape[0]
        mode, predictor, backend = sparsity.mode, sparsity.predictor, sparsity.backend
        predicted = true_mask = None
        if mode == "dense":
            y, computed = self.down(self.hidden(rows)), jnp.int32(f)
            fired = computed
        elif t > 1:
            h = self.hidden(rows)
            mask = self.predict(rows, predictor, backend)[1] if mode == "sparse" else h != 0
            y, computed = self.down(jnp.where(mask, h, 0.0)), jnp.int32(f)
            fired = computed
            predicted, true_mask = (mask, h != 0) if mode == "sparse" else (None, mask)
        else:
            # Decoding: the whole sparse MLP is one op per layer; each backend keeps its own
            # representation of the active set inside it.
            y, (n_predicted, computed, fired) = pk.sparse_mlp_layer(
                rows,
                self.gate[...],
                self.up[...],
                self.down_t[...],
                self.gate_sign_bits[...],
                self.alpha[...],
                predictor="oracle" if mode == "oracle" else predictor,
                activation=self.activation,
                threshold=self.threshold,
                backend=backend,
                union_axis=data_axis,
                scales=self.scales(),
            )
            if stats == "predicted" and mode == "sparse":
                predicted = n_predicted
        y = y.reshape(b, t, d)
        if not stats:
            return y, None
        if stats == "predicted":
            true_mask = jnp.zeros((), bool)
        elif true_mask is None:
            true_mask = self.hidden(rows) != 0
        # Row counts of this call's rows, summed over the batch split (`data_axis`) like the op's
        # own, so every count is of the whole batch; computed and fired are of the one union.
        count = lambda m: contract.total(jnp.sum(m, dtype=jnp.int32), data_axis)  # noqa: E731
        if predicted is None:  # the predictor's per-row masks, whatever the mode
            predicted = self.predict(rows, predictor, backend)[1]
        # A count from the op (decoding, "predicted" stats: no true mask, so none both) or a mask.
        n_predicted = predicted if predicted.ndim == 0 else count(predicted)
        both = count(predicted & true_mask) if predicted.ndim else jnp.int32(0)
        return y, jnp.stack(
            [
                n_predicted.astype(jnp.int32),
                count(true_mask),
                both,
                computed.astype(jnp.int32),
                fired.astype(jnp.int32),
            ]
        )

    def sharded(
        self, x: jnp.ndarray, sparsity: Sparsity, stats: str | None, mesh: Mesh
    ) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """`apply` tensor-parallel: each device of the `model` axis runs it on its own neurons.

        Under `shard_map` every device holds `[F/m, D]` slices of gate, up, down_t (and its sign
        bits), predicts, compacts and gathers only its own neurons, and the partial down
        projections end in one float32 `psum` over `model`. The batch is split over `data` when it
        divides evenly. Returns what `apply` returns; counts are summed over shards.
        """
        graphdef, state = nnx.split(self)
        specs = jax.tree.map(lambda a: P("model") if a.ndim else P(), state)
        data = sharding.batch_axis(mesh, x.shape[0])

        def local(state, x):
            y, counts = nnx.merge(graphdef, state).apply(x, sparsity, stats, data)
            y = jax.lax.psum(y.astype(jnp.float32), "model")
            if counts is not None:
                # Each count is of the whole batch already (`apply`); the model shards hold
                # different neurons, so their counts add up.
                counts = jax.lax.psum(counts, "model")
            return y, counts

        # check_vma=False: the kernels know nothing of meshes (their loop carries start out
        # unvarying), and the counts above are replicated by construction.
        y, counts = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(specs, P(data)),
            out_specs=(P(data), P()),
            check_vma=False,
        )(state, x)
        return y.astype(self.dtype), counts
