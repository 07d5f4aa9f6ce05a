"""Joining a multi-process job (jax.distributed) with a bounded wait and one clear error."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import jax

from sparseinfer_jax.errors import UserError


def initialize_distributed(timeout_s: float = 300.0) -> None:
    """Joins a multi-host job (`jax.distributed.initialize`) before any device is used.

    Coordinator, process count and id come from the environment: JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID, or the cluster's own variables (SLURM, Open MPI, Cloud
    TPU), which JAX detects itself. See docs/multihost.md.

    JAX ends the process with a fatal C++ log (no Python exception) when the job does not form
    within its timeout, so this function gives up first, with one line: a process other than 0
    waits at most `timeout_s` for the coordinator's port to accept connections (UserError), and
    any process still not connected after `timeout_s` prints `error: ...` and exits with 2.
    A process that has joined already (a second command in the same process) stays in its job.
    """
    if jax.distributed.is_initialized():
        return
    env = {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": os.environ.get("JAX_NUM_PROCESSES"),
        "process_id": os.environ.get("JAX_PROCESS_ID"),
    }
    try:
        kwargs = {k: (v if k == "coordinator_address" else int(v)) for k, v in env.items() if v}
    except ValueError:
        raise UserError(
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID must be whole numbers; see docs/multihost.md."
        ) from None
    address = kwargs.get("coordinator_address")
    where = f"the coordinator at {address}" if address else "the job's coordinator"
    hint = (
        "start every process with the same JAX_COORDINATOR_ADDRESS (reachable from each) and "
        "JAX_NUM_PROCESSES, process 0 included, or allow more time with --distributed-timeout."
    )
    deadline = time.monotonic() + timeout_s
    if address and kwargs.get("process_id", 0) != 0:
        host, _, port = address.rpartition(":")
        while not _accepts(host.strip("[]"), int(port)):
            if time.monotonic() > deadline:
                raise UserError(f"could not reach {where} within {timeout_s:g} s; {hint}")
            time.sleep(0.5)

    def give_up() -> None:
        print(f"error: the multi-process job did not form with {where} within {timeout_s:g} s; "
              f"{hint}", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(max(deadline - time.monotonic(), 1.0), give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own timeout comes after the watchdog's, so the one-line error is what users see.
        jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_s) + 60)
    except ValueError:  # no cluster detected and the variables it needs not all set
        unset = [f"JAX_{k.upper()}" for k, v in env.items() if not v]
        raise UserError(
            f"--distributed found no multi-process job: set {', '.join(unset)} on every process "
            "(or run under SLURM, Open MPI or Cloud TPU); see docs/multihost.md."
        ) from None
    finally:
        watchdog.cancel()


def _accepts(host: str, port: int) -> bool:
    """True when something listens on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False
