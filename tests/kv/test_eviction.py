"""Eviction policies keep exactly the tokens their rule says; decode over the kept slots equals
dense attention over those tokens; the budget is real memory."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.kv import (
    EvictedKVCache,
    attend_and_append,
    evicted_decode_attention,
    heavy_hitter_append,
    snapkv_prefill,
    streaming_llm_append,
)
from jaxsparse.testing import assert_allclose, random_normal

B, K, G, D, BUDGET, STEPS = 2, 2, 2, 8, 6, 15


def _tokens(seed):
    keys = jax.random.split(jax.random.key(seed), 2)
    return random_normal(keys[0], (STEPS, B, K, D)), random_normal(keys[1], (STEPS, B, K, D))


def _kept(cache, b, h):
    return sorted(int(p) for p in np.asarray(cache.positions[b, h]) if p >= 0)


def test_streaming_llm_keeps_sinks_and_recent_window():
    new_k, new_v = _tokens(0)

    @jax.jit
    def run(cache):
        return jax.lax.scan(lambda c, kv: (streaming_llm_append(c, *kv, sinks=2), None), cache, (new_k, new_v))[0]

    cache = run(EvictedKVCache.create(B, BUDGET, K, D))
    for b in range(B):
        for h in range(K):
            assert _kept(cache, b, h) == [0, 1] + list(range(STEPS - (BUDGET - 2), STEPS))
            for slot, position in enumerate(np.asarray(cache.positions[b, h])):
                np.testing.assert_array_equal(np.asarray(cache.keys[b, h, slot]), np.asarray(new_k[position, b, h]))


def _numpy_heavy_hitters(attention, recent, decay):
    """Brute force of the rule for one head: positions kept after each step."""
    kept, scores = [], {}
    for t, row in enumerate(attention):  # row: attention of step t's query to the slots, by position
        for position in kept:
            scores[position] = decay * scores[position] + row[position]
        if len(kept) == BUDGET:
            candidates = [p for p in kept if p < t - recent]
            victim = min(candidates, key=lambda p: (scores[p], p))
            kept.remove(victim)
        kept.append(t)
        scores[t] = 0.0
    return sorted(kept)


@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_heavy_hitters_keep_exactly_the_rule(decay):
    new_k, new_v = _tokens(1)
    by_position = np.asarray(jax.nn.softmax(random_normal(jax.random.key(2), (STEPS, B, K, STEPS)), axis=-1))

    cache = EvictedKVCache.create(B, BUDGET, K, D)
    step = jax.jit(lambda c, k, v, a: heavy_hitter_append(c, k, v, a, recent=2, decay=decay))
    for t in range(STEPS):
        slot_positions = np.asarray(cache.positions)
        attention = np.where(slot_positions >= 0,
                             np.take_along_axis(by_position[t], np.maximum(slot_positions, 0), axis=-1), 0.0)
        cache = step(cache, new_k[t], new_v[t], jnp.asarray(attention, jnp.float32))
    for b in range(B):
        for h in range(K):
            assert _kept(cache, b, h) == _numpy_heavy_hitters(by_position[:, b, h], 2, decay)


@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_attend_and_append_attends_to_kept_slots_and_itself_then_evicts_by_that_attention(decay):
    """Decoding with H2O / A2SF through attend_and_append, against numpy per head: each step's output
    is softmax attention over the kept tokens and the new one; the slots' attention summed over the
    query heads feeds the rule, so the kept positions are the brute-force rule's."""
    new_k, new_v = _tokens(6)
    queries = random_normal(jax.random.key(7), (STEPS, B, 1, K * G, D))
    step = jax.jit(lambda c, q, k, v: attend_and_append(
        q, c, k, v, lambda *args: heavy_hitter_append(*args, recent=2, decay=decay)))
    cache, outputs = EvictedKVCache.create(B, BUDGET, K, D), []
    for t in range(STEPS):
        out, cache = step(cache, queries[t], new_k[t], new_v[t])
        outputs.append(np.asarray(out))
    keys, values, queries = (np.asarray(x, np.float64) for x in (new_k, new_v, queries))
    for b in range(B):
        for h in range(K):
            kept, scores = [], {}
            for t in range(STEPS):
                visible = kept + [t]
                logits = queries[t, b, 0, h * G:(h + 1) * G] @ keys[visible, b, h].T / np.sqrt(D)  # [G, n]
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                np.testing.assert_allclose(outputs[t][b, 0, h * G:(h + 1) * G], p @ values[visible, b, h],
                                           rtol=1e-5, atol=1e-5)
                for position, weight in zip(kept, p.sum(0)):
                    scores[position] = decay * scores[position] + weight
                if len(kept) == BUDGET:
                    kept.remove(min((q for q in kept if q < t - 2), key=lambda q: (scores[q], q)))
                kept.append(t)
                scores[t] = 0.0
            assert _kept(cache, b, h) == sorted(kept)


