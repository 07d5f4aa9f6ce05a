"""Bad input to the converter, the checkpoint and the loader: one table, one row per case.

Each row prepares a bad situation in a fresh folder, runs a command (`sparseinfer-convert`) or an
API call (`load`, through the CLIs' `run_command`), and checks what a user sees: the exit
status, one `error:` line holding the expected fragment (or `interrupted`), no traceback, and
that nothing was written or lost (the source and any existing output unchanged, no temporary
folder left).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_lines, failing_save, make_hf_checkpoint
from safetensors.numpy import load_file, save_file

from convert import convert
from convert.cli import main as convert_main
from sparseinfer_jax.api import calibrate as api_calibrate
from sparseinfer_jax.errors import UserError, run_command
from sparseinfer_jax.io import checkpoint, params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> str:
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "hf"), tie_word_embeddings=True)


@pytest.fixture(scope="module")
def ckpt(hf, tmp_path_factory) -> str:
    return convert(hf, tmp_path_factory.mktemp("ckpt") / "ckpt", calibrate=False)


def snapshot(folder: str) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    data = edit(data)
    with open(path, "w") as f:
        json.dump(data, f)


def set_fields(**fields):
    return lambda data: {**data, **fields}


def rewrite_tensor(folder: str, name: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def load_call(path: str, **kwargs):
    from sparseinfer_jax import load

    return lambda: (load(path, mesh=None, **kwargs), 0)[1]


# --- the cases: each `prepare(work, src, ckpt) -> (command, args)` -------------------------------
# `work` is an empty folder, `src` a copy of a tiny HF folder, `ckpt` a copy of its conversion.
# command "convert": args for sparseinfer-convert; "api": a no-argument callable returning 0.


def out_is_folder_of_other_files(work, src, ckpt):
    os.makedirs(f"{work}/mine")
    open(f"{work}/mine/notes.txt", "w").write("keep me")
    return "convert", [src, f"{work}/mine", "--overwrite"]


def out_is_cwd_with_other_files(work, src, ckpt):
    open(f"{work}/notes.txt", "w").write("keep me")
    os.chdir(work)
    return "convert", [src, ".", "--overwrite"]


def out_is_a_file(work, src, ckpt):
    open(f"{work}/out", "w").write("a file")
    return "convert", [src, f"{work}/out"]


def out_is_a_file_overwrite(work, src, ckpt):
    open(f"{work}/out", "w").write("a file")
    return "convert", [src, f"{work}/out", "--overwrite"]


def out_is_a_link_to_a_checkpoint(work, src, ckpt):
    os.symlink(ckpt, f"{work}/link")
    return "convert", [src, f"{work}/link", "--overwrite"]


def out_parent_is_a_file(work, src, ckpt):
    open(f"{work}/file", "w").write("a file")
    return "convert", [src, f"{work}/file/sub/out"]


def overwrite_a_checkpoint_holding_notes(work, src, ckpt):
    open(f"{ckpt}/notes.txt", "w").write("mine")
    return "convert", [src, ckpt, "--overwrite"]


def out_empty(work, src, ckpt):
    os.chdir(work)  # '' would resolve to here
    return "convert", [src, ""]


def model_is_a_link_loop(work, src, ckpt):
    loop = os.path.join(os.path.dirname(work), "loop")  # beside work/, which is read back
    os.symlink(loop, loop)
    return "api", load_call(loop)


def checkpoint_without_overwrite(work, src, ckpt):
    return "convert", [src, ckpt]


def config_edit(**fields):
    def prepare(work, src, ckpt):
        edit_json(f"{src}/config.json", set_fields(**fields))
        return "convert", [src, f"{work}/out"]
    return prepare


def source_is_a_checkpoint(work, src, ckpt):
    return "convert", [ckpt, f"{work}/out"]


def config_not_an_object(work, src, ckpt):
    edit_json(f"{src}/config.json", lambda data: [data])
    return "convert", [src, f"{work}/out"]


def index_is_a_list(work, src, ckpt):
    tensors = load_file(f"{src}/model.safetensors")
    os.rename(f"{src}/model.safetensors", f"{src}/model-00001-of-00001.safetensors")
    with open(f"{src}/model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": [[n, "model-00001-of-00001.safetensors"] for n in tensors]}, f)
    return "convert", [src, f"{work}/out"]


def weight_value(name, value):
    def prepare(work, src, ckpt):
        rewrite_tensor(src, name, lambda x: x.reshape(-1).__setitem__(3, value))
        return "convert", [src, f"{work}/out"]
    return prepare


def corrupt_tokenizer_convert(work, src, ckpt):
    open(f"{src}/tokenizer.json", "a").write("}{")
    return "convert", [src, f"{work}/out"]


def corrupt_tokenizer_load(work, src, ckpt):
    open(f"{ckpt}/tokenizer.json", "a").write("}{")
    params.restore = None  # any weight read would fail loudly
    return "api", load_call(ckpt)


def too_little_space(work, src, ckpt):
    shutil.disk_usage = lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 4096, 4096)
    return "convert", [src, f"{work}/out"]


def disk_full_while_writing(work, src, ckpt):
    params.ocp.partial.save_async = failing_save(errno.ENOSPC)
    return "convert", [src, ckpt, "--overwrite"]


def unwritable_output_folder(work, src, ckpt):
    os.makedirs(f"{work}/ro")
    real = os.mkdir

    def mkdir(path, *args, **kwargs):  # root may write anywhere: refuse the way a kernel would
        if os.path.dirname(path) == f"{work}/ro":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, *args, **kwargs)
    os.mkdir = mkdir
    return "convert", [src, f"{work}/ro/out"]


def ctrl_c_while_writing(work, src, ckpt):
    params.ocp.partial.save_async = failing_save(KeyboardInterrupt)
    return "convert", [src, ckpt, "--overwrite"]


def ctrl_c_while_calibrating(work, src, ckpt):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    api_calibrate.calibrate_default = interrupted
    return "convert", [src, ckpt, "--overwrite"]


def damaged(edit):
    def prepare(work, src, ckpt):
        edit(f"{ckpt}/{checkpoint.PARAMS_DIR}")
        return "api", load_call(ckpt)
    return prepare


def data_files(folder: str) -> list[str]:
    """The files holding the arrays' bytes in an orbax checkpoint (OCDBT data files)."""
    return sorted(glob.glob(os.path.join(folder, "state", "ocdbt.process_*", "d", "*")))


