"""Pallas TPU (Mosaic) kernels: the votes (`predict.py`), the row gathers of both stages
(`gather.py`) and the layer op (`layer.sparse_mlp_layer_mosaic`); where they run: `common.py`.
Off a TPU they run in Pallas' TPU interpreter."""