def test_snapkv_keeps_window_and_top_pooled_votes():
    length, window, pool, budget = 24, 4, 3, 10
    keys = jax.random.split(jax.random.key(3), 3)
    k, v = random_normal(keys[0], (B, length, K, D)), random_normal(keys[1], (B, length, K, D))
    q = random_normal(keys[2], (B, length, K * G, D))
    cache = snapkv_prefill(k, v, q, budget, window=window, pool=pool)
    kn, qn = np.asarray(k, np.float64), np.asarray(q, np.float64).reshape(B, length, K, G, D)
    for b in range(B):
        for h in range(K):
            votes = np.zeros(length)
            for i in range(length - window, length):
                for g in range(G):
                    logits = kn[b, : i + 1, h] @ qn[b, i, h, g] / np.sqrt(D)
                    p = np.exp(logits - logits.max())
                    votes[: i + 1] += p / p.sum()
            prefix = votes[: length - window]
            pooled = np.array([prefix[max(0, j - 1) : j + 2].max() for j in range(length - window)])
            chosen = sorted(np.argsort(-pooled, kind="stable")[: budget - window].tolist())
            assert _kept(cache, b, h) == chosen + list(range(length - window, length))
            np.testing.assert_array_equal(np.asarray(cache.values[b, h, 0]), np.asarray(v[b, chosen[0], h]))


def test_decode_over_kept_slots_equals_dense_attention_over_those_tokens():
    new_k, new_v = _tokens(4)
    cache = EvictedKVCache.create(B, BUDGET, K, D)
    for t in range(STEPS):
        cache = streaming_llm_append(cache, new_k[t], new_v[t], sinks=1)
    q = random_normal(jax.random.key(5), (B, 1, K * G, D))
    out, attention = evicted_decode_attention(q, cache)
    for b in range(B):
        for h in range(K):
            kept = _kept(cache, b, h)
            keys, values = np.asarray(new_k)[kept, b, h], np.asarray(new_v)[kept, b, h]
            for g in range(G):
                logits = keys @ np.asarray(q)[b, 0, h * G + g] / np.sqrt(D)
                p = np.exp(logits - logits.max())
                p /= p.sum()
                np.testing.assert_allclose(np.asarray(out)[b, 0, h * G + g], p @ values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(attention).sum(-1), G, rtol=1e-5)  # G query heads, each sums to 1


def test_budget_is_real_memory():
    full = EvictedKVCache.create(1, 1000, 4, 64)
    fifth = EvictedKVCache.create(1, 200, 4, 64)
    assert fifth.nbytes() * 5 == full.nbytes()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, k, v: EvictedKVCache.create(B, 0, K, D), "budget must be"),
        (lambda c, k, v: streaming_llm_append(c, k, v, sinks=BUDGET), "sinks must be"),
        (lambda c, k, v: heavy_hitter_append(c, k, v, jnp.zeros((B, K, BUDGET)), recent=-1), "recent must be"),
        (lambda c, k, v: heavy_hitter_append(c, k, v, jnp.zeros((B, K, BUDGET)), recent=1, decay=0.0), "decay must be"),
        (lambda c, k, v: snapkv_prefill(jnp.ones((B, 8, K, D)), jnp.ones((B, 8, K, D)), jnp.ones((B, 8, K, D)), 9,
                                        window=2), "budget must be"),
        (lambda c, k, v: snapkv_prefill(jnp.ones((B, 8, K, D)), jnp.ones((B, 8, K, D)), jnp.ones((B, 8, K, D)), 4,
                                        window=9), "window must be"),
    ],
)
def test_bad_input(call, message):
    cache = EvictedKVCache.create(B, BUDGET, K, D)
    with pytest.raises(ValueError, match=message):
        call(cache, jnp.ones((B, K, D)), jnp.ones((B, K, D)))