def biggest_data_file(folder: str) -> str:
    return max(data_files(folder), key=os.path.getsize)


def truncate(path: str) -> None:
    """Cuts the file in half: into array data (its tail may hold index nodes orbax no longer
    reads once the checkpoint is committed)."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def failing_load(error: BaseException, replace: bool = False):
    """`load` of the checkpoint with orbax's read failing with `error` (what it raises when the
    host or the device runs out of memory, or the device fails); with `replace`, after another
    run replaced the checkpoint (as `sparseinfer-convert --overwrite` does), its files gone."""
    def prepare(work, src, ckpt):
        def load(path, *args, **kwargs):
            if replace:
                shutil.copytree(ckpt, f"{work}/new")
                shutil.rmtree(ckpt)
                os.rename(f"{work}/new", ckpt)
            raise error
        params.ocp.load = load
        return "api", load_call(ckpt)
    return prepare


def overwrite_with_ff(folder: str) -> None:
    """Overwrites the stored bytes of the largest array (uncompressed: found by their value) with
    0xff, which no index or checksum of orbax's notices."""
    arrays = params.restore(folder, None, error=AssertionError)
    data = max(arrays.values(), key=lambda x: x.nbytes).tobytes()
    for path in data_files(folder):
        with open(path, "r+b") as f:
            at = f.read().find(data)
            if at >= 0:
                f.seek(at)
                f.write(b"\xff" * len(data))
                return
    raise AssertionError("the array's bytes are not in any data file")


def format_version(version):
    def prepare(work, src, ckpt):
        edit_json(f"{ckpt}/config.json", lambda d: {
            **d, "sparseinfer": {**d["sparseinfer"], "format_version": version}})
        return "api", load_call(ckpt)
    return prepare


