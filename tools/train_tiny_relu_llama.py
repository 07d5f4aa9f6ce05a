"""Trains a small ReLU-Llama on the standard library's docstrings and comments, on CPU.

The result is an ordinary Hugging Face `LlamaForCausalLM` folder (bfloat16 safetensors, a byte-level
BPE tokenizer, a model card) whose MLP uses `hidden_act="relu"`, so many neurons are exactly zero:
a real model for SparseInfer's tests and demos that needs no download. The text is the English of
the `.py` files under `sysconfig.get_paths()["stdlib"]`, so any machine with Python has it (its
exact content depends on the Python version, which the model card records).

    python tools/train_tiny_relu_llama.py --minutes 25

Everything is deterministic from `--seed` given the step count; without `--steps` the count is
chosen from the measured speed to fill `--minutes`, and the model card records it, so rerunning
with `--steps N` reproduces the run.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import math
import os
import platform
import re
import sys
import sysconfig
import time
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparseinfer_jax.io import names
from sparseinfer_jax.model.config import LlamaConfig, RopeConfig
from sparseinfer_jax.model.llama import Llama
from sparseinfer_jax.model.rope import rope_tables

DEFAULT_OUT = os.path.join("sparseinfer_jax", "models", "tiny-relu-llama")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Folders that are not the same on every Python install (third-party code, test suites that some
# distributions ship separately) or hold no prose.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
VALIDATION_EVERY = 20  # every 20th module (in path order) is held out
VALIDATION_FILE_CHARS = 200_000
CALIBRATION_FILE_CHARS = 100_000


# --- Text -------------------------------------------------------------------------------------


def stdlib_modules() -> list[str]:
    """The standard library's `.py` files, sorted by their path relative to the stdlib root."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        # Generated per machine, not prose.
        paths += [os.path.join(folder, f) for f in files
                  if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return sorted(paths, key=lambda p: os.path.relpath(p, root))


def _is_prose(comment: str) -> bool:
    return any(c.isalpha() for c in comment) and not re.match(r"(!|-\*-|\s*(noqa|type:|pragma))",
                                                             comment)


def module_text(path: str) -> str:
    """A module's docstrings and comment blocks in source order, separated by blank lines."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    pieces = []  # (line, text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                pieces.append((node.body[0].lineno, doc.strip()))
    comments = []  # (line, text) of prose comments
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#")
            text = text[1:] if text.startswith(" ") else text
            if _is_prose(text):
                comments.append((tok.start[0], text.rstrip()))
    blocks = []  # [first line, last line, texts]: comments on consecutive lines form one block
    for line, text in comments:
        if blocks and blocks[-1][1] == line - 1:
            blocks[-1][1] = line
            blocks[-1][2].append(text)
        else:
            blocks.append([line, line, [text]])
    pieces += [(first, "\n".join(texts)) for first, _, texts in blocks]
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def load_corpus(max_modules: int | None = None) -> tuple[list[str], list[str]]:
    """(training texts, validation texts), one per module; every 20th module is validation."""
    train, val = [], []
    paths = stdlib_modules()[:max_modules]
    for i, path in enumerate(tqdm(paths, desc="reading stdlib", unit="file", leave=False)):
        text = module_text(path)
        if text:
            (val if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else train).append(text)
    return train, val


def capped_text(texts: list[str], max_chars: int) -> str:
    """The texts that fit in `max_chars`, in order, joined by blank lines (else the first, cut)."""
    out, size = [], 0
    for text in texts:
        if size + len(text) + 2 > max_chars:
            continue
        out.append(text)
        size += len(text) + 2
    return "\n\n".join(out) if out else texts[0][:max_chars]


# --- Tokenizer --------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (`<pad>`, `<s>`, `</s>` = 0, 1, 2) that prepends `<s>` to every encoding.

    Byte-level pre-tokenizer and decoder with no normaliser, so decode(encode(text)) == text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def save_tokenizer(tok, folder: str, max_length: int) -> None:
    tok.save(os.path.join(folder, "tokenizer.json"))
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    _write_json(os.path.join(folder, "tokenizer_config.json"), settings)


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts as one int32 stream, each `<s> ... </s>` (the tokenizer adds the `<s>`)."""
    ids = [e.ids + [EOS_ID] for e in tok.encode_batch(texts)]
    return np.fromiter((i for doc in ids for i in doc), dtype=np.int32)


# --- Model and training -----------------------------------------------------------------------


def model_config(args: argparse.Namespace, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=args.max_positions,
        rope=RopeConfig(theta=10000.0),
        hidden_act="relu",
        bos_token_id=BOS_ID,
        eos_token_ids=(EOS_ID,),
        pad_token_id=PAD_ID,
    )


def batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int):
    """Endless `[batch, seq_len + 1]` windows: each epoch a shuffled tiling at a random offset."""
    rng = np.random.default_rng(seed)
    while True:
        offset = int(rng.integers(seq_len))
        starts = np.arange(offset, len(tokens) - seq_len - 1, seq_len)
        starts = starts[rng.permutation(len(starts))]
        for i in range(0, len(starts) - batch + 1, batch):
            yield np.stack([tokens[s:s + seq_len + 1] for s in starts[i:i + batch]])


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to `peak`, then cosine to `peak / 10` at `total` (a function of step alone
    during warmup, so timing the first steps does not change them)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _decays(path, _) -> bool:
    """Weight decay on matrices, not on norm scales."""
    return not any("norm" in str(getattr(k, "key", k)) for k in path)


