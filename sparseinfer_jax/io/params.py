"""A checkpoint's `params/` folder: one orbax checkpoint, written a group of arrays at a time and
restored straight into each array's sharding.

The tree is the model's own per-layer layout with string keys (orbax's), one array per layer:
`{"embed_tokens": {"embedding": [V, D]}, "layers": {"0": {"mlp": {"gate": [F, D], ...}}}, ...}`
(paths and shapes in io/names.py).

Writing streams. `Writer.add` collects converted arrays; every `GROUP_BYTES` it hands the group to
orbax's partial save (`orbax.checkpoint.experimental.v1.partial.save_async`), which writes it
into a staging folder beside `params/` while the caller converts the next group, and `finish`
commits every group with `partial.finalize`, which renames and merges indexes: each array's bytes
are written once and never re-read. Arrays are stored uncompressed (random-looking weights gain
little from zstd, which would cost CPU on every load), and a 2-D array in up to `CHUNKS` chunks
(zarr3 chunks inside one OCDBT value, `chunk_bytes`), so a process restoring only some rows or
columns reads only the chunks that hold them.

Reading gives orbax an abstract tree of `jax.ShapeDtypeStruct`s with the shardings the model
needs; orbax reads, for each device of this process, only the chunks of its slice, at most
`READ_BYTES` in flight, and places it on the device.

Orbax reports its failures through absl.logging, with a traceback, before raising them, and a
failed save or read leaves tensorstore callbacks and failed tasks that Python reports later as
tracebacks; this module turns every failure into one `UserError` line (or the OSError a write
got), named for what it was (`_read_failure`: damage only where the files are), so while orbax
runs absl's verbosity is held at FATAL (`_orbax_quiet`), and while it works on a folder and for
a while after it fails there, what it leaves behind about that folder is dropped (`_watching`).
Ctrl-C is held back while orbax starts a save or commits (`_interrupt_after`), so the writer
always has what to wait for before its staging folder is removed. A path orbax would misread
(glob's characters, a backslash) is given to it through a link (`_plain_path`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from absl import logging as absl_logging

from sparseinfer_jax.errors import UserError, check_readable, unreadable

Path = tuple  # a params path: ("layers", 3, "mlp", "gate")

# Arrays handed to one partial save. A partial save holds about twice its group in memory while
# it writes (chunk copies, then the encoded value), so this bounds the converter's memory.
GROUP_BYTES = 384 * 2**20
# Chunks per 2-D array: a shard of an axis split 2, 4, 8 or 16 ways covers whole chunks.
CHUNKS = 16
# Orbax's smallest recommended chunk (it warns below 1 MiB); smaller arrays stay one chunk.
MIN_CHUNK_BYTES = 2**20
# Bytes being read at once while restoring (orbax's default is unbounded: 2x the model on the
# CPU), or more than the largest stored array if that is larger (orbax refuses a read that needs
# the whole budget).
READ_BYTES = 256 * 2**20
# Space orbax writes per array beyond its data (zarr metadata, chunk index, tree metadata);
# measured about 2 KB, counted generously for the free-space check.
ARRAY_OVERHEAD_BYTES = 16 * 2**10
# tensorstore's errors end with the OS error of a failed write: "... [os_error_code='28']".
OS_ERROR = re.compile(r"os_error_code='?(\d+)")


def orbax_key(path: Path) -> tuple[str, ...]:
    """A params path as orbax's tree keys: `("layers", 3, "mlp", "gate")` -> all strings."""
    return tuple(str(k) for k in path)


def params_path(keys: tuple[str, ...]) -> Path:
    """The inverse of `orbax_key`: layer indices back to ints."""
    return tuple(int(k) if k.isdigit() else k for k in keys)


def nest(flat: dict[Path, Any]) -> dict[str, Any]:
    """`{params path: leaf}` -> orbax's nested dict with string keys."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, last = orbax_key(path)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return tree


def flatten(tree: dict[str, Any]) -> dict[Path, Any]:
    """The inverse of `nest`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: not isinstance(x, dict))
    return {params_path(tuple(k.key for k in keypath)): leaf for keypath, leaf in leaves}


