"""SparseInfer kernels: sign-bit prediction and sparse MLP ops, each with a jnp reference, an XLA
path and a Pallas Triton kernel (`backend=` among "auto", "pallas", "xla", "reference", see
`backend.py`).

The op a model calls per layer and decode step (sparse_layer.py):

    out, counts = sparse_mlp_layer(x, gate, up, down_t, gate_sign_bits, alpha, predictor="sign")

On a GPU it is two kernels, `predict_gate_up` (the vote, gate and up, h in natural order) and
`masked_down` (down over the rows where h != 0); on the CPU the XLA chain below it. The pieces,
still callable one by one:

    active, n_neg = sign_predict(x, gate_sign_bits, alpha)   # predictor (predict.py)
    # or signmag_predict: votes weighted by quantised |x| (signmag.py)
    idx, count = compact(active)                             # compact.py
    out, fired = sparse_mlp(x, gate, up, down_t, idx, count) # sparse_mlp.py: gate over the
    # candidates, up and down over the fired (or sparse_gate_up then sparse_down, one stage)

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
from pallas_kernels.sparse_layer import PREDICTORS, sparse_mlp_layer
from pallas_kernels.sparse_mlp import sparse_mlp

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
    "sparse_down",
    "sparse_gate_up",
    "sparse_mlp",
    "sparse_mlp_layer",
    "sparse_mlp_layer_portable",
    "threshold",
]
