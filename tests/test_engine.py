"""Continuous batching mechanics on a tiny random llama."""

import asyncio
import threading

import mlx.core as mx
import pytest

from reverie.runtime.engine import Engine, GenerationError, SamplingParams

from conftest import tiny_llama

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18], [20, 21]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def alone(model, prompt, n=12, **kw):
    engine = Engine(model, eos_token_ids=[])
    try:
        return [t.id for t in engine.generate(prompt, n, **kw)]
    finally:
        engine.close()


def test_concurrent_requests_share_steps_and_equal_single_runs(model):
    expected = [alone(model, p) for p in PROMPTS]
    engine = Engine(model, eos_token_ids=[])
    handles = [engine.submit(p, 12) for p in PROMPTS]
    got = [[t.id for t in h] for h in handles]
    engine.close()
    assert got == expected
    assert engine.stats["max_batch"] > 1  # they really ran together
    assert engine.stats["steps"] < sum(len(g) for g in got)


def test_each_request_keeps_its_own_sampler(model):
    greedy = alone(model, PROMPTS[0], 16)
    engine = Engine(model, eos_token_ids=[])
    hot = [engine.submit(PROMPTS[0], 16, SamplingParams(temperature=5.0)) for _ in range(3)]
    cold = engine.submit(PROMPTS[0], 16)
    hot_ids = [[t.id for t in h] for h in hot]
    assert [t.id for t in cold] == greedy
    assert any(h != greedy for h in hot_ids)
    engine.close()


def test_finish_reasons_length_and_stop(model):
    ids = alone(model, PROMPTS[1], 6)
    k = next(i for i in range(1, 6) if ids[i] not in ids[:i])  # a token not seen before
    engine = Engine(model, eos_token_ids=[ids[k]])
    tokens = engine.generate(PROMPTS[1], 6)
    assert [t.id for t in tokens] == ids[: k + 1]
    assert tokens[-1].finish_reason == "stop"
    engine.close()
    tokens = Engine(model, eos_token_ids=[]).generate(PROMPTS[1], 4)
    assert len(tokens) == 4 and tokens[-1].finish_reason == "length"


def test_cancel_frees_the_slot_and_others_continue(model):
    engine = Engine(model, eos_token_ids=[])
    long = engine.submit(PROMPTS[2], 200)
    short = engine.submit(PROMPTS[0], 8)
    first = next(iter(long))
    long.cancel()
    assert len(list(short)) == 8
    assert first.finish_reason is None
    engine.close()


def test_processor_error_fails_its_batch_but_not_the_engine(model):
    def boom(tokens, logits):
        raise RuntimeError("processor exploded")

    engine = Engine(model, eos_token_ids=[])
    with pytest.raises(GenerationError, match="processor exploded"):
        engine.generate(PROMPTS[0], 4, processors=[boom])
    assert [t.id for t in engine.generate(PROMPTS[0], 12)] == alone(model, PROMPTS[0])
    engine.close()


def test_async_submissions_batch_together(model):
    expected = [alone(model, p) for p in PROMPTS]
    engine = Engine(model, eos_token_ids=[])

    async def run():
        async def one(p):
            return [t.id async for t in engine.asubmit(p, 12)]
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    assert asyncio.run(run()) == expected
    assert engine.stats["max_batch"] > 1
    engine.close()


def test_bad_requests_are_refused(model):
    engine = Engine(model, eos_token_ids=[])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.submit([], 4)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit([1], 0)


# -- shared-prefix KV caches ------------------------------------------------------------

HEAD = [(7 * i + 3) % 500 + 1 for i in range(100)]
SHARED = [HEAD + [400 + k, 401 + k, 402] for k in range(4)] + [HEAD[:70] + [9, 9], HEAD + [400, 401, 402]]


def _run(model, prompts, together: bool, **kw):
    engine = Engine(model, eos_token_ids=[], **kw)
    try:
        if together:
            handles = [engine.submit(p, 10) for p in prompts]
            out = [[t.id for t in h] for h in handles]
        else:
            out = [[t.id for t in engine.generate(p, 10)] for p in prompts]
        return out, engine
    finally:
        engine.close()


@pytest.mark.parametrize("together", [True, False], ids=["in-flight", "recent"])
def test_prefix_cache_gives_identical_greedy_output(model, together):
    plain, off = _run(model, SHARED, together, prefix_cache_tokens=0)
    cached, on = _run(model, SHARED, together, prefix_cache_tokens=4096)
    assert cached == plain
    assert off.stats["cached_prompt_tokens"] == 0 and off.stats["prefix_prefill_tokens"] == 0
    assert on.stats["cached_prompt_tokens"] > 0
    assert on.stats["prompt_tokens"] == off.stats["prompt_tokens"] == sum(map(len, SHARED))
    # a shared head is prefilled once per cached prefix, not once per prompt
    assert on.stats["prefix_prefill_tokens"] < on.stats["cached_prompt_tokens"]
    if not together:  # the first prompt had nothing to share with yet; every later one did
        assert {len(k) for k in on._prefixes} == {100, 70}
        assert on.stats["prefix_prefill_tokens"] == 100 + 70
        assert on.stats["cached_prompt_tokens"] == 100 * 3 + 70 + 100


def test_prefix_cache_stays_within_its_budget(model):
    groups = [[(13 * i + 29 * g) % 500 + 1 for i in range(60)] for g in range(4)]
    prompts = [head + [450 + k] for head in groups for k in range(2)]
    plain, _ = _run(model, prompts, False, prefix_cache_tokens=0)
    cached, engine = _run(model, prompts, False, prefix_cache_tokens=150, min_prefix_tokens=16)
    assert cached == plain
    assert engine.stats["cached_prompt_tokens"] == 4 * 60  # each group's second prompt
    assert sum(map(len, engine._prefixes)) <= 150
    assert list(engine._prefixes) == [tuple(groups[2]), tuple(groups[3])]  # least recent out


def test_a_prefix_longer_than_the_budget_is_not_kept(model):
    plain, _ = _run(model, SHARED[:2], False, prefix_cache_tokens=0)
    cached, engine = _run(model, SHARED[:2], False, prefix_cache_tokens=60, min_prefix_tokens=16)
    assert cached == plain
    assert sum(map(len, engine._prefixes)) <= 60


def test_prefix_cached_requests_see_the_whole_prompt_and_its_exact_logits(model):
    """Sharper than equal greedy tokens (a tiny random model barely notices a KV entry
    missing): each request's first logits equal a full forward pass over its prompt, and
    its logits processors see the whole prompt as context, cached head included."""
    engine = Engine(model, eos_token_ids=[], prefix_cache_tokens=4096)
    try:
        for prompt in SHARED:
            seen = []

            def first(tokens, logits, seen=seen):
                if not seen:
                    seen.append((mx.array(tokens).reshape(-1).tolist(), logits))
                return logits

            engine.generate(prompt, 2, processors=[first])
            context, logits = seen[0]
            assert context == prompt
            full = model(mx.array([prompt]))[0, -1]
            assert mx.abs(logits[0] - full).max().item() < 1e-4
    finally:
        engine.close()
    assert engine.stats["cached_prompt_tokens"] == 100 * 3 + 70 + 100
