"""`python -m sparseinfer_jax.cli`: the `sparseinfer` command."""

from sparseinfer_jax.cli.main import main
from sparseinfer_jax.errors import exit_process

exit_process(main())
