"""The sparse MLP layer in plain XLA: the CPU's chunk loop (`chunk_loop.layer_xla`) and the
portable path at bucketed static shapes for any XLA device (`portable.sparse_mlp_layer_portable`).
"""
