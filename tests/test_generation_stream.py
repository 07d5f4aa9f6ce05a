"""Chunked (streaming) decoding, incremental detokenisation, the repetition penalty and `follow`.

Streaming must hand over exactly the tokens of the one-call decode, in order, from the same
compiled programs; the printer must never write half a character; the penalty must match
transformers' `RepetitionPenaltyLogitsProcessor`; `follow` must count the model's own choices.
"""

from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compilation_count

from sparseinfer_jax import UserError, generate, load
from sparseinfer_jax.runtime.sampling import penalize_repeats
from sparseinfer_jax.runtime.streaming import TextStream

PROMPTS = [[5, 9, 13], [20, 21, 22, 23, 24, 25, 26]]
NEW = 13  # not a multiple of any chunk below, and under its bucket (16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(str(tmp_path_factory.mktemp("stream")))
    return load(folder, dtype="float32", backend="xla")


def _collect(model, chunk: int, **kw):
    pieces = []
    result = generate(model, PROMPTS, max_new_tokens=NEW, stream=pieces.append,
                      stream_chunk=chunk, **kw)
    return result, pieces


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("chunk", [1, 3, 8, 64, None])
@pytest.mark.parametrize(
    "sampling",
    [dict(), dict(temperature=0.9, top_p=0.8, repetition_penalty=1.3, seed=4)],
    ids=["greedy", "sampled"],
)
def test_streamed_tokens_equal_the_one_call_decode(tiny, mode, chunk, sampling):
    model, _ = tiny
    kw = dict(mode=mode, stop_at_eos=False, **sampling)
    whole = generate(model, PROMPTS, max_new_tokens=NEW, **kw)
    before = compilation_count()
    streamed, pieces = _collect(model, chunk, **kw)
    assert compilation_count() == before  # the same two programs, whatever the chunk
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole.tokens)
    np.testing.assert_array_equal(streamed.tokens, whole.tokens)
    # The prefill's token first, then calls of `chunk` decode steps (the last may be shorter);
    # sized by the step rate when None, starting at one step.
    assert [p.shape[1] for p in pieces[:2]] == [1, min(chunk or 1, NEW - 1)]
    assert all(p.shape[1] <= (chunk or NEW) for p in pieces[1:])


def test_streaming_stops_at_eos_like_the_one_call_decode(tiny):
    model, _ = tiny
    free = generate(model, PROMPTS[:1], max_new_tokens=NEW, stop_at_eos=False).tokens[0]
    # Make a token the EOS that first appears a few steps in: the row must end there.
    at = next((i for i in range(3, NEW) if free[i] not in free[:i]), None)
    if at is None:
        pytest.skip("the greedy continuation repeats one token")
    kw = dict(max_new_tokens=NEW, eos_token_ids=[int(free[at])])
    whole = generate(model, PROMPTS[:1], **kw)
    pieces = []
    streamed = generate(model, PROMPTS[:1], stream=pieces.append, stream_chunk=2, **kw)
    assert whole.tokens.shape == (1, at + 1) and streamed.lengths.tolist() == [at + 1]
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole.tokens)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A byte-level tokenizer with every byte its own token, so one character spans tokens."""
    from conftest import write_tokenizer

    from sparseinfer_jax.io.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("bytes")
    write_tokenizer(str(folder), 3 + 256)
    return Tokenizer(str(folder))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_text_stream_never_writes_half_a_character(byte_tokenizer, chunk):
    text = "héllo ☃ wörld 𝄞 naïve"
    ids = byte_tokenizer.encode(text)[1:]  # without BOS, as generated tokens come
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    out = io.StringIO()
    stream = TextStream(byte_tokenizer, out, row=1, eos_token_ids=[2])
    row = np.asarray(ids + [2, 70, 71])  # tokens after the EOS must not be written
    batch = np.stack([np.zeros_like(row), row])
    writes = []
    for start in range(0, batch.shape[1], chunk):
        stream(batch[:, start : start + chunk])
        writes.append(out.getvalue())
    stream.finish()
    assert all("\ufffd" not in w for w in writes)
    assert out.getvalue() == stream.text == text
    assert len(set(writes)) > 3  # it wrote as it went, not once at the end


def test_text_stream_finish_writes_what_was_held_back(byte_tokenizer):
    ids = byte_tokenizer.encode("a☃")[1:]
    out = io.StringIO()
    stream = TextStream(byte_tokenizer, out)
    stream(np.asarray([ids[:-1]]))  # "a" and two of the snowman's three bytes
    assert out.getvalue() == "a"
    stream.finish()
    assert out.getvalue() == byte_tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("penalty", [1.0, 1.3, 2.0])
@pytest.mark.parametrize("vocab", [7, 130])
def test_repetition_penalty_matches_transformers(penalty, vocab):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(vocab)
    logits = (3 * rng.standard_normal((3, vocab))).astype(np.float32)
    history = rng.integers(0, vocab, size=(3, 5))
    seen = np.zeros((3, vocab), bool)
    np.put_along_axis(seen, history, True, axis=1)
    ours = penalize_repeats(jnp.asarray(logits), jnp.asarray(seen), jnp.float32(penalty))
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor(history), torch.tensor(logits)
    )
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_greedy_with_a_repetition_penalty_matches_a_step_by_step_reference(tiny):
    """The loop's penalty sees the prompt and every token so far, as transformers does."""
    model, _ = tiny
    prompt, penalty, steps = [7, 8, 9, 7], 1.8, 10
    out = generate(model, [prompt], max_new_tokens=steps, repetition_penalty=penalty,
                   stop_at_eos=False).tokens[0]
    ids = list(prompt)
    for _ in range(steps):
        logits = np.asarray(model(jnp.asarray([ids])))[0, -1]
        seen = np.zeros(logits.shape, bool)
        seen[ids] = True
        logits = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        ids.append(int(np.argmax(logits)))
    np.testing.assert_array_equal(out, ids[len(prompt):])
    plain = generate(model, [prompt], max_new_tokens=steps, stop_at_eos=False).tokens[0]
    assert len(set(out.tolist())) >= len(set(plain.tolist()))


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.2, top_p=0.9, seed=7)],
                         ids=["greedy", "sampled"])
