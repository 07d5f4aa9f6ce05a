"""The one exception type for mistakes a user can fix, and what the command lines share around it:
one-line errors, Ctrl-C, and output files checked before the work and written whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import NoReturn

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, what shells report for `yes | head`'s `yes`


class UserError(ValueError):
    """Bad input from the user: the message is one sentence saying what was wrong and what to do.

    The command line prints it without a traceback and exits non-zero; internal invariants use
    plain asserts instead.
    """


def run_command(command: Callable[[], int]) -> int:
    """Runs one CLI command and returns its exit status.

    UserError: `error: <message>` on stderr, exit 2. Ctrl-C (KeyboardInterrupt): `interrupted`,
    exit 130. Output into a closed pipe (`| head`): nothing, exit 141, as a Unix tool ended by
    SIGPIPE; onto a full device (`> /dev/full`): one `error:` line, exit 1. Warnings:
    `warning: <message>`, without Python's source line. None prints a traceback; outputs are
    written atomically (`atomic_file`), so an interruption leaves nothing half-written.
    """
    default_hook = sys.unraisablehook

    def deliver_again(unraisable) -> None:
        # A Ctrl-C that lands while a finaliser (__del__, a weakref callback) runs is dropped by
        # Python, and the command would go on: send it again, from another thread so that it
        # arrives after the finaliser, not inside it (again).
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))
            again.daemon = True
            again.start()
        else:
            default_hook(unraisable)

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"warning: {message}", file=sys.stderr)

    sys.unraisablehook = deliver_again
    default_show, warnings.showwarning = warnings.showwarning, one_line
    stdout = sys.stdout = _Stdout(sys.stdout)
    try:
        status = command()
        sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
        return status
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _StdoutFailed as e:
        _discard_stdout()
        print(f"error: writing to standard output failed ({e.args[0].strerror or e.args[0]}); "
              "free some space or send the output elsewhere.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except BrokenPipeError:
        _discard_stdout()
        return BROKEN_PIPE_EXIT
    finally:
        if sys.stdout is stdout:
            sys.stdout = stdout.stream
        if sys.unraisablehook is deliver_again:  # else a filter set meanwhile wraps it: kept
            sys.unraisablehook = default_hook
        warnings.showwarning = default_show


class _StdoutFailed(Exception):
    """Writing stdout failed (a full device, an I/O error): the OSError, told apart from one of
    writing a file."""


class _Stdout:
    """sys.stdout while a command runs: the same stream, whose failed writes (but a closed pipe,
    its own case) raise `_StdoutFailed`."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _StdoutFailed(e) from None

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _StdoutFailed(e) from None


def _discard_stdout() -> None:
    """Whatever is still buffered for stdout would fail again at exit: send it nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def exit_process(status: int) -> NoReturn:
    """Ends a console script with `status` (what `run_command` returned).

    After Ctrl-C, jax's runtime threads can still be running the computation the interrupt left
    behind, and tearing the interpreter down under them can crash it (SIGSEGV after `interrupted`
    is printed). Everything the command wrote is final by then (`atomic_file`), so an interrupted
    command flushes its output and ends at once, skipping the teardown."""
    if status == INTERRUPTED_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def size_text(nbytes: float) -> str:
    """`nbytes` for a message, in the unit that shows it best: "512 B", "3.2 MiB", "13.50 GiB"."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if nbytes >= scale:
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{int(nbytes)} B"


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Raises UserError unless a file can be created in `folder` (tried, not guessed from mode
    bits: root ignores them, and a read-only file system does not show in them)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sparseinfer-probe-")
    except OSError as e:
        raise UserError(
            f"cannot write {what} into {folder} ({e.strerror}); make it writable or choose "
            "another place."
        ) from None
    os.close(fd)
    os.remove(probe)


def unreadable(path: str | os.PathLike, e: OSError) -> UserError:
    """The one-line error for a file or folder that exists but cannot be read (its mode, its
    owner, an I/O error): names it, says why, and that it is not damaged."""
    return UserError(f"cannot read {os.fspath(path)} ({e.strerror or e}); make it readable "
                     "(chmod u+r, or run as its owner) and try again.")


