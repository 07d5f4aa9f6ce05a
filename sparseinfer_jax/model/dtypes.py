"""Weight dtypes by name: the one table every module looks names up in."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sparseinfer_jax.errors import UserError

# Every dtype a model runs in (float16: the T4's 16-bit dtype, reached by a cast at load).
DTYPES = {name: np.dtype(jnp.dtype(name)) for name in ("bfloat16", "float16", "float32")}
# The dtypes a checkpoint stores, the converter writes and the benchmarks build.
STORED = ("bfloat16", "float32")


def lookup(name: str, *, allowed: tuple[str, ...] = tuple(DTYPES), flag: str = "dtype"
           ) -> np.dtype:
    """The dtype named `name`, one of `allowed`; `flag` names the option in the error."""
    if name not in allowed:
        raise UserError(f"{flag} must be one of {', '.join(allowed)}, got '{name}'.")
    return DTYPES[name]


def itemsize(name: str) -> int:
    """Bytes per element of the dtype named `name`."""
    return lookup(name).itemsize
