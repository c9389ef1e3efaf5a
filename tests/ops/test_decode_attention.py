"""decode_attention: every implementation against reference; reference against jax.nn attention."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.kv import KVCache, PagedKVCache
from jaxsparse.ops.decode_attention import BlockSelection, PositionSelection, decode_attention
from jaxsparse.testing import assert_allclose, random_normal
from tests.backend import needs_tpu_or_cpu


def _cache(seed, batch, capacity, kv_heads, head_dim, lengths, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 2)
    prompt = max(lengths)
    cache = KVCache.create(batch, capacity, kv_heads, head_dim, dtype)
    return cache.prefill(random_normal(keys[0], (batch, prompt, kv_heads, head_dim), dtype),
                         random_normal(keys[1], (batch, prompt, kv_heads, head_dim), dtype), lengths=jnp.asarray(lengths))


def _random_blocks(seed, batch, kv_heads, num_blocks, listed, block_size):
    rng = np.random.default_rng(seed)
    indices = np.stack([np.stack([np.sort(rng.permutation(num_blocks)[:listed]) for _ in range(kv_heads)]) for _ in range(batch)])
    counts = rng.integers(0, listed + 1, (batch, kv_heads))
    counts[0, 0] = 0  # a head that reads nothing
    counts[-1, -1] = listed
    return BlockSelection(indices=jnp.asarray(indices, jnp.int32), counts=jnp.asarray(counts, jnp.int32), block_size=block_size)


def test_reference_equals_jax_attention_with_length_and_causal_masks():
    cache = _cache(0, 2, 64, 2, 16, [40, 23])
    q = random_normal(jax.random.key(1), (2, 3, 4, 16))
    out = decode_attention(q, cache, implementation="reference")
    keys, values = jnp.swapaxes(cache.keys, 1, 2), jnp.swapaxes(cache.values, 1, 2)
    query_position = cache.lengths[:, None] - 3 + jnp.arange(3)
    mask = (jnp.arange(64) <= query_position[..., None])[:, None]  # [B, 1, Tq, S]
    assert_allclose(out, jax.nn.dot_product_attention(q, keys, values, mask=mask))


def _paged_copy(cache: KVCache, page_size: int, seed: int) -> PagedKVCache:
    """The same sequences in a pool whose pages are shuffled (and two spare pages of noise)."""
    batch, kv_heads, capacity, dim = cache.keys.shape
    pages_per_sequence = capacity // page_size
    num_pages = batch * pages_per_sequence + 2
    rng = np.random.default_rng(seed)
    page_table = rng.permutation(num_pages)[: batch * pages_per_sequence].reshape(batch, pages_per_sequence)
    pool = []
    for store in (cache.keys, cache.values):
        noise = np.array(random_normal(jax.random.key(seed), (kv_heads, num_pages, page_size, dim), store.dtype))
        pages = np.asarray(store).reshape(batch, kv_heads, pages_per_sequence, page_size, dim)
        noise[:, page_table] = pages.transpose(1, 0, 2, 3, 4)
        pool.append(jnp.asarray(noise))
    used = set(page_table.ravel().tolist())
    free = np.asarray([p for p in range(num_pages) if p not in used], np.int32)
    return PagedKVCache(keys=pool[0], values=pool[1], page_table=jnp.asarray(page_table, jnp.int32), lengths=cache.lengths,
                        free_pages=jnp.asarray(np.pad(free, (0, num_pages - free.size))), free_count=jnp.asarray(free.size, jnp.int32))


class DecodeAttentionContract:
    implementation = "xla"
    head_dim, capacity, block = 32, 256, 64

    def _compare(self, q, cache, selection, softcap=None):
        run = jax.jit(lambda q, cache: (
            decode_attention(q, cache, selection=selection, softcap=softcap, return_lse=True, implementation=self.implementation),
            decode_attention(q, cache, selection=selection, softcap=softcap, return_lse=True, implementation="reference")))
        (out, lse), (out_ref, lse_ref) = run(q, cache)
        assert_allclose(out, out_ref, dtype=q.dtype)
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(lse_ref)))
        finite = np.isfinite(np.asarray(lse_ref))
        np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], rtol=1e-4, atol=1e-4)
        return out

    @pytest.mark.parametrize("queries, groups", [(1, 1), (1, 4), (3, 2)])
    def test_whole_cache(self, queries, groups):
        cache = _cache(2, 2, self.capacity, 2, self.head_dim, [self.capacity - 5, 70])
        q = random_normal(jax.random.key(3), (2, queries, 2 * groups, self.head_dim))
        self._compare(q, cache, None)

    @pytest.mark.parametrize("softcap", [None, 20.0])
    def test_block_selection(self, softcap):
        cache = _cache(4, 2, self.capacity, 2, self.head_dim, [self.capacity - 9, 150])
        selection = _random_blocks(5, 2, 2, self.capacity // self.block, 3, self.block)
        q = random_normal(jax.random.key(6), (2, 1, 4, self.head_dim))
        out = self._compare(q, cache, selection, softcap)
        assert np.all(np.asarray(out)[0, :, :2] == 0)  # kv head 0 of sequence 0 reads nothing

    @pytest.mark.parametrize("queries", [1, 3])
    def test_paged_cache_equals_contiguous(self, queries):
        cache = _cache(14, 2, self.capacity, 2, self.head_dim, [self.capacity - 9, 150])
        paged = _paged_copy(cache, self.block, 15)
        selection = _random_blocks(16, 2, 2, self.capacity // self.block, 3, self.block)
        q = random_normal(jax.random.key(17), (2, queries, 4, self.head_dim))
        for chosen in (None, selection):
            run = jax.jit(lambda q, paged, cache, chosen=chosen: (
                decode_attention(q, paged, selection=chosen, implementation=self.implementation),
                decode_attention(q, cache, selection=chosen, implementation="reference")))
            out, expected = run(q, paged, cache)
            assert_allclose(out, expected)

    def test_bfloat16(self):
        cache = _cache(7, 1, self.capacity, 1, self.head_dim, [self.capacity - 3], jnp.bfloat16)
        q = random_normal(jax.random.key(8), (1, 1, 2, self.head_dim), jnp.bfloat16)
        self._compare(q, cache, None)


class TestXla(DecodeAttentionContract):
    implementation = "xla"

    def test_position_selection(self):
        cache = _cache(9, 2, 64, 2, 16, [50, 30])
        rng = np.random.default_rng(0)
        positions = jnp.asarray(np.stack([np.stack([rng.permutation(64)[:10] for _ in range(2)]) for _ in range(2)]), jnp.int32)
        selection = PositionSelection(positions=positions, counts=jnp.asarray([[10, 4], [0, 7]], jnp.int32))
        q = random_normal(jax.random.key(10), (2, 2, 4, 16))
        self._compare(q, cache, selection)

    def test_selecting_everything_equals_dense(self):
        cache = _cache(11, 2, 64, 2, 16, [64, 33])
        q = random_normal(jax.random.key(12), (2, 1, 4, 16))
        everything = PositionSelection(positions=jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 2, 64)),
                                       counts=jnp.full((2, 2), 64, jnp.int32))
        assert_allclose(decode_attention(q, cache, selection=everything), decode_attention(q, cache))
        blocks = BlockSelection.all_blocks(2, 2, 64, 16)
        assert_allclose(decode_attention(q, cache, selection=blocks), decode_attention(q, cache))


class TestPallasGpu(DecodeAttentionContract):
    implementation = "pallas_gpu"


@needs_tpu_or_cpu
class TestPallasTpu(DecodeAttentionContract):
    implementation = "pallas_tpu"
    head_dim, capacity, block = 128, 512, 128


def test_errors():
    cache = _cache(13, 2, 64, 2, 16, [10, 10])
    with pytest.raises(ValueError, match="must be a multiple of the cache's kv heads"):
        decode_attention(jnp.ones((2, 1, 3, 16)), cache)
    with pytest.raises(ValueError, match="does not match the cache"):
        decode_attention(jnp.ones((2, 1, 4, 8)), cache)
    with pytest.raises(ValueError, match="implementation must be"):
        decode_attention(jnp.ones((2, 1, 4, 16)), cache, implementation="flash")
    with pytest.raises(TypeError, match="selection must be"):
        decode_attention(jnp.ones((2, 1, 4, 16)), cache, selection=jnp.ones((2, 2, 3)))
    positions = PositionSelection(positions=jnp.zeros((2, 2, 3), jnp.int32), counts=jnp.ones((2, 2), jnp.int32))
    with pytest.raises(NotImplementedError, match="PositionSelection needs implementation='xla'"):
        decode_attention(jnp.ones((2, 1, 4, 16)), cache, selection=positions, implementation="pallas_gpu")