def checkpoint_field(key, value):
    def prepare(work, src, ckpt):
        edit_json(f"{ckpt}/config.json", lambda d: {**d, "sparseinfer": {
            **d["sparseinfer"], key: value}})
        return "api", load_call(ckpt)
    return prepare


DAMAGED = "the checkpoint .* is damaged( \\(.*\\))?: convert the model again"
CASES = {
    # 11.1: --overwrite replaces only a checkpoint this tool wrote.
    "overwrite other folder": (out_is_folder_of_other_files,
                               "is not a checkpoint written by sparseinfer-convert", 2),
    "overwrite cwd": (out_is_cwd_with_other_files,
                      "is not a checkpoint written by sparseinfer-convert", 2),
    "existing checkpoint": (checkpoint_without_overwrite, "already exists; pass --overwrite", 2),
    # 11.10 and 11.6: what works is suggested; path problems found before any work.
    "out is a file": (out_is_a_file, "is a file, not a checkpoint folder; choose a new output", 2),
    "out is a file, overwrite": (out_is_a_file_overwrite, "is a file, not a checkpoint folder", 2),
    "out is a link to a checkpoint": (out_is_a_link_to_a_checkpoint,
                                      "is a link .*give the folder itself", 2),
    # Issue 30: what --overwrite would delete, an empty OUT, a link that leads nowhere.
    "overwrite a checkpoint holding a user's notes": (
        overwrite_a_checkpoint_holding_notes, r"also holds notes\.txt, which is not part of the "
        "checkpoint and --overwrite would delete; move it out first", 2),
    "out empty": (out_empty, "the output path is empty", 2),
    "model is a loop of links": (model_is_a_link_loop, "is a link that leads nowhere", 2),
    "parent is a file": (out_parent_is_a_file, "is a file, so .* cannot be created", 2),
    "unwritable output": (unwritable_output_folder, r"cannot create .*\(Permission denied\)", 2),
    # 11.2: disk space checked up front, write failures are errors.
    "too little space": (too_little_space,
                         r"has 4\.0 KiB free but the checkpoint needs \d+\.\d MiB", 2),
    "disk full": (disk_full_while_writing, r"failed \(the disk is full\); nothing was written", 2),
    # Ctrl-C.
    "ctrl-c": (ctrl_c_while_writing, "^interrupted$", 130),
    # The default calibration runs before the new checkpoint replaces the old one.
    "ctrl-c while calibrating, overwrite": (ctrl_c_while_calibrating, "^interrupted$", 130),
    # 11.8: config values of the wrong type name the field.
    "hidden_size string": (config_edit(hidden_size="48"),
                           "'hidden_size' must be an integer, got '48'", 2),
    "hidden_size null": (config_edit(hidden_size=None), "'hidden_size' field", 2),
    "rope_scaling list": (config_edit(rope_scaling=[2.0]), "'rope_scaling' must be an object", 2),
    "rope factor string": (config_edit(rope_parameters=None,
                                       rope_scaling={"type": "linear", "factor": "2"}),
                           "'rope_scaling.factor' must be a number", 2),
    "alpha string": (config_edit(sparseinfer={"alpha": "1.0"}),
                     "'sparseinfer.alpha' must be a number or a list of numbers", 2),
    "block list": (config_edit(sparseinfer=[1.0]), "field 'sparseinfer' must be an object", 2),
    # Issue 23.1: the source's predictor is kept, so an unknown one is refused before the work.
    "predictor unknown": (config_edit(sparseinfer={"predictor": "magic"}),
                          "'sparseinfer.predictor' is 'magic'; use one of sign, signmag", 2),
    "source already converted": (source_is_a_checkpoint,
                                 "is a checkpoint converted by sparseinfer-convert already", 2),
    "config list": (config_not_an_object, "must hold a JSON object, got list", 2),
    "index list": (index_is_a_list, "is not a valid safetensors index", 2),
    "corrupt tokenizer, convert": (corrupt_tokenizer_convert,
                                   "tokenizer.json is not a valid tokenizer file", 2),
    "corrupt tokenizer, load": (corrupt_tokenizer_load,
                                "tokenizer.json is not a valid tokenizer file", 2),
    # 11.9: conflicting or unsupported rope settings, non-finite weights.
    "rope conflict": (config_edit(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                  rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                      "'rope_parameters' and 'rope_scaling'/'rope_theta' disagree on 'rope_type'",
                      2),
    "rope yarn": (config_edit(rope_parameters={"rope_type": "yarn", "factor": 2.0}),
                  "'rope_parameters.rope_type' is 'yarn'; supported", 2),
    "nan weight": (weight_value("model.layers.1.mlp.up_proj.weight", np.nan),
                   r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has 1 NaN or infinite", 2),
    "inf weight": (weight_value("model.embed_tokens.weight", -np.inf),
                   r"tensor 'model\.embed_tokens\.weight' has 1 NaN or infinite", 2),
    # 11.5: a damaged checkpoint says which and to re-convert it.
    "data file deleted": (damaged(lambda p: os.remove(biggest_data_file(p))), DAMAGED, 2),
    "data file truncated": (damaged(lambda p: truncate(biggest_data_file(p))), DAMAGED, 2),
    "data files deleted": (damaged(lambda p: [os.remove(f) for f in data_files(p)]), DAMAGED, 2),
    "manifest deleted": (damaged(lambda p: os.remove(f"{p}/state/manifest.ocdbt")), DAMAGED, 2),
    "tree metadata deleted": (damaged(lambda p: os.remove(f"{p}/state/_METADATA")), DAMAGED, 2),
    "params empty": (damaged(lambda p: [shutil.rmtree(f"{p}/{f}") if os.path.isdir(f"{p}/{f}")
                                        else os.remove(f"{p}/{f}") for f in os.listdir(p)]),
                     DAMAGED, 2),
    "params deleted": (damaged(shutil.rmtree), r"has no params/ folder; the checkpoint .* is "
                       "damaged", 2),
    # Issue 30: array bytes overwritten where no index notices; errors that are not damage say
    # what they were and never ask to convert again.
    "data file overwritten with 0xff": (damaged(overwrite_with_ff),
                                        r"is damaged \(tensor '.*' holds NaN or infinite values\)",
                                        2),
    "out of host memory at load": (
        failing_load(MemoryError("Unable to allocate 16.0 MiB for an array with shape (4096, "
                                 "2048) and data type bfloat16")),
        r"^ran out of memory loading .*\(Unable to allocate 16\.0 MiB.*the checkpoint is fine",
        2),
    "no thread left at load": (failing_load(RuntimeError("can't start new thread")),
                               r"^ran out of memory loading .*the checkpoint is fine", 2),
    "device out of memory at load": (
        failing_load(jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.13GiB.")),
        r"^the device ran out of memory loading .*more devices \(--mesh", 2),
    "XLA error at load": (
        failing_load(jax.errors.JaxRuntimeError("INTERNAL: CUDA_ERROR_ILLEGAL_ADDRESS")),
        r"^the device failed while loading .*\(INTERNAL: .*not damage to the checkpoint", 2),
    "checkpoint replaced while loading": (
        failing_load(ValueError('NOT_FOUND: Error reading "a/c/0/0" in OCDBT database at local '
                                'file "x": [tensorstore_spec=...]'), replace=True),
        r"was replaced or removed while it loaded .*; load it again\.$", 2),
    "load as int8": (lambda work, src, ckpt: ("api", load_call(ckpt, dtype=jnp.int8)),
                     "dtype must be one of bfloat16, float16, float32, got int8", 2),
    "unknown format_version": (format_version(99), "unknown checkpoint format_version 99", 2),
    "format 1": (format_version(1), "is a checkpoint of format 1 .* convert the model again", 2),
    "format 2": (format_version(2), r"is a checkpoint of format 2 \(attention weights stored as "
                 r"\(in, out\).* convert the model again", 2),
    "format 3": (format_version(3), r"is a checkpoint of format 3 \(per-layer safetensors files,"
                 r".* convert the model again", 2),
    "checkpoint alpha string": (checkpoint_field("alpha", "x"),
                                "'sparseinfer.alpha' must be a number", 2),
    # Values a config.json field cannot hold: named with the field, not as a flag's error.
    "rms_norm_eps negative": (config_edit(rms_norm_eps=-1),
                              "'rms_norm_eps' must be a positive number, got -1.0", 2),
    "rope_theta negative": (config_edit(rope_parameters={"rope_type": "default",
                                                         "rope_theta": -5}),
                            "'rope_parameters.rope_theta' must be a positive number", 2),
    "checkpoint alpha one of two layers": (checkpoint_field("alpha", [1.0]),
                                           r"config\.json field 'sparseinfer\.alpha' must be a "
                                           r"positive number or \d+ of them", 2),
    "checkpoint alpha negative": (checkpoint_field("alpha", [-1.0, 0.0]),
                                  r"config\.json field 'sparseinfer\.alpha' must be", 2),
    "checkpoint predictor unknown": (checkpoint_field("predictor", "magic"),
                                     "'sparseinfer.predictor' is 'magic'; use one of sign", 2),
    "checkpoint calibration number": (checkpoint_field("calibration", 3),
                                      "'sparseinfer.calibration' must be a string", 2),
    "checkpoint dtype unknown": (checkpoint_field("dtype", "int8"),
                                 "'sparseinfer.dtype' is 'int8', not one of bfloat16", 2),
}

# Rows whose checkpoint is intact: the failure is elsewhere.
GOOD_CHECKPOINT = {"out of host memory at load", "no thread left at load",
                   "device out of memory at load", "XLA error at load",
                   "checkpoint replaced while loading", "load as int8"}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, hf, ckpt, tmp_path, monkeypatch, capsys):
    prepare, fragment, code = CASES[case]
    work, src, ck = str(tmp_path / "work"), str(tmp_path / "src"), str(tmp_path / "ckpt")
    os.makedirs(work)
    shutil.copytree(hf, src)
    shutil.copytree(ckpt, ck)
    monkeypatch.chdir(tmp_path)
    # Whatever `prepare` patches (os.mkdir, Writer.write, ...) is undone after the test.
    for owner, name in ((os, "mkdir"), (shutil, "disk_usage"), (params.ocp.partial, "save_async"),
                        (params, "restore"), (params.ocp, "load"),
                        (api_calibrate, "calibrate_default")):
        monkeypatch.setattr(owner, name, getattr(owner, name))
    command, args = prepare(work, src, ck)
    before = {d: snapshot(d) for d in (work, src, ck)}
    status = convert_main(args) if command == "convert" else run_command(args)
    err = capsys.readouterr().err
    assert status == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1].split("\r")[-1]  # after any progress bar
    assert last.startswith("error: ") or last == "interrupted", err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) <= 1
    assert re.search(fragment, last.removeprefix("error: ")), last
    if case in GOOD_CHECKPOINT:  # never condemned: converting again would not help
        assert "damaged" not in last and "convert the model again" not in last
    assert {d: snapshot(d) for d in (work, src, ck)} == before  # nothing written, nothing lost
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


