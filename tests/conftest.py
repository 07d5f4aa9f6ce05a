"""Shared fixtures: tiny Hugging Face Llama checkpoints written with `save_pretrained`."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

# Tests compare float32 results across libraries: keep XLA on exact float32 matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# The test extra installs the CUDA plugin (for the compile report); without an NVIDIA driver jax
# must run on the CPU, in this process and in the CLIs the tests start.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Each pytest-xdist worker keeps its own compile cache: JAX writes an entry in place, so a worker
# reading one that another is still writing finds it cut short and warns (a line more in a CLI's
# output).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("SPARSEINFER_COMPILE_CACHE", os.path.join(
        os.path.expanduser("~"), ".cache", "sparseinfer",
        f"jax-tests-{os.environ['PYTEST_XDIST_WORKER']}"))

# What jax's CUDA plugin's C++ code logs to stderr when it loads on a machine without a driver
# (absl's "before InitializeLog" notice and its own INFO lines): not the CLIs' output.
_NATIVE_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*)$"
)


def cli_lines(stderr: str) -> str:
    """A child CLI's stderr without the CUDA plugin's native log lines."""
    return "".join(ln for ln in stderr.splitlines(keepends=True)
                   if not _NATIVE_LOG.match(ln.rstrip("\n")))


# The environment of a compile report run as a child process: it compiles what a user runs, at
# the default matmul precision, not the "highest" set above for float32 comparisons (at
# "highest" XLA's GPU backend turns small dots into multiply-and-reduce fusions).
REPORT_ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "default"}

TRAIN_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                          "train_tiny_relu_llama.py")
# Prompts for the first-run check (sparse greedy decoding against dense on a fresh conversion).
FIRST_RUN_PROMPTS = [
    "The module",
    "Return the value of",
    "This function is used to",
    "If the file",
    "Create a new",
]


def train_tool():
    """`tools/train_tiny_relu_llama.py` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_tiny_relu_llama", TRAIN_TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=120,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    hidden_act="relu",
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def write_tokenizer(folder: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with `vocab_size` entries (ids 0..2 are <pad>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet)[: vocab_size - 3]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True},
            f,
        )


def make_hf_checkpoint(
    folder: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    fatrelu_threshold: float | None = None,
    **overrides,
) -> str:
    """Writes a random tiny `LlamaForCausalLM` (float32) with a tokenizer into `folder`.

    `hidden_act="fatrelu"` is not a transformers activation: the model is built with relu and
    the config is rewritten afterwards (tests give the torch reference a FATReLU module).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {**TINY, **overrides}
    act = kwargs["hidden_act"]
    kwargs["hidden_act"] = "relu" if act == "fatrelu" else act
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).to(torch.float32).eval()
    # Random init gives tiny weights: widen them so activations and logits are not degenerate.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    os.makedirs(folder, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    if act == "fatrelu":
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["hidden_act"] = "fatrelu"
        cfg["hidden_act_param"] = 0.1 if fatrelu_threshold is None else fatrelu_threshold
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    write_tokenizer(folder, kwargs["vocab_size"])
    return folder


class FailedSave:
    """What orbax's partial save returns when tensorstore's write fails: `result()` raises."""

    def __init__(self, error: BaseException):
        self.error = error

    def result(self):
        raise self.error


def failing_save(error: int | type[BaseException]):
    """A stand-in for `orbax...partial.save_async` whose write fails: with an OS error number as
    tensorstore reports it (in the message), or with an exception type (KeyboardInterrupt)."""
    if isinstance(error, int):
        error = ValueError(f"OUT_OF_RANGE: Error writing \"a/c/0/0\" in OCDBT database: Failed to "
                           f"write 4096 bytes to file 9: {os.strerror(error)} "
                           f"[os_error_code='{error}']")
    else:
        error = error()
    return lambda *args, **kwargs: FailedSave(error)


@pytest.fixture
def hf_checkpoint(tmp_path):
    """A factory: `hf_checkpoint(name="a", **config_overrides) -> folder`."""

    def make(name: str = "hf", **kwargs) -> str:
        return make_hf_checkpoint(str(tmp_path / name), **kwargs)

    return make


def compilation_count() -> int:
    """Generation programs compiled in this process: a prefill and a decode program per bucket
    and setting (dense and sparse decoding share the prefill)."""
    from sparseinfer_jax.runtime.generation import _COMPILED

    return len(_COMPILED)


def read_params(path: str) -> dict:
    """Every array of a checkpoint's params/ on the host (numpy), as saved: a nested dict in the
    model's per-layer layout (`{"layers": {i: {...}}, ...}`)."""
    from sparseinfer_jax.errors import UserError
    from sparseinfer_jax.io import checkpoint, params

    found = params.restore(os.path.join(path, checkpoint.PARAMS_DIR), None,
                           error=lambda reason: UserError(reason))
    tree: dict = {}
    for p, x in found.items():
        *parents, leaf = p
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = x
    return tree
