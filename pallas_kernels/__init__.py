"""SparseInfer kernels: sign-bit prediction and the sparse MLP layer, for every device.

The op a model calls per layer and decode step (`layer.py`):

    out, counts = sparse_mlp_layer(x, gate, up, down_t, gate_sign_bits, alpha, predictor="sign")

Each backend keeps its own representation of the active set inside it (`backend.choose` picks
one by device, "auto" by default):
- `gpu/`: Pallas Triton kernels (`predict_gate_up` then `masked_down`), and the older chain they
  replace (`gpu/chain.py`), kept as a benchmark comparison;
- `tpu/`: Pallas TPU (Mosaic) kernels;
- `xla/`: plain XLA, the CPU's chunk loop (`chunk_loop.py`) and the portable bucketed path for any
  XLA device (`portable.py`);
- the jnp reference (`layer.layer_reference`), the truth the tests compare against.

What every backend shares, written once: `contract.py` (argument checks, predictor and activation
names, the union over a mesh axis, the per-row masks, compaction). The predictors' rule and
faces: `predict.py` (sign), `signmag.py`; bit packing: `pack.py`. The predictors alone:

    active, n_neg = sign_predict(x, gate_sign_bits, alpha)            # or signmag_predict
    idx, count = compact(active)

Kernels know nothing of models.
"""

from pallas_kernels.backend import BACKENDS, choose, describe
from pallas_kernels.contract import ACTIVATIONS, PREDICTORS, compact
from pallas_kernels.layer import sign_predict, signmag_predict, sparse_mlp_layer
from pallas_kernels.pack import num_words, pack_sign_bits, pack_sign_bits_numpy
from pallas_kernels.predict import threshold
from pallas_kernels.xla.portable import sparse_mlp_layer_portable

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "PREDICTORS",
    "choose",
    "compact",
    "describe",
    "num_words",
    "pack_sign_bits",
    "pack_sign_bits_numpy",
    "sign_predict",
    "signmag_predict",
    "sparse_mlp_layer",
    "sparse_mlp_layer_portable",
    "threshold",
]