def test_follow_counts_the_models_own_choices(tiny, sampling):
    model, _ = tiny
    kw = dict(max_new_tokens=NEW, stop_at_eos=False, **sampling)
    own = generate(model, PROMPTS, **kw)
    assert own.agreed.tolist() == own.lengths.tolist()
    again = generate(model, PROMPTS, follow=own.tokens, **kw)
    np.testing.assert_array_equal(again.tokens, own.tokens)
    assert again.agreed.tolist() == own.lengths.tolist()
    # Other tokens: they are emitted (the loop follows them) and mostly not the model's choice.
    other = (own.tokens + 1 + np.arange(NEW)) % model.config.vocab_size
    forced = generate(model, PROMPTS, follow=other[:, :5], **kw)
    np.testing.assert_array_equal(forced.tokens[:, :5], other[:, :5])
    assert (forced.agreed < own.lengths).all()


def test_follow_of_sparse_tokens_in_dense_mode(tiny):
    """The --compare measurement: dense decoding fed the sparse tokens, with keep-all alpha
    (sparse computes every neuron) agrees everywhere; with a skipping alpha it stays in [0, N]."""
    model, _ = tiny
    kw = dict(max_new_tokens=NEW, stop_at_eos=False)
    for alpha, exact in ((float("inf"), True), (0.9, False)):
        sparse = generate(model, PROMPTS, mode="sparse", alpha=alpha, **kw)
        dense = generate(model, PROMPTS, mode="dense", follow=sparse.tokens, **kw)
        np.testing.assert_array_equal(dense.tokens, sparse.tokens)
        if exact:
            assert dense.agreed.tolist() == sparse.lengths.tolist()
        assert ((dense.agreed >= 0) & (dense.agreed <= sparse.lengths)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(repetition_penalty=0.9), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(stream_chunk=0, stream=print), "stream_chunk"),
        (dict(follow=[[3, 4]]), "follow"),  # one row for two prompts
        (dict(follow=[[3] * (NEW + 1), [3]]), "follow"),  # longer than max_new_tokens
        (dict(follow=[[3], [1000]]), "vocabulary"),
        (dict(follow=[[3], [-1]]), "vocabulary"),
    ],
)
def test_bad_arguments_raise_user_errors(tiny, kwargs, match):
    model, _ = tiny
    with pytest.raises(UserError, match=match):
        generate(model, PROMPTS, max_new_tokens=NEW, **kwargs)


def test_the_cache_is_donated_between_chunks(tiny):
    """Each chunk updates the KV cache in place: the decode program aliases it input to output."""
    model, _ = tiny
    generate(model, PROMPTS, max_new_tokens=NEW)
    from sparseinfer_jax.runtime.generation import _COMPILED

    decode = next(v for k, v in _COMPILED.items() if k[0] == "decode")
    assert "input_output_alias" in decode.as_text()
