"""PagedKVCache: appends, releases and reuse against a numpy model of each sequence; decode and
Quest over the paged cache equal the contiguous cache; the pool accounting is exact."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.kv import KVCache, PagedKVCache
from jaxsparse.kv.selection import page_summary, quest_pages, update_page_summary, window_selection
from jaxsparse.ops.decode_attention import decode_attention
from jaxsparse.testing import assert_allclose, random_normal

B, K, D, PAGE = 3, 2, 8, 4


def _tokens(seed, steps):
    keys = jax.random.split(jax.random.key(seed), 2)
    return (np.asarray(random_normal(keys[0], (B, steps, K, D))), np.asarray(random_normal(keys[1], (B, steps, K, D))))


def _check_against(cache: PagedKVCache, expected_keys, expected_values):
    """Every sequence holds exactly its tokens, no page is owned twice, and the pool adds up."""
    lengths = np.asarray(cache.lengths)
    assert lengths.tolist() == [len(k) for k in expected_keys]
    contiguous = cache.to_contiguous()
    for b in range(B):
        n = lengths[b]
        for store, expected in ((contiguous.keys, expected_keys[b]), (contiguous.values, expected_values[b])):
            expected = np.asarray(expected).reshape(n, K, D).swapaxes(0, 1)
            np.testing.assert_array_equal(np.asarray(store[b, :, :n]), expected)
    held = np.asarray(cache.pages_held())
    owned = np.concatenate([np.asarray(cache.page_table[b, : held[b]]) for b in range(B)])
    free = np.asarray(cache.free_pages[: int(cache.free_count)])
    assert len(set(owned.tolist())) == owned.size, "a page is owned by two sequences"
    assert sorted(owned.tolist() + free.tolist()) == list(range(cache.num_pages)), "pages lost or duplicated"
    assert not bool(cache.overflowed())


def test_append_with_counts_release_and_reuse():
    cache = PagedKVCache.create(B, 12, PAGE, K, D, max_pages=6)
    keys, values = _tokens(0, 7)
    held_keys, held_values = [[] for _ in range(B)], [[] for _ in range(B)]
    append = jax.jit(lambda c, k, v, n: c.append(k, v, counts=n))
    for step, counts in enumerate(([7, 2, 5], [1, 0, 3], [3, 7, 0])):
        cache = append(cache, keys + step, values - step, jnp.asarray(counts))
        for b, n in enumerate(counts):
            held_keys[b] += list(keys[b, :n] + step)
            held_values[b] += list(values[b, :n] - step)
        _check_against(cache, held_keys, held_values)
    # Sequence 1 ends; its pages go back to the pool and a new prompt takes them.
    cache = jax.jit(lambda c: c.release(jnp.asarray([False, True, False])))(cache)
    held_keys[1], held_values[1] = [], []
    _check_against(cache, held_keys, held_values)
    cache = append(cache, keys * 2, values * 2, jnp.asarray([0, 6, 1]))
    held_keys[1] += list(keys[1, :6] * 2)
    held_values[1] += list(values[1, :6] * 2)
    held_keys[2] += list(keys[2, :1] * 2)
    held_values[2] += list(values[2, :1] * 2)
    _check_against(cache, held_keys, held_values)


def test_prefill_and_scan_of_single_token_appends():
    keys, values = _tokens(1, 9)
    cache = PagedKVCache.create(B, 3 * 4, PAGE, K, D).prefill(keys[:, :5], values[:, :5], lengths=jnp.asarray([5, 1, 3]))

    def step(cache, token):
        return cache.append(token[0][:, None], token[1][:, None]), None

    cache, _ = jax.lax.scan(step, cache, (jnp.swapaxes(keys[:, 5:], 0, 1), jnp.swapaxes(values[:, 5:], 0, 1)))
    expected_keys = [np.concatenate([keys[b, :n], keys[b, 5:]]) for b, n in enumerate([5, 1, 3])]
    expected_values = [np.concatenate([values[b, :n], values[b, 5:]]) for b, n in enumerate([5, 1, 3])]
    _check_against(cache, expected_keys, expected_values)


def test_running_out_of_pages_is_reported_and_keeps_written_data():
    keys, values = _tokens(2, 8)
    cache = PagedKVCache.create(B, 5, PAGE, K, D).append(keys[:, :4], values[:, :4])  # 3 of 5 pages
    before = cache.to_contiguous()
    full = cache.append(keys[:, 4:], values[:, 4:])  # needs 3 more pages, 2 left
    assert bool(full.overflowed())
    for b in range(B):  # what was written before is untouched
        np.testing.assert_array_equal(np.asarray(full.to_contiguous().keys[b, :, :4]), np.asarray(before.keys[b, :, :4]))


def test_decode_and_quest_equal_the_contiguous_cache():
    keys, values = _tokens(3, 30)
    lengths = jnp.asarray([30, 13, 22])
    paged = PagedKVCache.create(B, 24, PAGE, K, D).prefill(keys, values, lengths=lengths)
    contiguous = KVCache.create(B, paged.capacity, K, D).prefill(keys, values, lengths=lengths)
    q = random_normal(jax.random.key(4), (B, 1, 2 * K, D))
    for implementation in ("reference", "xla"):
        assert_allclose(decode_attention(q, paged, implementation=implementation), decode_attention(q, contiguous))
    summary, paged_summary = page_summary(contiguous, PAGE), page_summary(paged)
    np.testing.assert_array_equal(np.asarray(summary.maximum), np.asarray(paged_summary.maximum))
    chosen = quest_pages(q, paged_summary, paged, 3)
    np.testing.assert_array_equal(np.asarray(chosen.indices), np.asarray(quest_pages(q, summary, contiguous, 3).indices))
    assert_allclose(decode_attention(q, paged, selection=chosen), decode_attention(q, contiguous, selection=chosen))
    window = window_selection(q, paged, window=5, sinks=2)
    assert_allclose(decode_attention(q, paged, selection=window), decode_attention(q, contiguous, selection=window))
    # One more token: the summaries stay equal when updated from either cache.
    new_keys, new_values = _tokens(5, 1)
    paged, contiguous = paged.append(new_keys, new_values), contiguous.append(new_keys, new_values)
    np.testing.assert_array_equal(np.asarray(update_page_summary(summary, contiguous, 1).minimum),
                                  np.asarray(update_page_summary(paged_summary, paged, 1).minimum))


def test_errors():
    cache = PagedKVCache.create(B, 4, PAGE, K, D)
    with pytest.raises(ValueError, match="num_pages"):
        PagedKVCache.create(B, 0, PAGE, K, D)
    with pytest.raises(ValueError, match="keys and values"):
        cache.append(jnp.ones((B, 2, K + 1, D)), jnp.ones((B, 2, K + 1, D)))
    with pytest.raises(ValueError, match="counts"):
        cache.append(jnp.ones((B, 2, K, D)), jnp.ones((B, 2, K, D)), counts=jnp.ones(B + 1))
    with pytest.raises(ValueError, match="done"):
        cache.release(jnp.ones(B + 1, bool))
    with pytest.raises(ValueError, match="page_size"):
        page_summary(cache, PAGE * 2)