# A damaged checkpoint read in a real process: orbax's failed reads leave tasks and tensorstore
# callbacks behind that Python reports later (at collection, at exit) as tracebacks, after the
# error line; the in-process table above ends before they arrive.
DAMAGED_IN_A_PROCESS = {
    "manifest deleted": lambda p: os.remove(f"{p}/state/manifest.ocdbt"),
    "tree metadata deleted": lambda p: os.remove(f"{p}/state/_METADATA"),
    "data files deleted": lambda p: [os.remove(f) for f in data_files(p)],
    "data file truncated": lambda p: truncate(biggest_data_file(p)),
}
LATE = """
import gc, sys, time
from sparseinfer_jax.cli.main import main
status = main(["generate", "--model", sys.argv[1], "--prompt", "x", "--max-new-tokens", "2"])
time.sleep(1)  # orbax's threads finish what the failure left running
gc.collect()
sys.exit(status)
"""


@pytest.mark.parametrize("case", list(DAMAGED_IN_A_PROCESS))
def test_damaged_checkpoint_in_a_process_is_one_line(case, ckpt, tmp_path):
    ck = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, ck)
    DAMAGED_IN_A_PROCESS[case](f"{ck}/{checkpoint.PARAMS_DIR}")
    done = subprocess.run([sys.executable, "-c", LATE, ck], capture_output=True, text=True,
                          timeout=300)
    err = cli_lines(done.stderr)
    assert done.returncode == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert re.search(DAMAGED, err), err


