"""Pallas Triton kernels for CUDA GPUs of compute capability >= 8.0.

The layer (`layer.layer_pallas`): `predict_gate_up` (the vote, the gate rows of the predicted and
the up rows of the fired) then `masked_down`. The predictors' own kernels (`predict.py`,
`signmag.py`), sign-bit packing (`pack.py`), the older chain kept as a comparison (`chain.py`),
and an offline Triton IR check (`triton_check.py`). Off a GPU the kernels run in interpret mode.
"""
