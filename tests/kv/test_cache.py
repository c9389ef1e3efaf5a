"""KVCache: prefill and append against numpy, inside jit and lax.scan; errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.kv import KVCache
from jaxsparse.testing import random_normal


def test_prefill_then_append_in_scan_matches_numpy():
    cache = KVCache.create(2, 16, 3, 4)
    prompt_k, prompt_v = random_normal(jax.random.key(0), (2, 6, 3, 4)), random_normal(jax.random.key(1), (2, 6, 3, 4))
    steps_k, steps_v = random_normal(jax.random.key(2), (5, 2, 1, 3, 4)), random_normal(jax.random.key(3), (5, 2, 1, 3, 4))

    @jax.jit
    def run(cache):
        cache = cache.prefill(prompt_k, prompt_v, lengths=jnp.asarray([6, 4]))
        return jax.lax.scan(lambda c, kv: (c.append(*kv), None), cache, (steps_k, steps_v))[0]

    cache = run(cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [11, 9])
    for b, prompt_len in enumerate([6, 4]):
        expected = np.concatenate([np.asarray(prompt_k)[b, :prompt_len], np.asarray(steps_k)[:, b, 0]], axis=0)
        np.testing.assert_array_equal(np.asarray(cache.keys)[b].transpose(1, 0, 2)[: prompt_len + 5], expected)
    assert np.asarray(cache.valid()).sum() == 20 and not np.any(np.asarray(cache.overflowed()))


def test_cache_errors():
    with pytest.raises(ValueError, match="capacity must be"):
        KVCache.create(1, 0, 1, 4)
    cache = KVCache.create(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"keys and values must be \[B, T, K, D\]"):
        cache.append(jnp.ones((1, 1, 3, 8)), jnp.ones((1, 1, 3, 8)))
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        cache.prefill(jnp.ones((1, 5, 2, 8)), jnp.ones((1, 5, 2, 8)))


def test_score_keys_follow_the_keys():
    cache = KVCache.create(2, 16, 3, 8, score_dims=4)
    keys, values = random_normal(jax.random.key(4), (2, 5, 3, 8)), random_normal(jax.random.key(5), (2, 5, 3, 8))
    cache = cache.prefill(keys, values, lengths=jnp.asarray([5, 2])).append(keys[:, :2], values[:, :2])
    np.testing.assert_array_equal(np.asarray(cache.score_keys), np.swapaxes(np.asarray(cache.keys)[..., :4], 2, 3))
    with pytest.raises(ValueError, match="score_dims must be"):
        KVCache.create(1, 4, 1, 8, score_dims=9)


def test_gather_matches_numpy_and_clips_positions_into_the_cache():
    keys, values = random_normal(jax.random.key(4), (2, 3, 16, 4)), random_normal(jax.random.key(5), (2, 3, 16, 4))
    cache = KVCache(keys=keys, values=values, lengths=jnp.asarray([16, 9]))
    positions = jax.random.randint(jax.random.key(6), (2, 3, 7), -3, 20)
    got_keys, got_values = jax.jit(KVCache.gather)(cache, positions)
    clipped = np.clip(np.asarray(positions), 0, 15)
    rows, heads = np.arange(2)[:, None, None], np.arange(3)[None, :, None]
    np.testing.assert_array_equal(np.asarray(got_keys), np.asarray(keys)[rows, heads, clipped])
    np.testing.assert_array_equal(np.asarray(got_values), np.asarray(values)[rows, heads, clipped])
