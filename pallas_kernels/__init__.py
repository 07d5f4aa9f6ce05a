"""SparseInfer kernels: sign-bit prediction and gathered sparse MLP ops, each with three faces.

Every op takes `backend=` among BACKENDS (see `backend.py`: "auto" picks by device, `describe`
says what it picked and why). The model chains them per decode step:

    active, n_neg = sign_predict(x, gate_sign_bits, alpha)   # predictor (predict.py)
    # or signmag_predict: votes weighted by quantised |x| (signmag.py)
    idx, count = compact(active)                             # compact.py
    h = sparse_gate_up(x, gate, up, idx, count)              # [B, F] float32, compact order
    out = sparse_down(h, down_t, idx, count)                 # [B, D]

or, reading up and down rows only for the candidates whose gate fires (sparse_mlp.py):

    out, fired = sparse_mlp(x, gate, up, down_t, idx, count)

The whole layer in plain XLA at static bucketed shapes, for any XLA device (portable.py):

    out, counts = sparse_mlp_layer_portable(x, gate, up, down_t, gate_sign_bits, alpha)

Kernels know nothing of models.
"""

from pallas_kernels.backend import BACKENDS, choose, describe
from pallas_kernels.compact import compact
from pallas_kernels.pack import num_words, pack_sign_bits, pack_sign_bits_numpy
from pallas_kernels.portable import sparse_mlp_layer_portable
from pallas_kernels.predict import sign_predict, threshold
from pallas_kernels.signmag import signmag_predict
from pallas_kernels.sparse_down import sparse_down
from pallas_kernels.sparse_gate_up import ACTIVATIONS, sparse_gate_up
from pallas_kernels.sparse_layer import sparse_mlp_layer
from pallas_kernels.sparse_mlp import sparse_mlp

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "choose",
    "compact",
    "describe",
    "num_words",
    "pack_sign_bits",
    "pack_sign_bits_numpy",
    "sign_predict",
    "signmag_predict",
    "sparse_down",
    "sparse_gate_up",
    "sparse_mlp",
    "sparse_mlp_layer",
    "sparse_mlp_layer_portable",
    "threshold",
]