# How long after a failed orbax call what it left running is still dropped: tensorstore finishes
# the reads already started (well under a second for the failures measured here), then the
# callbacks and tasks it leaves are collected.
LEFTOVER_S = 60.0
# Orbax paths being read or written, or whose read or write failed recently -> until when
# (time.monotonic) what orbax leaves behind there is dropped (`_watching`).
_watched: dict[str, float] = {}


def _failed_folders() -> list[str]:
    """The orbax paths where leftovers of a failure may arrive now."""
    now = time.monotonic()
    return [folder for folder, until in _watched.items() if until > now]


def _orbax_frame(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from (`__cause__`, as orbax re-raises), has a frame
    of orbax's in its traceback."""
    while e is not None:
        tb = e.__traceback__
        while tb is not None:
            if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        e = e.__cause__
    return False


def _about_failed_folder(e: BaseException | None) -> bool:
    """Whether `e` is orbax's or tensorstore's error about a folder whose read or write failed
    recently: a frame of orbax's, or tensorstore's message naming the folder."""
    if e is None:
        return False
    text = str(e)
    named = "tensorstore" in text and any(folder in text for folder in _failed_folders())
    return named or (bool(_failed_folders()) and _orbax_frame(e))


def _left_by_orbax(unraisable) -> bool:
    """Whether an unraisable exception is what a failed orbax call leaves behind (the failure
    itself was raised): a tensorstore callback, called from tensorstore's own thread (no Python
    object to name), that finds orbax's event loop closed (orbax closes it while other reads or
    writes are still running); or one of orbax's read coroutines closed unfinished, which wraps
    the GeneratorExit in its own error."""
    if not _failed_folders():
        return False
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
        frames = traceback.extract_tb(e.__traceback__)
        return (unraisable.object is None and bool(frames)
                and frames[0].name.endswith("call_soon_threadsafe"))
    return isinstance(e.__cause__, GeneratorExit) and _orbax_frame(e)


def _drop_unraisable(unraisable) -> None:
    """sys.unraisablehook while orbax's leftovers may arrive (`_watching`); everything else goes
    to the hook it replaced."""
    if not _left_by_orbax(unraisable):
        _drop_unraisable.replaced(unraisable)
    if not _failed_folders() and sys.unraisablehook is _drop_unraisable:
        sys.unraisablehook = _drop_unraisable.replaced


def _unretrieved_orbax_error(record: logging.LogRecord) -> bool:
    """False (drop) for asyncio's report of a task or future that failed inside a failed orbax
    call ("Task exception was never retrieved", "_GatheringFuture exception ...")."""
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in str(record.msg)
                and _about_failed_folder(error))


@contextlib.contextmanager
def _watching(folder: str) -> Iterator[None]:
    """While orbax works on `folder` and, when that fails, `LEFTOVER_S` after: drops what the
    failed call left running that Python would print as tracebacks long after the failure was
    reported (even while it exits): tensorstore callbacks and read coroutines (`_left_by_orbax`),
    and orbax's tasks and futures whose error nobody retrieved (asyncio logs those when
    collected). Errors of anything else (XLA, numpy, the OS, another folder) still come through,
    and once no failure is recent the filters are removed."""
    _forget_old_failures()
    before = _watched.get(folder)
    _watched[folder] = math.inf
    if sys.unraisablehook is not _drop_unraisable:
        _drop_unraisable.replaced = sys.unraisablehook
        sys.unraisablehook = _drop_unraisable
    tasks_log = logging.getLogger("asyncio")
    if _unretrieved_orbax_error not in tasks_log.filters:
        tasks_log.addFilter(_unretrieved_orbax_error)
    try:
        yield
    except BaseException:
        _watched[folder] = time.monotonic() + LEFTOVER_S
        raise
    if before is None:
        del _watched[folder]
    else:
        _watched[folder] = before
    _forget_old_failures()