def _optimizer(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(learning_rate, b1=0.9, b2=0.95, weight_decay=weight_decay,
                    mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p)),
    )


def make_train_step(graphdef, rest, tx):
    """A jitted `(params, opt_state, batch, lr) -> (params, opt_state, loss)`; only the
    `nnx.Param`s are differentiated (the MLP's sign bits and alpha ride along in `rest`)."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params, rest)
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # The learning rate is data, so a schedule chosen after timing never recompiles.
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(model: Llama, tokens: np.ndarray, args: argparse.Namespace) -> dict:
    """Trains `model` in place with AdamW; returns what the model card reports.

    Without `args.steps`, the first steps are timed and the schedule length is fixed to fill
    `args.minutes` (warmup does not depend on it, so those steps are the same either way).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.inject_hyperparams(_optimizer)(learning_rate=args.lr,
                                              weight_decay=args.weight_decay)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, rest, tx)
    data = batches(tokens, args.batch, args.seq_len, args.seed)
    total, budget, timing_steps = args.steps, args.minutes * 60, 10
    losses = []
    bar = tqdm(total=total, desc="training", unit="step")
    start = compiled = time.perf_counter()
    step = 0
    while total is None or step < total:
        lr = jnp.float32(lr_at(step, total or step + 1, args.lr, args.warmup))
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(next(data)), lr)
        losses.append(loss)
        step += 1
        bar.update(1)
        if step == 1 or (total is None and step == 1 + timing_steps):
            loss.block_until_ready()
        if step == 1:
            compiled = time.perf_counter()  # the first step also compiled
        if total is None and step == 1 + timing_steps:
            now = time.perf_counter()
            total = step + max(0, int((budget - (now - start)) / ((now - compiled) / timing_steps)))
            bar.total = total
            bar.refresh()
        if step % 10 == 0 or step == total:
            recent = float(np.mean(jax.device_get(losses[-10:])))
            bar.set_postfix(loss=f"{recent:.3f}", lr=f"{float(lr):.1e}")
        if time.perf_counter() - start > 1.2 * budget:
            tqdm.write(f"stopping at step {step} of {total}: 20% over the time budget")
            break
    bar.close()
    nnx.update(model, params)
    losses = [float(x) for x in jax.device_get(losses)]
    return {
        "steps": step,
        "schedule_steps": total,
        "train_seconds": time.perf_counter() - start,
        "tokens_seen": step * args.batch * args.seq_len,
        "final_train_loss": float(np.mean(losses[-50:])),
    }


# --- Evaluation -------------------------------------------------------------------------------


