"""benchmarks/scale.py's 7B checkpoint is one the converter accepts, tensor for tensor."""

from __future__ import annotations

import os
import sys

from sparseinfer_jax.io import names
from sparseinfer_jax.model.config import config_from_hf_dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import scale  # noqa: E402


def test_prosparse_config_and_tensors_match_the_converter():
    cfg = config_from_hf_dict(scale.PROSPARSE_7B)
    assert (cfg.hidden_act, cfg.act_threshold, cfg.num_hidden_layers) == ("fatrelu", 0.01, 32)
    want = {n: t.shape for n, t in names.hf_targets(cfg).items()}
    assert dict(scale.hf_tensors(scale.PROSPARSE_7B)) == want


def test_random_bf16_is_finite_and_signed():
    import numpy as np

    x = scale.random_bf16(np.random.default_rng(0), (1000,)).astype(np.float32)
    assert np.all(np.isfinite(x)) and 0.3 < np.mean(x > 0) < 0.7
    assert np.all((np.abs(x) >= 2**-7) & (np.abs(x) < 2**-5))
