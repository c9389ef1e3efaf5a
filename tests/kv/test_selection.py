"""Selection policies against brute-force numpy; selecting everything equals dense decode;
attention-mass recall on random and planted-needle inputs."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse import masks
from jaxsparse.kv import KVCache
from jaxsparse.kv.selection import (
    TokenSelectState,
    attention_mass_recall,
    low_rank_key_scores,
    page_summary,
    quest_pages,
    tidal_decode_selection,
    token_select,
    top_k_keys,
    update_page_summary,
    window_selection,
)
from jaxsparse.ops.decode_attention import decode_attention
from jaxsparse.testing import assert_allclose, random_normal

B, K, G, D, S = 2, 2, 2, 16, 64
LENGTHS = [50, 29]


def _setup(seed=0, lengths=LENGTHS, queries=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    prompt = max(lengths)
    cache = KVCache.create(B, S, K, D).prefill(random_normal(keys[0], (B, prompt, K, D)),
                                               random_normal(keys[1], (B, prompt, K, D)), lengths=jnp.asarray(lengths))
    return cache, random_normal(keys[2], (B, queries, K * G, D))


def _np_grouped(q):
    return np.asarray(q, np.float64).reshape(B, q.shape[1], K, G, D)


def _listed(selection, b, h):
    return sorted(np.asarray(selection.positions[b, h, : int(selection.counts[b, h])]).tolist())


@pytest.mark.parametrize("rank", [None, 4])
def test_top_k_keys_matches_brute_force(rank):
    cache, q = _setup()
    selection = jax.jit(top_k_keys, static_argnames=("k", "rank"))(q, cache, k=10, rank=rank)
    r = D if rank is None else rank
    qg, keys = _np_grouped(q), np.asarray(cache.keys, np.float64)
    for b in range(B):
        for h in range(K):
            scores = keys[b, h, : LENGTHS[b], :r] @ qg[b, :, h, :, :r].sum(axis=(0, 1))
            assert _listed(selection, b, h) == sorted(np.argsort(-scores)[:10].tolist())


def test_selecting_everything_equals_dense_decode_and_full_recall():
    cache, q = _setup(1)
    selection = top_k_keys(q, cache, k=S)
    assert_allclose(decode_attention(q, cache, selection=selection), decode_attention(q, cache))
    np.testing.assert_allclose(np.asarray(attention_mass_recall(q, cache, selection)), 1.0, rtol=1e-5)


def test_token_select_matches_brute_force_and_reuses():
    cache, q = _setup(2)
    state = TokenSelectState.create(B, K * G, D, K, 4 + 8 + 6)
    selection, state, reused = token_select(q, cache, state, k=6, sinks=4, recent=8)
    assert not bool(reused)
    qg, keys = _np_grouped(q)[:, -1], np.asarray(cache.keys, np.float64)
    for b in range(B):
        n = LENGTHS[b]
        vote = np.zeros(n)
        for h in range(K):
            for g in range(G):
                logits = keys[b, h, :n] @ qg[b, h, g] / np.sqrt(D)
                p = np.exp(logits - logits.max())
                vote += p / p.sum()
        forced = set(range(4)) | set(range(n - 8, n))
        rest = [i for i in np.argsort(-vote) if i not in forced][:6]
        for h in range(K):
            assert _listed(selection, b, h) == sorted(forced | set(rest))
    # A near-identical next query reuses the selection; a different one re-selects.
    again, _, reused = token_select(q * 1.01, cache, state, k=6, sinks=4, recent=8)
    assert bool(reused) and np.array_equal(np.asarray(again.positions), np.asarray(selection.positions))
    _, _, reused = token_select(-q, cache, state, k=6, sinks=4, recent=8)
    assert not bool(reused)


def test_quest_pages_match_brute_force_and_incremental_summary():
    cache, q = _setup(3)
    summary = page_summary(cache, 8)
    selection = quest_pages(q, summary, cache, 3)
    qg, keys = _np_grouped(q), np.asarray(cache.keys, np.float64)
    for b in range(B):
        n = LENGTHS[b]
        for h in range(K):
            bounds = []
            for page in range(-(-n // 8)):
                block = keys[b, h, page * 8 : min(page * 8 + 8, n)]
                lo, hi = block.min(0), block.max(0)
                bounds.append(sum(np.maximum(qv * lo, qv * hi).sum() for qv in qg[b, :, h].reshape(-1, D)))
            expected = sorted(np.argsort(-np.asarray(bounds))[:3].tolist())
            assert sorted(np.asarray(selection.indices[b, h, : int(selection.counts[b, h])]).tolist()) == expected
    new_k, new_v = random_normal(jax.random.key(9), (B, 3, K, D)), random_normal(jax.random.key(10), (B, 3, K, D))
    grown = cache.append(new_k, new_v)
    incremental = update_page_summary(summary, grown, 3)
    full = page_summary(grown, 8)
    np.testing.assert_array_equal(np.asarray(incremental.minimum), np.asarray(full.minimum))
    np.testing.assert_array_equal(np.asarray(incremental.maximum), np.asarray(full.maximum))


def test_tidal_decode_selects_in_its_layers_and_reuses_elsewhere():
    cache, q = _setup(4)
    first = tidal_decode_selection(0, (0, 2), q, cache, None, k=5)
    reused = tidal_decode_selection(1, (0, 2), q * -1, cache, first, k=5)
    assert reused is first
    fresh = tidal_decode_selection(2, (0, 2), -q, cache, first, k=5)
    assert not np.array_equal(np.asarray(fresh.positions), np.asarray(first.positions))
    with pytest.raises(ValueError, match="put the first layer in selection_layers"):
        tidal_decode_selection(1, (0, 2), q, cache, None, k=5)


def test_recall_on_planted_needles():
    """A key aligned with the query (a needle) is found by every policy; random keys give partial recall."""
    cache, q = _setup(5, lengths=[64, 64])
    needle = 37
    keys = cache.keys.at[:, :, needle].set(8.0 * jnp.repeat(q[:, 0].reshape(B, K, G, D).mean(2), 1, axis=0))
    cache = KVCache(keys=keys, values=cache.values, lengths=cache.lengths)
    policies = {
        "top_k_keys": top_k_keys(q, cache, k=8),
        "top_k_keys_rank8": top_k_keys(q, cache, k=8, rank=8),
        "token_select": token_select(q, cache, TokenSelectState.create(B, K * G, D, K, 16), k=8, sinks=4, recent=4)[0],
        "quest": quest_pages(q, page_summary(cache, 8), cache, 2),
    }
    for name, selection in policies.items():
        recall = np.asarray(attention_mass_recall(q, cache, selection))
        assert recall.min() > 0.9, (name, recall.min())
    random_recall = np.asarray(attention_mass_recall(q, *_setup(6)[:1], top_k_keys(q, _setup(6)[0], k=8)))
    assert 0.2 < random_recall.mean() < 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda c, q: top_k_keys(q, c, k=0), "k must be"),
        (lambda c, q: top_k_keys(q, c, k=S + 1), "k must be"),
        (lambda c, q: top_k_keys(q, c, k=4, rank=D + 1), "rank must be"),
        (lambda c, q: top_k_keys(q[:, :, :3], c, k=4), "q must be"),
        (lambda c, q: page_summary(c, 7), "page_size must be"),
        (lambda c, q: quest_pages(q, page_summary(c, 8), c, 9), "num_pages must be"),
        (lambda c, q: token_select(q, c, TokenSelectState.create(B, K * G, D, K, 70), k=60, sinks=4, recent=6),
         "exceeds the cache capacity"),
    ],
)
def test_bad_input(call, message):
    cache, q = _setup(7)
    with pytest.raises(ValueError, match=message):
        call(cache, q)


def test_statistical_top_k_keys_keeps_about_k_of_the_best():
    cache, q = _setup(8, lengths=[64, 64])
    exact = top_k_keys(q, cache, k=16)
    statistical = top_k_keys(q, cache, k=16, method="statistical")
    counts = np.asarray(statistical.counts)
    assert counts.min() >= 4 and counts.max() <= 32
    for b in range(B):
        for h in range(K):
            chosen = set(_listed(statistical, b, h))
            best = set(_listed(exact, b, h))
            # Survivors are the top scores: the smaller set is contained in the larger one.
            assert chosen <= best or best <= chosen
    with pytest.raises(ValueError, match="method must be"):
        top_k_keys(q, cache, k=4, method="approx")


@pytest.mark.parametrize("rank", [None, 4])
def test_low_rank_key_scores_match_numpy_with_and_without_score_keys(rank):
    cache, q = _setup(9, queries=2)
    sketched = KVCache.create(B, S, K, D, score_dims=rank or D).prefill(
        jnp.swapaxes(cache.keys, 1, 2), jnp.swapaxes(cache.values, 1, 2), lengths=cache.lengths)
    r = rank or D
    qg, keys = _np_grouped(q), np.asarray(cache.keys, np.float64)
    expected = np.einsum("bkr,bksr->bks", qg[..., :r].sum(axis=(1, 3)), keys[..., :r])
    for which in (cache, sketched):
        assert_allclose(jax.jit(low_rank_key_scores, static_argnames="rank")(q, which, rank=rank), expected,
                        dtype=jnp.float32)
    a, b = top_k_keys(q, cache, k=8, rank=rank), top_k_keys(q, sketched, k=8, rank=rank)
    np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))


@pytest.mark.parametrize("window, sinks", [(0, 0), (5, 0), (7, 3), (100, 2), (10, 60)])
@pytest.mark.parametrize("queries", [1, 3])
def test_window_selection_is_the_mask(window, sinks, queries):
    cache, q = _setup(queries=queries)
    selection = window_selection(q, cache, window=window, sinks=sinks)
    assert selection.positions.shape == (B, K, sinks + window + queries)
    mask = masks.causal() & (masks.sinks(sinks) | masks.sliding_window(window))
    for b, length in enumerate(LENGTHS):
        counts = np.asarray(selection.counts[b])
        listed = np.asarray(selection.positions[b])
        for kv in range(K):
            chosen = listed[kv, : counts[kv]]
            assert np.all(np.diff(chosen) > 0), "listed positions are distinct and ascending"
            # The union over the Tq queries of what the mask lets each of them see.
            expected = set()
            for t in range(queries):
                position = length - queries + t
                expected |= {j for j in range(length) if bool(mask(0, 0, position, j))}
            assert set(chosen.tolist()) == expected


def test_window_selection_decode_equals_masked_reference():
    cache, q = _setup(seed=3)
    out = decode_attention(q, cache, selection=window_selection(q, cache, window=9, sinks=2))
    positions = jnp.arange(S)
    visible = (positions < 2) | (positions >= cache.lengths[:, None] - 10)
    grouped = _np_grouped(q)[:, 0]  # [B, K, G, D]
    keys, values = np.asarray(cache.keys, np.float64), np.asarray(cache.values, np.float64)
    logits = np.einsum("bkgd,bksd->bkgs", grouped, keys) * D**-0.5
    ok = np.asarray(visible & cache.valid())[:, None, None]
    logits = np.where(ok, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bkgs,bksd->bkgd", weights / weights.sum(-1, keepdims=True), values)
    assert_allclose(out[:, 0], expected.reshape(B, K * G, D), dtype=jnp.float32)


def test_window_selection_rejects_negative_sizes():
    cache, q = _setup()
    with pytest.raises(ValueError, match="window"):
        window_selection(q, cache, window=-1)
    with pytest.raises(ValueError, match="sinks"):
        window_selection(q, cache, window=4, sinks=-2)