def check_readable(path: str | os.PathLike) -> None:
    """Raises `unreadable` unless the file `path` can be opened for reading (tried: root ignores
    mode bits). A missing file is left to the caller's own message."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        return
    except OSError as e:
        raise unreadable(path, e) from None


# The mark of an output file of ours, so that a later run may replace it: the first field of a
# JSON report (of each record in a list), and a tEXt chunk of a PNG (`write_report`,
# `write_plot`).
MARK_FIELD = "written_by"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_KEYWORD = b"Comment"
# A report of ours is far below this; a larger file is not parsed to find out.
_REPORT_LIMIT = 256 * 2**20


def _mark(command: str) -> str:
    return f"sparseinfer {command}"


def check_output_file(path: str | os.PathLike, flag: str, *, inputs=()) -> None:
    """Raises UserError unless `path` can be written as a new file, or replaces a report or plot
    this tool wrote before (`_written_here`): not a folder, not one of `inputs` (files, or folders
    whose files are inputs), in an existing, writable folder. Call it before the work that
    produces the file."""
    path = os.fspath(path)
    if not path.strip():
        raise UserError(f"{flag} is empty; give a file name.")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name.")
    real = os.path.realpath(path)
    for given in inputs:
        inside = os.path.realpath(given)
        if real == inside or real.startswith(inside.rstrip(os.sep) + os.sep):
            raise UserError(f"{flag} {path} would overwrite the input {given}; "
                            "choose another path.")
    if os.path.lexists(path) and not _written_here(path):
        raise UserError(f"{flag} {path} exists and was not written by sparseinfer; choose "
                        "another path, or remove it first.")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        state = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
        raise UserError(f"{flag} {path}: {parent} {state}; create the folder or choose another.")
    check_writable_folder(parent, f"{flag} {os.path.basename(path)}")


def _written_here(path: str) -> bool:
    """Whether `path` is a plain file this tool wrote: a JSON report whose every record starts
    with our `MARK_FIELD`, or a PNG carrying our tEXt chunk. Anything else (a script that
    imports this package, a user's own matplotlib figure) is not."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE:
                return _png_mark(f) is not None
        if os.path.getsize(path) > _REPORT_LIMIT:
            return False
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    records = report if isinstance(report, list) and report else [report]
    return all(isinstance(r, dict) and next(iter(r), None) == MARK_FIELD
               and str(r[MARK_FIELD]).startswith(_mark("")) for r in records)


def _png_mark(f) -> str | None:
    """Our mark in the PNG `f` (read past its signature), from the tEXt chunks before its image
    data, or None."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            return None
        size, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind in (b"IDAT", b"IEND") or size > 2**16:
            return None
        data = f.read(size)
        f.read(4)  # the chunk's CRC
        keyword, _, text = data.partition(b"\0")
        ours = f"written by {_mark('')}".encode("latin-1")
        if kind == b"tEXt" and keyword == _PNG_KEYWORD and text.startswith(ours):
            return text.decode("latin-1")


def _stamp_png(path: str, command: str) -> None:
    """Adds our tEXt chunk to the PNG at `path`, right after its header chunk (IHDR)."""
    with open(path, "rb") as f:
        png = f.read()
    end_of_header = len(_PNG_SIGNATURE) + 8 + int.from_bytes(png[8:12], "big") + 4
    data = _PNG_KEYWORD + b"\0" + f"written by {_mark(command)}".encode("latin-1")
    chunk = (len(data).to_bytes(4, "big") + b"tEXt" + data
             + zlib.crc32(b"tEXt" + data).to_bytes(4, "big"))
    with open(path, "wb") as f:
        f.write(png[:end_of_header] + chunk + png[end_of_header:])


def check_distinct_outputs(**paths: str | None) -> None:
    """Raises UserError when two output flags name one file (`check_distinct_outputs(json=...,
    plot=...)`): the second would replace the first."""
    given = [(flag, os.path.realpath(p)) for flag, p in paths.items() if p]
    for i, (flag, real) in enumerate(given):
        for other, real2 in given[i + 1:]:
            if real == real2:
                raise UserError(f"--{flag} and --{other} name the same file; give each its own.")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` (same suffix, so writers that go by it still work)
    that replaces `path` when the block succeeds and is removed when it fails or is interrupted."""
    path = os.path.abspath(os.fspath(path))
    head, tail = os.path.split(path)
    tmp = os.path.join(
        head, f".{tail}.tmp-{os.getpid()}-{secrets.token_hex(4)}{os.path.splitext(tail)[1]}"
    )
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_report(path: str | os.PathLike, report: dict | list[dict], command: str, *,
                 indent: int = 1) -> None:
    """Writes a command's JSON report to `path` whole (`atomic_file`), marked as written by
    `sparseinfer <command>` (`MARK_FIELD` first in a dict, and in each record of a list) so that a
    later run may replace it (`check_output_file`)."""
    mark = {MARK_FIELD: _mark(command)}
    marked = {**mark, **report} if isinstance(report, dict) else [{**mark, **r} for r in report]
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(marked, f, indent=indent)
        f.write("\n")


def write_plot(path: str | os.PathLike, draw: Callable[[str], None], command: str) -> None:
    """Writes a command's plot to `path` whole: `draw(tmp)` saves the figure (its format by the
    suffix); a PNG is marked as written by `sparseinfer <command>`, so that a later run may
    replace it (other formats carry no mark of ours and are never replaced)."""
    with atomic_file(path) as tmp:
        draw(tmp)
        with open(tmp, "rb") as f:
            png = f.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
        if png:
            _stamp_png(tmp, command)