def _forget_old_failures() -> None:
    """Removes the filters of `_watching` once no failure is recent and nothing is watched."""
    for folder in [f for f in _watched if f not in _failed_folders()]:
        del _watched[folder]
    if _watched:
        return
    logging.getLogger("asyncio").removeFilter(_unretrieved_orbax_error)
    if sys.unraisablehook is _drop_unraisable:
        sys.unraisablehook = _drop_unraisable.replaced


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    """While orbax runs: absl (orbax's log) at FATAL; the caller reports every failure as one
    line."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.FATAL)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


# Characters orbax or tensorstore misread in a path: glob's (orbax finds its staging folders by
# glob, so `[v2]` makes a pattern) and the backslash (tensorstore takes it for a separator).
MISREAD = frozenset("[]*?\\")


@contextlib.contextmanager
def _plain_path(folder: str) -> Iterator[str]:
    """`folder` (absolute) as orbax can be given it: itself, or, when its path holds a character
    orbax misreads (`MISREAD`), the same folder through a link made for the call in a fresh
    temporary folder. The folder itself need not exist (a writer's does not yet)."""
    if not MISREAD & set(folder):
        yield folder
        return
    parent, name = os.path.split(folder)
    assert not MISREAD & set(name), name  # always params/ here
    hideout = tempfile.mkdtemp(prefix="sparseinfer-")
    try:
        if MISREAD & set(hideout):
            raise UserError(f"{folder}: orbax cannot read or write a path holding any of "
                            f"{' '.join(sorted(MISREAD))}, and the temporary folder {hideout} "
                            "has one too; set TMPDIR to a plain folder, or move the checkpoint.")
        link = os.path.join(hideout, "checkpoint")
        os.symlink(parent, link)
        yield os.path.join(link, name)
    finally:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(hideout, "checkpoint"))  # the link, not what it points to
            os.rmdir(hideout)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Holds Ctrl-C back until the block ends (in the main thread; elsewhere Python delivers none):
    interrupted inside orbax's save or finalize, its threads would go on writing into the staging
    folder after the caller removed it, with no handle left to wait for them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def chunk_bytes(shape: tuple[int, ...], itemsize: int) -> int | None:
    """The `chunk_byte_size` orbax is given for an array (None: one chunk).

    Orbax picks the largest chunk within that size by shrinking the longest axis, rows on a tie,
    to its next smaller divisor, one step at a time. An array orbax can split 4 or more times along
    its rows before it would split columns (gate, up, down_t, the embeddings, the sign bits) gets
    row blocks only, `rows / k` rows for the largest such power of two `k`: contiguous in memory,
    so tensorstore writes them without copying. Any other 2-D array (the attention projections)
    gets up to `CHUNKS` chunks that split both axes. No chunk is below `MIN_CHUNK_BYTES`.
    """
    if len(shape) != 2:
        return None
    rows, cols = shape
    nbytes = rows * cols * itemsize
    most = min(CHUNKS, nbytes // MIN_CHUNK_BYTES)
    if most < 2:
        return None
    k = 1
    while 2 * k <= most and rows % (2 * k) == 0 and _rows_reach(rows, 2 * k, cols):
        k *= 2
    return nbytes // k if k >= 4 else nbytes // most


def _rows_reach(rows: int, k: int, cols: int) -> bool:
    """Whether orbax, shrinking rows from `rows`, gets to `rows / k` before shrinking columns:
    every divisor of `rows` above `rows / k` must be at least `cols`."""
    next_above = rows // max(e for e in range(1, k) if rows % e == 0)
    return next_above >= cols


def _chunking(keypath, value) -> Any:
    """Orbax storage options of one leaf (see `chunk_bytes`)."""
    size = chunk_bytes(np.shape(value), value.dtype.itemsize)
    if size is None:
        return None
    return ocp.options.ArrayOptions.Saving.StorageOptions(chunk_byte_size=size)


def size_on_disk(specs: dict[Path, tuple[tuple[int, ...], np.dtype]]) -> int:
    """Bytes of a params folder holding arrays of these `{path: (shape, dtype)}`, at most."""
    data = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
    return data + ARRAY_OVERHEAD_BYTES * len(specs)


def _write_error(folder: str, e: Exception) -> Exception:
    """An orbax write failure as the OSError it was (tensorstore reports it in the message)."""
    found = OS_ERROR.search(str(e))
    if found is None:
        return e
    code = int(found.group(1))
    return OSError(code, os.strerror(code), folder)


class Writer:
    """Writes the arrays given to `add` into the orbax checkpoint `folder` (which must not exist).

    At most one group is being written while the next is collected. `finish` writes the rest
    and commits the checkpoint; until then `folder` does not exist (the groups are staged beside
    it, in `folder + ".partial_save"`). A failed write raises OSError when the OS refused it
    (a full disk: ENOSPC). On any exception (Ctrl-C included) the writer first waits for the
    group in flight, so that nothing writes into the staging folder after the caller removes it.
    Use it as a context manager (orbax's log is quiet inside, and a path orbax would misread is
    given to it through a link: `_plain_path`).
    """

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self._orbax_folder = self.folder
        self._group: dict[Path, np.ndarray] = {}
        self._bytes = 0
        self._in_flight = None
        self._context = ocp.Context()
        self._context.array.saving.use_compression = False
        self._context.array.saving.scoped_storage_options_creator = _chunking
        self._context.memory.deepcopy_host_arrays = False  # the arrays are not changed meanwhile

    def add(self, path: Path, x: np.ndarray) -> None:
        """Queues array `x` for `path`, after handing the group to orbax if `x` would take it
        past `GROUP_BYTES` (so a group is one array or at most `GROUP_BYTES`)."""
        if self._group and self._bytes + x.nbytes > GROUP_BYTES:
            self._save_group()
        self._group[path] = x
        self._bytes += x.nbytes

    def _wait(self) -> None:
        response, self._in_flight = self._in_flight, None
        if response is None:
            return
        try:
            response.result()
        except KeyboardInterrupt:
            self._settle(response)
            raise
        except (ValueError, OSError) as e:
            raise _write_error(self.folder, e) from None

    @staticmethod
    def _settle(response) -> None:
        """Waits for an interrupted save to end, whatever its outcome."""
        with contextlib.suppress(Exception):
            response.result()

    def _save_group(self) -> None:
        self._wait()
        group, self._group, self._bytes = self._group, {}, 0
        with self._context, _interrupt_after():
            self._in_flight = ocp.partial.save_async(self._orbax_folder, nest(group))

    def finish(self) -> None:
        """Writes what is queued, waits for every write and commits the checkpoint."""
        if self._group:
            self._save_group()
        self._wait()
        try:
            with self._context, _interrupt_after():
                ocp.partial.finalize(self._orbax_folder)
        except (ValueError, OSError) as e:
            raise _write_error(self.folder, e) from None

    def __enter__(self) -> Writer:
        self._scope = contextlib.ExitStack()
        self._scope.enter_context(_orbax_quiet())
        self._orbax_folder = self._scope.enter_context(_plain_path(self.folder))
        self._scope.enter_context(_watching(self._orbax_folder))
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if self._in_flight is not None:
                response, self._in_flight = self._in_flight, None
                self._settle(response)
        finally:
            self._scope.__exit__(kind, value, traceback)


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and the errors it was raised from (orbax wraps tensorstore's)."""
    chain = [e]
    while chain[-1].__cause__ is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__)
    return chain


def _reason(e: BaseException) -> str:
    """The first line of the error at the root of an orbax failure, short enough for a one-line
    message."""
    e = _causes(e)[-1]
    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _identity(folder: str) -> tuple[int, int] | None:
    """Which folder `folder` names now (device, inode), None when there is none."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_readable(folder: str) -> None:
    """Raises UserError naming the first file or folder under `folder` that cannot be read
    (tried: root ignores mode bits), before orbax would report it as a missing checkpoint."""
    def refuse(e: OSError) -> None:
        if isinstance(e, PermissionError):
            raise unreadable(e.filename, e) from None

    for parent, _, files in os.walk(folder, onerror=refuse):
        for name in files:
            check_readable(os.path.join(parent, name))


def _read_failure(e: BaseException, folder: str, shown: str, before: tuple[int, int] | None,
                  damaged: Callable[[str], UserError]) -> UserError:
    """What a failed read of the orbax checkpoint `folder` (`shown` as orbax saw it) was, as one
    line; `damaged(reason)` only where the files are. Running out of host or device memory, a
    file that cannot be read, an error of the device and a checkpoint replaced meanwhile each say
    so, and that the checkpoint is not the problem."""
    reason = _reason(e).replace(shown, folder)
    chain = _causes(e)
    text = " ".join(str(x) for x in chain)
    on_device = any(isinstance(x, jax.errors.JaxRuntimeError) for x in chain)
    if _identity(folder) != before:
        return UserError(f"{folder} was replaced or removed while it loaded ({reason}); load it "
                         "again.")
    if on_device and "RESOURCE_EXHAUSTED" in text:
        return UserError(f"the device ran out of memory loading {folder} ({reason}); the "
                         "checkpoint is fine: spread the model over more devices (--mesh, or "
                         "load's mesh=) or use a device with more memory.")
    if (any(isinstance(x, MemoryError) for x in chain) or "can't start new thread" in text
            or "Unable to allocate" in text or "RESOURCE_EXHAUSTED" in text):
        return UserError(f"ran out of memory loading {folder} ({reason}); the checkpoint is "
                         "fine: close other programs or load it where there is more memory.")
    if on_device:
        return UserError(f"the device failed while loading {folder} ({reason}); this is not "
                         "damage to the checkpoint: check the device (jax.devices()) and run "
                         "again.")
    if ("PERMISSION_DENIED" in text or any(isinstance(x, PermissionError) for x in chain)
            or "os_error_code=13" in text or "os_error_code='13'" in text):
        return UserError(f"cannot read {folder} ({reason}); make it readable (chmod -R u+rX, "
                         "or run as its owner) and try again.")
    return damaged(reason)


@contextlib.contextmanager
def _reading(folder: str, damaged: Callable[[str], UserError]) -> Iterator[str]:
    """Runs an orbax read of `folder` (absolute): yields the path to give orbax (`_plain_path`),
    with orbax's log quiet, and turns any failure into one UserError (`_read_failure`)."""
    before = _identity(folder)
    with _orbax_quiet(), _plain_path(folder) as shown, _watching(shown):
        try:
            yield shown
        except UserError:
            raise
        except Exception as e:  # orbax raises what its layers raise: ValueError, OSError, ...
            raise _read_failure(e, folder, shown, before, damaged) from None


def stored(folder: str, *, error: Callable[[str], UserError]
           ) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """`{params path: (shape, dtype)}` of every array in the orbax checkpoint `folder`, from its
    metadata (no data read). Damage raises `error(reason)`; any other failure (a file that cannot
    be read, memory) its own UserError."""
    folder = os.path.abspath(folder)
    _check_readable(folder)
    with _reading(folder, error) as shown:
        tree = ocp.metadata(shown).metadata
        if not isinstance(tree, dict):
            raise error("no array metadata")
        found = flatten(tree)
        unreadable = [path for path, m in found.items() if getattr(m, "shape", None) is None]
        if unreadable:  # orbax's tree metadata lists it, but its array metadata is gone
            raise error(f"no array metadata for '{'.'.join(orbax_key(unreadable[0]))}'")
    return {path: (tuple(m.shape), np.dtype(m.dtype)) for path, m in found.items()}


def restore(folder: str, abstract: dict[Path, Any] | None, *,
            error: Callable[[str], UserError],
            found: dict[Path, tuple[tuple[int, ...], np.dtype]] | None = None
            ) -> dict[Path, Any]:
    """Reads the arrays of `abstract` (`{params path: jax.ShapeDtypeStruct}` with shardings, all
    of them or some) from the orbax checkpoint `folder`, each straight into its sharding and cast
    to its dtype; with
    `abstract` None, every array as saved, in host memory (numpy). `found`: `stored(folder)`,
    when the caller has it. Failures raise as in `stored`."""
    folder = os.path.abspath(folder)
    found = stored(folder, error=error) if found is None else found
    largest = max((math.prod(shape) * dtype.itemsize for shape, dtype in found.values()),
                  default=0)
    context = ocp.Context()
    context.memory.read_concurrent_bytes = max(READ_BYTES, largest + 1)
    # Some of the arrays only (a load that quantises reads a layer at a time).
    context.pytree.loading.partial_load = abstract is not None and len(abstract) < len(found)
    try:
        with _reading(folder, error) as shown, context:
            tree = ocp.load(shown, None if abstract is None else nest(abstract))
    finally:
        # Orbax's restore leaves reference cycles that hold its read buffers (about 5 % of a
        # checkpoint's bytes, measured): free them now rather than at some later collection.
        gc.collect()
    return flatten(tree)