# Files of a checkpoint that cannot be read: named, never called damage (read in a real process
# where file modes apply: root's override of them is dropped).
UNREADABLE = {
    "data file": lambda ck: biggest_data_file(f"{ck}/params"),
    "d/ folder": lambda ck: os.path.dirname(biggest_data_file(f"{ck}/params")),
    "state/ folder": lambda ck: f"{ck}/params/state",
    "_METADATA": lambda ck: f"{ck}/params/state/_METADATA",
    "config.json": lambda ck: f"{ck}/config.json",
    "tokenizer.json": lambda ck: f"{ck}/tokenizer.json",
}


def modes_apply() -> list[str]:
    """A command prefix under which file modes apply to this user (root ignores them)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes do not apply")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_checkpoint_file_is_named_not_damage(case, ckpt, tmp_path):
    ck = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, ck)
    locked = UNREADABLE[case](ck)
    os.chmod(locked, 0)
    try:
        done = subprocess.run(
            [*modes_apply(), sys.executable, "-m", "sparseinfer_jax.cli", "generate", "--model",
             ck, "--prompt", "x", "--max-new-tokens", "2"], cwd=ROOT, capture_output=True,
            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    finally:
        os.chmod(locked, 0o755)
    err = cli_lines(done.stderr)
    assert done.returncode == 2, err[-3000:]
    assert len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith(f"error: cannot read {locked} (Permission denied)"), err
    assert "damaged" not in err and " again with" not in err and "download" not in err


# Errors of anything but orbax's failed read that arrive while its leftovers are being dropped:
# each still reaches the user. (how it arrives, the error)
def _raised_while_handling_orbax(error: BaseException, folder: str) -> BaseException:
    error.__context__ = ValueError(f'NOT_FOUND: Error reading in OCDBT database at local file '
                                   f'"{folder}/params/state/" [tensorstore_spec=...]')
    return error


FOREIGN_LEFTOVERS = {
    "a finaliser finds its event loop closed": (
        "finaliser", lambda ck: RuntimeError("Event loop is closed")),
    "an XLA error without a traceback": (
        "future", lambda ck: jax.errors.JaxRuntimeError("INTERNAL: Failed to execute XLA Runtime "
                                                        "executable: run time error")),
    "XLA out of memory": (
        "future", lambda ck: jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")),
    "a numpy error raised while handling orbax's": (
        "future", lambda ck: _raised_while_handling_orbax(
            np.linalg.LinAlgError("Singular matrix"), ck)),
    "an OS error raised while handling orbax's": (
        "future", lambda ck: _raised_while_handling_orbax(
            OSError(errno.EIO, "Input/output error"), ck)),
}


@pytest.mark.parametrize("case", list(FOREIGN_LEFTOVERS))
def test_errors_from_elsewhere_come_through(case, ckpt, tmp_path, monkeypatch, caplog):
    import asyncio
    import gc

    from sparseinfer_jax import load

    ck = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, ck)
    os.remove(f"{ck}/params/state/manifest.ocdbt")
    shown = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: shown.append(u.exc_value))
    with pytest.raises(UserError, match="is damaged"):
        load(ck, mesh=None)  # orbax's leftovers of this failure are dropped from now on
    time.sleep(1)
    gc.collect()
    shown.clear()
    caplog.clear()
    how, make = FOREIGN_LEFTOVERS[case]
    error = make(ck)
    if how == "finaliser":
        class Finaliser:
            def __del__(self):
                raise error

        Finaliser()
        assert shown == [error]
    else:
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(error)
        del future
        gc.collect()
        loop.close()
        reports = [r for r in caplog.records if r.exc_info and r.exc_info[1] is error]
        assert len(reports) == 1, caplog.text
        assert "exception was never retrieved" in reports[0].getMessage()


# Paths orbax misreads (glob's characters: it finds its staging folders by glob; a backslash:
# tensorstore's separator): converted into and loaded from as any other.
AWKWARD_PATHS = {"brackets": "model[v2]", "a backslash": "ck\\x"}


@pytest.mark.parametrize("case", list(AWKWARD_PATHS))
def test_a_path_orbax_misreads_converts_and_loads(case, hf, ckpt, tmp_path):
    from flax import nnx

    from sparseinfer_jax import load

    name = AWKWARD_PATHS[case]
    out, moved = tmp_path / "out" / name, tmp_path / "moved" / name
    assert convert_main([hf, str(out), "--no-calibrate"]) == 0
    assert os.listdir(tmp_path / "out") == [name.split("/")[0]]  # nothing left beside it
    assert sorted(os.listdir(out / "params")) == sorted(os.listdir(f"{ckpt}/params"))
    shutil.copytree(ckpt, moved)
    want = jax.tree.leaves(nnx.state(load(ckpt, mesh=None)[0]))
    for path in (out, moved):
        got = jax.tree.leaves(nnx.state(load(path, mesh=None)[0]))
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_real_write_failure_is_an_error_not_a_crash(hf, tmp_path):
    """A write the kernel refuses (a file-size limit, as a full disk would) ends in one error line
    and exit 2, with nothing left behind: writes go through write(), never a memory map."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        from convert.cli import main
        sys.exit(main([{hf!r}, {str(tmp_path / "out")!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("error: writing ") and "File too large" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_a_real_process(hf, tmp_path):
    """SIGINT while the converter writes: one line, exit 130, no temporary folder, no output."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        # Python's Ctrl-C handler, as in a terminal (a background job starts with SIGINT ignored)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from sparseinfer_jax.io import params
        params.GROUP_BYTES = 1  # each array its own save: one is written while the next comes
        add = params.Writer.add
        def slow(self, path, x):
            time.sleep(0.2)
            add(self, path, x)
        params.Writer.add = slow
        sys.argv[1:] = [{hf!r}, {str(tmp_path / "out")!r}]
        from sparseinfer_jax.cli.console import sparseinfer_convert
        sparseinfer_convert()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 120
    while not any(p.startswith(".out.tmp") for p in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # inside the writing loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].split("\r")[-1] == "interrupted"
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


def _another_run_made_it(out: str) -> None:
    os.makedirs(out)
    with open(os.path.join(out, "theirs"), "w") as f:
        f.write("kept")


# (what happens while a checkpoint is written to OUT, overwrite, error or warning, what OUT holds)
WHILE_WRITING = {
    "another run makes OUT meanwhile": (_another_run_made_it, False,
                                        "created by another run meanwhile", "theirs"),
    "old checkpoint cannot be removed": (None, True, "could not be removed", "new"),
}


@pytest.mark.parametrize("case", list(WHILE_WRITING))
def test_what_happens_to_out_while_writing(case, tmp_path, monkeypatch):
    """The swap at the end of a write: OUT made meanwhile by another run is not replaced without
    --overwrite (both runs had reported success); an old checkpoint that cannot be removed is
    left and named in a warning, not reported as a failed write."""
    meanwhile, overwrite, said, holds = WHILE_WRITING[case]
    out = str(tmp_path / "out")
    if meanwhile is None:
        os.makedirs(os.path.join(out, checkpoint.PARAMS_DIR))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"sparseinfer": {"format_version": 4}}, f)
        rmtree = shutil.rmtree

        def refuse_old(path, *args, **kwargs):
            if ".old" in os.path.basename(path):
                raise PermissionError(errno.EPERM, "Operation not permitted")
            rmtree(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint.shutil, "rmtree", refuse_old)
    with (pytest.warns(RuntimeWarning, match=said) if meanwhile is None
          else pytest.raises(UserError, match=said)):
        with checkpoint.atomic_directory(out, overwrite=overwrite) as tmp:
            with open(os.path.join(tmp, "new"), "w") as f:
                f.write("new")
            if meanwhile is not None:
                meanwhile(out)
    assert holds in os.listdir(out)
    hidden = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert len(hidden) == (0 if meanwhile is not None else 1), hidden  # the old one, named
