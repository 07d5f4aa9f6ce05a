"""Writes `colab/sparseinfer_jax.ipynb` from the cells below (outputs stripped).

Edit the cells here, run `python colab/build_notebook.py`, and commit both files; the test
`tests/test_colab.py` executes the notebook and checks that it matches this script.
"""

from __future__ import annotations

import os
import sys

import nbformat

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sparseinfer_jax.ipynb")
BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/sparseinfer/sparseinfer-jax/blob/main/colab/"
    "sparseinfer_jax.ipynb)"
)

CELLS: list[tuple[str, str]] = [
    ("md", f"""\
# SparseInfer-JAX: a ReLU-Llama that skips the MLP neurons it predicts are zero

{BADGE}

ReLU-fied Llama models (ProSparse-Llama-2, ReluLLaMA) leave most MLP neurons at exactly zero for
each token. SparseInfer predicts which ones from the **sign bits** of `W_gate` and the MLP input,
with no trained predictor, and reads only the weight rows of the neurons predicted active.
Decoding is memory-bound, so bytes not read are time saved.

This notebook: installs the package, picks a model and checks it fits your GPU, converts it to a
SparseInfer checkpoint, generates in `dense` and `sparse` mode side by side, plots the per-layer
sparsity, sweeps the `alpha` knob, and shows how to use the Flax module from your own code.
Use a GPU runtime (*Runtime > Change runtime type*): an **L4** or **A100** for the 7B models; the
small shipped model runs anywhere, CPU included."""),
    ("md", """\
## 1. Install, find the runtime, and check the model fits it

Runs on a CPU, GPU (T4, L4, A100, H100) or TPU (v5e, v6e) runtime with no edits. Colab already
has jax, flax, numpy and matplotlib: the cell installs only this package and what is missing
(`huggingface_hub` comes with the `[colab]` extra). jax is upgraded only when Colab's is older
than the package needs, and then together with what runs it on this runtime (its CUDA plugin, or
on a TPU `jax[tpu]`, which brings the matching libtpu: a newer jax beside an older libtpu fails);
if that happens, *Runtime > Restart session* and run the notebook again.
`XLA_PYTHON_CLIENT_MEM_FRACTION` lets JAX use 95% of the GPU instead of its default 75%, which a
7B model needs on a 24 GB card; it must be set before jax is imported.

The cell then says which runtime it found, which path and dtype sparse mode takes there, and
whether the chosen model fits this runtime's memory at the chosen context, before anything is
downloaded: where it does not (a 7B model on a CPU runtime's 12.7 GB of RAM would download 27 GB,
convert, then crash the VM at load), it says so and runs the shipped small model instead.
`MODEL` is a Hugging Face hub id or a local folder; `SPARSEINFER_MODEL` overrides it (the tests
point it at the shipped model). Choices: `SparseLLM/prosparse-llama-2-7b` (default, FATReLU, ~89%
MLP sparsity), `SparseLLM/ReluLLaMA-7B` (ReLU), `"shipped"` (the 5M-parameter ReLU-Llama inside
the package: no download; on a CPU it shows the mechanics, not the speed-up)."""),
    ("code", """\
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = "https://github.com/sparseinfer/sparseinfer-jax"
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
ON_TPU_VM = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0") or bool(
    os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("COLAB_TPU_ADDR"))


def pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


if os.environ.get("SPARSEINFER_SKIP_INSTALL") != "1":
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("jax")) < Version("0.10.2"):
        # jax, jaxlib and what runs them here, upgraded together.
        extra = "[tpu]" if ON_TPU_VM else "[cuda12]" if shutil.which("nvidia-smi") else ""
        pip("-U", f"jax{extra}>=0.10.2")
    pip(f"sparseinfer-jax[colab] @ git+{REPO}")

import jax  # noqa: E402

import pallas_kernels  # noqa: E402
import sparseinfer_jax as si  # noqa: E402
from sparseinfer_jax.api.loading import SHIPPED_MODEL  # noqa: E402
from sparseinfer_jax.model.memory import GiB, estimate_memory, fits  # noqa: E402

ACCELERATED = jax.default_backend() != "cpu"
DEVICE_KIND = jax.devices()[0].device_kind
# T4s have no bfloat16 tensor cores: float16 is their 16-bit dtype; TPUs have no float16.
DTYPE = "float16" if "T4" in DEVICE_KIND else "bfloat16"
CONTEXT = 2048 if ACCELERATED else 256
print(f"runtime: {jax.default_backend()} {DEVICE_KIND} x {jax.device_count()}, "
      f"jax {jax.__version__}")
print(f"sparse mode: {pallas_kernels.describe()}; weights in {DTYPE}")


def memory_bytes() -> int:
    \"\"\"What the model must fit: the accelerator's memory, or the host's RAM on a CPU.\"\"\"
    stats = jax.devices()[0].memory_stats() or {}
    if ACCELERATED and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


MODEL = os.environ.get("SPARSEINFER_MODEL", "SparseLLM/prosparse-llama-2-7b")
# MODEL = "SparseLLM/ReluLLaMA-7B"
# MODEL = "shipped"
if MODEL == "shipped":
    MODEL = SHIPPED_MODEL
if os.path.isdir(MODEL):
    config_file = Path(MODEL) / "config.json"
else:  # config.json alone: a few KB, before any weights
    from huggingface_hub import hf_hub_download

    config_file = Path(hf_hub_download(MODEL, "config.json"))
config = si.config_from_hf_dict(json.loads(config_file.read_text()))
estimate = estimate_memory(config, context=CONTEXT, dtype=DTYPE)
available = memory_bytes()
# The host also holds Python, jax and the tokenizer: a CPU runtime keeps a quarter free.
share = 0.95 if ACCELERATED else 0.75
if fits(estimate, available, memory_fraction=share):
    print(f"{MODEL} needs {estimate.total_bytes / GiB:.1f} GiB at {CONTEXT} tokens in {DTYPE}: "
          f"fits the {available / GiB:.1f} GiB here.")
else:
    print(f"{MODEL} needs {estimate.total_bytes / GiB:.1f} GiB at {CONTEXT} tokens in {DTYPE}, "
          f"more than this runtime's {available / GiB:.1f} GiB: running the shipped small model "
          "instead (choose an L4, A100 or TPU runtime for a 7B model).")
    MODEL, config_file = SHIPPED_MODEL, Path(SHIPPED_MODEL) / "config.json"
    config = si.config_from_hf_dict(json.loads(config_file.read_text()))"""),
    ("md", """\
## 2. The memory the model needs, on each of Colab's accelerators

What a 7B Llama-2 needs on the GPU in a 16-bit dtype (6.74 B parameters, 32 layers, no GQA):

| | bytes |
|---|---|
| weights (bf16/fp16) | 13.48 GB = 12.55 GiB |
| W_gate sign bits (1 bit per gate weight) | 0.18 GB = 0.17 GiB |
| KV cache | 0.5 MiB per token: 1 GiB at 2k, 2 GiB at 4k |
| prefill transients (attention scores of a full-length prompt) | 0.9 GiB at 2k, 3.3 GiB at 4k |
| CUDA/XLA overhead (rough) | ~1 GiB |
| **total** | **~15.6 GiB at 2k, ~19.1 GiB at 4k** |

`generate` gives the KV cache `bucket(prompt) + bucket(new tokens)` slots (powers of two), so a
512-token prompt with 512 new tokens uses 1k slots. On Colab's GPUs:
- **T4** (15 GiB, no bfloat16 tensor cores: use `float16`): the weights alone take 12.6 GiB; a 7B
  model fits only with a short context (about 512 tokens) and little headroom. Prefer an L4.
- **L4** (22.5 GiB): 7B in bf16 with a 4k context.
- **A100 40 GB**: 7B in bf16, a batch of 4 at 4k (12 at 2k) or an 8k cache; **A100 80 GB**: a
  16k cache, or a batch of 11 at 4k (32 at 2k).

Host side, for the conversion: the download is 27 GB of float32 safetensors for either 7B model
(in the hub cache), the converter streams one tensor at a time and writes groups of up to 384 MiB
(about 1.5 GB of RAM; Colab has 12.7 GB), and the disk needs the download plus the 13.5 GB output,
each byte written once (~41 GB of Colab's ~100 GB). The cell below computes the GPU figures from
the model's own `config.json`."""),
    ("code", """\
from sparseinfer_jax.model.memory import COLAB_GPUS, NO_BF16, format_estimate, max_context

print(f"{MODEL}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
      f"MLP {config.intermediate_size}, activation {config.hidden_act}")
estimate = estimate_memory(config, context=CONTEXT, dtype=DTYPE)
print(f"\\nMemory for one sequence of {CONTEXT} tokens in {DTYPE}:")
print(format_estimate(estimate, CONTEXT))
print("\\nColab GPUs (JAX given 95% of the card):")
for gpu, size in COLAB_GPUS.items():
    dtype = "float16" if gpu in NO_BF16 else "bfloat16"
    est = estimate_memory(config, context=CONTEXT, dtype=dtype)
    verdict = "fits" if fits(est, size) else "does not fit"
    print(f"  {gpu:<10} {size / GiB:5.1f} GiB, {dtype:<8}: {verdict} at {CONTEXT} tokens; "
          f"longest context that fits: {max_context(config, size, dtype=dtype)}")
OUT = Path(os.environ.get("SPARSEINFER_OUT", "sparseinfer_out")).resolve()
OUT.mkdir(parents=True, exist_ok=True)"""),
    ("md", """\
## 3. Convert to a SparseInfer checkpoint

The converter downloads the model (hub ids; progress bars from `huggingface_hub`), then streams one
tensor at a time into the checkpoint layout, an orbax checkpoint (`params/`) beside `config.json`
and the tokenizer: bf16 weights with each neuron's rows contiguous and the sign bits of `W_gate`
packed 32 to a uint32. It writes into a temporary folder renamed at the end. An existing
checkpoint is reused, never overwritten: delete the folder to convert again.
To keep the checkpoint across Colab sessions, set `SPARSEINFER_OUT` to a folder on Google Drive.

Both 7B repos ship only a sentencepiece `tokenizer.model`; the cell saves the equivalent
`tokenizer.json` next to it with transformers (needs `sentencepiece`, which Colab has)."""),
    ("code", """\
from convert import convert

CHECKPOINT = OUT / "checkpoints" / Path(MODEL.rstrip("/")).name
if CHECKPOINT.exists():
    print(f"{CHECKPOINT} exists: using it (delete the folder to convert again).")
else:
    # A source that carries calibrated alphas (the shipped model does) keeps them; otherwise 1.0.
    alpha = (json.loads(config_file.read_text()).get("sparseinfer") or {}).get("alpha")
    convert(MODEL, CHECKPOINT, dtype="bfloat16", alpha=alpha)
if not (CHECKPOINT / "tokenizer.json").exists() and (CHECKPOINT / "tokenizer.model").exists():
    from transformers import LlamaTokenizerFast

    LlamaTokenizerFast.from_pretrained(CHECKPOINT).save_pretrained(CHECKPOINT)
size = sum(f.stat().st_size for f in CHECKPOINT.rglob("*") if f.is_file())
print(f"checkpoint: {CHECKPOINT} ({size / 2**20:.1f} MiB)")"""),
    ("md", """\
## 4. Generate: dense and sparse, side by side

`si.load` restores the checkpoint onto the device. `generate` compiles the prefill (always dense)
and the whole decode loop into one program; compile time is reported separately from the decode
throughput, and each mode runs twice so that the warm second run is the one timed. In `sparse`
mode every decode step predicts the active neurons from sign bits and reads only their rows of
`W_gate`, `W_up` and `W_down`. On a GPU with a 7B model that is where the speed-up comes from; on
CPU with the small model the gathers cost about what they save, so expect little or none there."""),
    ("code", """\
from IPython.display import HTML, display

model, tokenizer = si.load(CHECKPOINT, mode="sparse", dtype=DTYPE)
PROMPT = ("If the file does not exist," if config.hidden_size < 1024
          else "The key idea behind activation sparsity in large language models is")
NEW_TOKENS = 128 if ACCELERATED else 32



def run(mode, **kwargs):
    return si.generate(model, PROMPT, tokenizer=tokenizer, max_new_tokens=NEW_TOKENS, mode=mode,
                       **kwargs)


results, compile_s = {}, {}
for mode in ("dense", "sparse"):
    stats = "predicted" if mode == "sparse" else None
    compile_s[mode] = run(mode, stats=stats).timing.compile_s  # compiles and warms up
    results[mode] = run(mode, stats=stats)
rows = "".join(
    f"<tr><th>{mode}</th><td style='text-align:left;white-space:pre-wrap'>"
    f"{PROMPT}<b>{r.text[0]}</b></td><td>{r.timing.tokens_per_s:.1f}</td>"
    f"<td>{compile_s[mode]:.1f}</td></tr>"
    for mode, r in results.items()
)
display(HTML("<table><tr><th>mode</th><th>text</th><th>tokens/s</th><th>compile s</th></tr>"
             f"{rows}</table>"))
speedup = results["sparse"].timing.tokens_per_s / results["dense"].timing.tokens_per_s
skipped = results["sparse"].stats.predicted_sparsity.mean()
mlp_bytes = results["sparse"].stats.mlp_bytes_fraction.mean()
print(f"sparse/dense decode speed: {speedup:.2f}x, with {skipped:.1%} of MLP neurons skipped; "
      f"MLP bytes read per token: {mlp_bytes:.3f} of dense (predictor included)")"""),
    ("md", """\
## 5. Per-layer sparsity (and, in diagnostic mode, recall)

`stats="predicted"` counts the neurons each layer skips. `stats="diagnostic"` also computes the
full gate to get the true activation mask, so it reports the true sparsity, and the **recall**
(the share of truly active neurons the predictor kept: a missed one changes the output) and
precision. Diagnostic mode is for measuring, not for speed."""),
    ("code", """\
import matplotlib.pyplot as plt
import numpy as np

diag = run("sparse", stats="diagnostic").stats
layers = np.arange(config.num_hidden_layers)
fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers)), 3.5))
for i, (values, label) in enumerate([(diag.true_sparsity, "true sparsity"),
                                     (diag.predicted_sparsity, "predicted sparsity"),
                                     (diag.recall, "recall")]):
    ax.bar(layers + (i - 1) * 0.27, values, 0.27, label=label)
ax.set_xticks(layers[:: max(1, len(layers) // 16)])
ax.set_xlabel("layer")
ax.set_ylim(0, 1.3)
ax.set_title(f"{Path(MODEL).name}: sparse decoding, per layer")
ax.legend(loc="upper center", ncol=3)
fig.tight_layout()
fig.savefig(OUT / "layer_sparsity.png", dpi=120)
plt.show()
print(f"mean: true sparsity {diag.true_sparsity.mean():.3f}, predicted "
      f"{diag.predicted_sparsity.mean():.3f}, recall {diag.recall.mean():.3f}, "
      f"precision {diag.precision.mean():.3f}")"""),
    ("md", """\
## 6. The alpha knob: speed and perplexity against MLP bytes read

A neuron is predicted zero when its negative sign products outnumber `alpha` times the positive
ones (`signmag` weights each vote by the input's quantised magnitude): **larger alpha is more
conservative** (skips fewer neurons, higher recall). The sparse MLP reads the gate rows of the
predicted neurons and the up and down rows of those whose gate fires, so the figure that sets
decode speed is the MLP bytes read per token (predictor included), plotted against perplexity.
Alpha is per layer and passed to the compiled program as data, so the sweep below never
recompiles. For each scale of the checkpoint's alphas it measures decode speed (from `generate`)
and perplexity on a held-out text (from `evaluation.alpha_sweep`). The sweep is small on CPU; on
a GPU it uses more scales and tokens."""),
    ("code", """\
from sparseinfer_jax.io.text import read_text, token_windows
from sparseinfer_jax.tuning.evaluation import alpha_sweep, evaluate

SCALES = [0.8, 0.9, 1.0, 1.1, 1.25, 1.5] if ACCELERATED else [0.9, 1.0, 1.2]
EVAL_TOKENS = 4096 if ACCELERATED else 256
text = read_text(Path(SHIPPED_MODEL) / "validation.txt")
windows = token_windows(tokenizer.encode(text), max_tokens=EVAL_TOKENS)
base_alpha = np.asarray(model.alphas())

points = alpha_sweep(model, windows, SCALES)
for point in points:
    r = run("sparse", alpha=base_alpha * point["scale"], stats="predicted")
    point["tokens_per_s"] = r.timing.tokens_per_s
    point["decode_sparsity"] = float(r.stats.predicted_sparsity.mean())
dense_ppl = evaluate(model, windows, modes=("dense",))["modes"]["dense"]["perplexity"]
dense_tps = results["dense"].timing.tokens_per_s

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot([p["decode_sparsity"] for p in points], [p["tokens_per_s"] for p in points], "o-",
          label="sparse")
left.axhline(dense_tps, color="gray", ls="--", label="dense")
left.set_xlabel("predicted sparsity while decoding")
left.set_ylabel("tokens/s")
left.set_title("decode speed")
right.plot([p["mlp_bytes_fraction"] for p in points], [p["perplexity"] for p in points], "o-",
           label="sparse")
right.axhline(dense_ppl, color="gray", ls="--", label="dense")
right.set_xlabel("MLP bytes read per token (of dense, predictor included)")
right.set_ylabel(f"perplexity ({sum(w.shape[1] for w in windows)} tokens)")
right.set_title("accuracy")
for p in points:
    left.annotate(f"x{p['scale']:g}", (p["decode_sparsity"], p["tokens_per_s"]), fontsize=8)
    right.annotate(f"x{p['scale']:g}", (p["mlp_bytes_fraction"], p["perplexity"]), fontsize=8)
for ax in (left, right):
    ax.legend()
fig.tight_layout()
fig.savefig(OUT / "alpha_sweep.png", dpi=120)
plt.show()
print(f"dense: perplexity {dense_ppl:.2f}, {dense_tps:.1f} tokens/s")
for p in points:
    print(f"alpha x{p['scale']:<5g} sparsity {p['predicted_sparsity']:.3f}, recall "
          f"{p['recall']:.3f}, MLP bytes {p['mlp_bytes_fraction']:.3f}, "
          f"perplexity {p['perplexity']:.2f}, "
          f"{p['tokens_per_s']:.1f} tokens/s")"""),
    ("md", """\
## 7. The Flax module in your own code

`model` is a Flax NNX module: `model(input_ids)` returns logits `[batch, seq, vocab]` (float32)
like `LlamaForCausalLM`, in the mode it was loaded with (`mode=` overrides per call). Its state
is explicit (`nnx.split`, `nnx.state`), it works under `nnx.jit`, and alpha is an ordinary
variable: change it (or pass `alpha=` to `si.load` or `si.generate`) without recompiling."""),
    ("code", """\
import jax.numpy as jnp
from flax import nnx

ids = jnp.asarray([tokenizer.encode(PROMPT)], jnp.int32)  # [1, T]
logits = model(ids)  # [1, T, vocab], sparse mode (as loaded)
dense_logits = model(ids, mode="dense")
print("logits", logits.shape, logits.dtype, "| next token:",
      repr(tokenizer.decode([int(logits[0, -1].argmax())])),
      f"| max |sparse - dense| = {float(jnp.abs(logits - dense_logits).max()):.3g}")

params = nnx.state(model, nnx.Param)
print(f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M parameters;",
      "alpha per layer:", np.asarray(model.alphas()).round(3))


@nnx.jit
def next_token(model, ids):
    return model(ids)[:, -1].argmax(-1)


print("greedy next token:", tokenizer.decode(next_token(model, ids).tolist()))
model.set_alphas(model.alphas() * 0.8)  # more skipping, same program
print("with alpha x0.8:  ", tokenizer.decode(next_token(model, ids).tolist()))
model.set_alphas(base_alpha)"""),
    ("md", """\
## What fits where, and what was not verified

For the 7B checkpoints (6.74 B parameters) in a 16-bit dtype: 12.55 GiB of weights, 0.17 GiB of
sign bits, 0.5 MiB of KV cache per token (1 GiB at 2k, 2 GiB at 4k), plus prefill transients and
~1 GiB of runtime overhead:

| Colab GPU | memory | dtype | 7B, 2k context | 7B, 4k context | longest cache (batch 1) |
|---|---|---|---|---|---|
| T4 | 15 GiB | float16 | no (15.6 GiB) | no (19.1 GiB) | ~512 tokens |
| L4 | 22.5 GiB | bfloat16 | yes, batch <= 3 | yes, batch 1 | 4k |
| A100 | 40 GiB | bfloat16 | yes, batch <= 12 | yes, batch <= 4 | 8k |
| A100 | 80 GiB | bfloat16 | yes, batch <= 32 | yes, batch <= 11 | 16k |

The conversion needs ~27 GB of download, ~55 GB of disk at peak and little RAM.

Tested in CI on CPU with the shipped small model only. Not verified: running on Colab's GPUs, the
hub download and conversion of the 7B checkpoints, the tokenizer conversion from
`tokenizer.model`, and the float16 path on a T4."""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata.update(
        {
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "L4"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
    )
    for i, (kind, source) in enumerate(CELLS):
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source)
        cell["id"] = f"cell-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main() -> int:
    text = nbformat.writes(build())
    if "--check" in sys.argv[1:]:
        with open(NOTEBOOK) as f:
            return 0 if f.read() == text else 1
    with open(NOTEBOOK, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