@nnx.jit
def _eval_batch(model: Llama, batch: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`batch: [B, T + 1]` -> (summed next-token NLL, per-layer count of zero MLP neurons `[L]`).

    Walks the layers one by one to see each MLP's input; a neuron is zero
    when relu(gate . x) == 0, so its up and down rows need not be read.
    """
    cfg = model.config
    ids = batch[:, :-1]
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rope_tables(cfg, positions)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    x = model.embed_tokens(ids)
    zeros = []
    for layer in model.layers:
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)[0]
        h = layer.post_attention_layernorm(x)
        pre = jnp.einsum("btd,fd->btf", h, layer.mlp.gate[...], preferred_element_type=jnp.float32)
        zeros.append(jnp.sum(layer.mlp.act(pre) == 0))
        x = x + layer.mlp(h)[0]
    logits = model.logits(x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).sum()
    return nll, jnp.stack(zeros)


def evaluate(model: Llama, tokens: np.ndarray, seq_len: int, max_tokens: int,
             batch: int = 8) -> dict:
    """Perplexity and per-layer true MLP sparsity on consecutive `seq_len` windows of `tokens`."""
    n = min(len(tokens) - 1, max_tokens) // seq_len
    assert n > 0, "validation text is shorter than one window"
    windows = np.stack([tokens[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
    nll, zeros = 0.0, np.zeros(model.config.num_hidden_layers)
    for i in tqdm(range(0, n, batch), desc="evaluating", unit="batch", leave=False):
        batch_nll, batch_zeros = _eval_batch(model, jnp.asarray(windows[i:i + batch]))
        nll += float(batch_nll)
        zeros += np.asarray(batch_zeros)
    count = n * seq_len
    return {
        "eval_tokens": count,
        "val_loss": nll / count,
        "val_perplexity": math.exp(nll / count),
        "sparsity": (zeros / (count * model.config.intermediate_size)).tolist(),
    }


# --- Export -----------------------------------------------------------------------------------

def hf_state_dict(model: Llama, dtype=jnp.bfloat16) -> dict[str, jnp.ndarray]:
    """The model's weights under Hugging Face Llama names and layouts, in `dtype`: the converter's
    own table read backwards (`names.to_hf`), so export and conversion cannot disagree."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {name: jnp.asarray(a, dtype) for name, a in names.to_hf(params, model.config)}


def save_hf_checkpoint(model: Llama, folder: str) -> None:
    """Writes `config.json`, `generation_config.json` and bfloat16 `model.safetensors`."""
    from safetensors.flax import save_file

    os.makedirs(folder, exist_ok=True)
    cfg = model.config
    config = {**cfg.to_hf_dict(), "eos_token_id": EOS_ID, "dtype": "bfloat16",
              "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True}
    _write_json(os.path.join(folder, "config.json"), config)
    _write_json(os.path.join(folder, "generation_config.json"),
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    save_file(hf_state_dict(model), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def model_card(args: argparse.Namespace, cfg: LlamaConfig, corpus: dict, run: dict,
               metrics: dict, size_bytes: int, params: int) -> str:
    sparsity = "\n".join(f"| {i} | {s:.3f} |" for i, s in enumerate(metrics["sparsity"]))
    command = (f"python tools/train_tiny_relu_llama.py --seed {args.seed} --steps {run['steps']} "
               f"--hidden {args.hidden} --layers {args.layers} --intermediate {args.intermediate} "
               f"--heads {args.heads} --kv-heads {args.kv_heads} --vocab {args.vocab} "
               f"--seq-len {args.seq_len} --batch {args.batch} --lr {args.lr} "
               f"--warmup {args.warmup} --weight-decay {args.weight_decay}")
    if args.max_modules:
        command += f" --max-modules {args.max_modules}"
    truncated = ("" if run["steps"] == run["schedule_steps"] else
                 f" (stopped by the time limit; the schedule was {run['schedule_steps']} steps)")
    return f"""# tiny-relu-llama

A small Llama with a ReLU MLP (`hidden_act: relu`), trained from scratch by
`tools/train_tiny_relu_llama.py` so SparseInfer-JAX has a real, trained model whose MLP neurons
are exactly zero, with no download. It writes English-like text about Python; it knows little else.

## Data
Docstrings and `#` comments of the Python {platform.python_version()} standard library
(`.py` files under `sysconfig.get_paths()["stdlib"]`, without `test`/`tests` and third-party
folders), extracted with `ast` and `tokenize`, in path order: {corpus['train_modules']} modules
({corpus['train_chars']:,} characters, {corpus['train_tokens']:,} tokens) for training, every
{VALIDATION_EVERY}th module ({corpus['val_modules']} modules, {corpus['val_chars']:,} characters)
held out for validation. `validation.txt` (held-out modules, up to
{VALIDATION_FILE_CHARS // 1000} KB) and `calibration.txt` (every 10th training module, up to
{CALIBRATION_FILE_CHARS // 1000} KB) are here for other tools.

## Model
Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}
(ReLU), {cfg.num_attention_heads} heads of {cfg.head_dim} ({cfg.num_key_value_heads} KV heads),
RoPE theta {cfg.rope.theta:g}, tied embeddings, vocabulary {cfg.vocab_size} (byte-level BPE;
`<pad>`, `<s>`, `</s>` = 0, 1, 2; `<s>` is prepended). {params:,} parameters,
{size_bytes / 2**20:.1f} MiB in bfloat16 safetensors.

## Training
AdamW (b1 0.9, b2 0.95, weight decay {args.weight_decay} on matrices), peak learning rate
{args.lr}, {args.warmup} warmup steps then cosine to a tenth, gradient clipping at 1.0, batch
{args.batch} x {args.seq_len} tokens, float32 on CPU ({os.cpu_count()} cores visible), seed
{args.seed}. {run['steps']} steps{truncated}, {run['tokens_seen']:,} tokens seen,
{run['train_seconds'] / 60:.1f} minutes. Final training loss (mean of the last 50 steps):
{run['final_train_loss']:.3f}.

## Evaluation (held-out text, first {metrics['eval_tokens']:,} tokens, windows of {args.seq_len})
Loss {metrics['val_loss']:.3f}, perplexity {metrics['val_perplexity']:.1f}
(a uniform guess: {cfg.vocab_size}).

True MLP sparsity (fraction of neurons with relu(gate . x) == 0), per layer:

| layer | sparsity |
|---|---|
{sparsity}

## Reproduce
```
{command}
```
"""


# --- Main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=25.0, help="training time budget")
    p.add_argument("--steps", type=int, default=None,
                   help="number of steps (default: as many as fit in --minutes)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-positions", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-tokens", type=int, default=65536,
                   help="held-out tokens to measure perplexity and sparsity on")
    p.add_argument("--max-modules", type=int, default=None,
                   help="read only the first N stdlib modules (quick test runs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        print("--hidden must be a multiple of --heads, and --heads of --kv-heads.", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    train_texts, val_texts = load_corpus(args.max_modules)
    if not val_texts:
        print(f"--max-modules must be at least {VALIDATION_EVERY} to hold out a module.",
              file=sys.stderr)
        return 2
    with open(os.path.join(args.out, "validation.txt"), "w") as f:
        f.write(capped_text(val_texts, VALIDATION_FILE_CHARS))
    with open(os.path.join(args.out, "calibration.txt"), "w") as f:
        # Every 10th training module, so the slice spans the library rather than one package.
        f.write(capped_text(train_texts[::10], CALIBRATION_FILE_CHARS))

    tok = train_tokenizer(train_texts, args.vocab)
    save_tokenizer(tok, args.out, args.max_positions)
    train_tokens = token_stream(tok, train_texts)
    val_tokens = token_stream(tok, val_texts)
    corpus = {"train_modules": len(train_texts), "val_modules": len(val_texts),
              "train_chars": sum(map(len, train_texts)), "val_chars": sum(map(len, val_texts)),
              "train_tokens": len(train_tokens)}
    tqdm.write(f"{corpus['train_modules']} training modules, {len(train_tokens):,} tokens; "
               f"{corpus['val_modules']} held out, {len(val_tokens):,} tokens")

    cfg = model_config(args, tok.get_vocab_size())
    model = Llama(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    run = train(model, train_tokens, args)
    metrics = evaluate(model, val_tokens, args.seq_len, args.eval_tokens)

    save_hf_checkpoint(model, args.out)
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    params = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write(model_card(args, cfg, corpus, run, metrics, size, params))
    tqdm.write(f"{run['steps']} steps, {run['tokens_seen']:,} tokens in "
               f"{run['train_seconds'] / 60:.1f} min; train loss {run['final_train_loss']:.3f}, "
               f"validation perplexity {metrics['val_perplexity']:.1f}; sparsity per layer "
               + " ".join(f"{s:.3f}" for s in metrics["sparsity"])
               + f"; {size / 2**20:.1f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
