"""Generation behaviour: padding, buckets and recompilation, EOS, sampling, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compilation_count

from sparseinfer_jax import UserError, generate, load
from sparseinfer_jax.runtime.requests import bucket


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_hf_checkpoint

    folder = make_hf_checkpoint(str(tmp_path_factory.mktemp("gen")))
    return load(folder, dtype="float32")


def test_left_padding_gives_the_same_tokens_as_each_prompt_alone(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 96, size=n).tolist() for n in (3, 9, 17)]
    batch = generate(model, prompts, max_new_tokens=12, stop_at_eos=False)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=12, stop_at_eos=False)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])


def test_same_bucket_reuses_the_compiled_program(tiny):
    model, _ = tiny
    generate(model, [[5, 6, 7]], max_new_tokens=10)
    generate(model, [[5, 6, 7]], max_new_tokens=10, mode="sparse")
    before = compilation_count()
    generate(model, [[8, 9, 10, 11, 12]], max_new_tokens=13, temperature=0.7, top_p=0.9, seed=3)
    generate(model, [[5, 6]], max_new_tokens=4, mode="sparse", alpha=2.0, repetition_penalty=1.3)
    assert compilation_count() == before
    # A longer prompt bucket: one new prefill and one new decode program.
    generate(model, [list(range(3, 3 + bucket(16) + 1))], max_new_tokens=4)
    assert compilation_count() == before + 2


def test_eos_stops_rows_and_the_loop(tiny):
    model, _ = tiny
    prompt = [[7, 8, 9]]
    free = generate(model, prompt, max_new_tokens=8, stop_at_eos=False).tokens[0]
    # Make the third greedy token the EOS: the row must end there, EOS included.
    eos = int(free[2])
    if eos in free[:2]:
        pytest.skip("the greedy continuation repeats a token early")
    out = generate(model, prompt, max_new_tokens=8, eos_token_ids=[eos])
    assert out.tokens.shape == (1, 3)
    assert out.lengths.tolist() == [3]
    np.testing.assert_array_equal(out.tokens[0], free[:3])


def test_sampling_is_seeded_and_greedy_at_zero_temperature(tiny):
    model, _ = tiny
    prompt = [[4, 5, 6, 7]]
    a = generate(model, prompt, max_new_tokens=16, temperature=1.5, seed=1, stop_at_eos=False)
    b = generate(model, prompt, max_new_tokens=16, temperature=1.5, seed=1, stop_at_eos=False)
    c = generate(model, prompt, max_new_tokens=16, temperature=1.5, seed=2, stop_at_eos=False)
    greedy = generate(model, prompt, max_new_tokens=16, stop_at_eos=False)
    top1 = generate(
        model, prompt, max_new_tokens=16, temperature=1.5, top_k=1, seed=2, stop_at_eos=False
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampler_branches_against_numpy(top_k):
    """Greedy (temperature 0, which skips the sort) is the argmax; sampling at any temperature
    stays inside the top-k and top-p nucleus computed in numpy, and a tiny top_p is the argmax."""
    import jax

    from sparseinfer_jax.runtime.sampling import sample

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    fn = jax.jit(sample, static_argnames=["top_k"])
    key = jax.random.key(0)
    greedy = fn(logits, key, np.float32(0.0), np.float32(0.9), top_k=top_k)
    np.testing.assert_array_equal(greedy, logits.argmax(-1))
    tiny_p = fn(logits, key, np.float32(1.0), np.float32(1e-6), top_k=top_k)
    np.testing.assert_array_equal(tiny_p, logits.argmax(-1))
    top_p = 0.6
    order = np.argsort(-logits, axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    for row in range(4):
        keep = order[row, : top_k or 50]
        p = probs[row, keep] / probs[row, keep].sum()
        nucleus = set(keep[: int(np.searchsorted(np.cumsum(p), top_p)) + 1].tolist())
        drawn = {int(fn(logits, jax.random.key(s), np.float32(1.0), np.float32(top_p),
                        top_k=top_k)[row]) for s in range(40)}
        assert drawn <= nucleus and len(drawn) > 1


def test_text_prompts_round_trip_through_the_tokenizer(tiny):
    model, tokenizer = tiny
    out = generate(model, ["Hello", "Hi there"], tokenizer=tokenizer, max_new_tokens=5)
    assert len(out.text) == 2 and all(isinstance(t, str) for t in out.text)
    assert out.timing.compile_s >= 0 and out.timing.total_s > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=["text"]), "tokenizer"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1000]]), "vocabulary"),
        (dict(prompts=[[3]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[3]], mode="fast"), "mode"),
        (dict(prompts=[[3]], top_p=0.0), "top_p"),
        (dict(prompts=[[3]], alpha=[1.0]), "alpha"),
    ],
)
def test_bad_arguments_raise_user_errors(tiny, kwargs, match):
    model, _ = tiny
    prompts = kwargs.pop("prompts")
    with pytest.raises(UserError, match=match):
        generate(model, prompts, **kwargs)


def test_prompt_plus_new_tokens_may_reach_the_position_limit_but_not_pass_it(tiny):
    model, _ = tiny
    limit = model.config.max_position_embeddings
    prompt = np.random.default_rng(0).integers(3, 96, size=limit - 40).tolist()
    out = generate(model, [prompt], max_new_tokens=40, stop_at_eos=False, timing=False)
    assert out.tokens.shape == (1, 40)
    with pytest.raises(UserError, match=f"{limit} positions"):
        generate(model, [prompt], max_new_tokens=41)


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating(tiny):
    import dataclasses

    model, _ = tiny
    config = model.config
    model.config = dataclasses.replace(config, max_position_embeddings=2**31 - 1)
    try:  # 2**30 cache slots: hundreds of GB for even this tiny model
        with pytest.raises(UserError, match="KV cache"):
            generate(model, [[3]], max_new_tokens=10**9)
    finally:
        model.config = config
