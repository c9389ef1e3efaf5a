"""Test helper shared by the GPU and TPU decode-attention kernel tests: a contiguous cache spread
over a shuffled page pool, and back."""

from __future__ import annotations

import numpy as np


def paginate(rng, k, v, listed, lengths, *, block_kv, garbage):
    """Spreads contiguous caches k, v [B, K, M * block_kv, D] over a shuffled page pool.

    Logical block j of sequence b gets a page of its own when some kv head lists it (listed:
    bool [B, K, M]), except that when every length reaches past block 0, block 0 is one page
    shared by all sequences (a common prefix: sequence 0's block 0 is copied into the others' k
    and v, which are returned for the reference). Used pages are a random permutation of
    [1, P - 1); pages 0 and P - 1 are never used. Every pool byte that no listed position before
    its sequence's length needs is NaN (unused pages, positions past a length, a block only
    another kv head lists), and the page-table entries of unmapped blocks are ``garbage(shape,
    P)``.

    Returns:
      (k, v, k_pool, v_pool, page_table): clean contiguous caches for the reference, pools
      [1, K, P * block_kv, D] and the int32 page table [B, M].
    """
    batch, kv_heads, kv_len, head_dim = k.shape
    mapped = listed.any(axis=1)  # [B, M]
    share = batch > 1 and min(lengths) >= block_kv
    k, v = k.copy(), v.copy()
    if share:
        mapped[:, 0] = True
        k[:, :, :block_kv], v[:, :, :block_kv] = k[:1, :, :block_kv], v[:1, :, :block_kv]
    used = int(mapped.sum()) - (batch - 1 if share else 0)
    num_pages = used + 2
    pages = iter(1 + rng.permutation(used))
    shared_page = next(pages) if share else None
    page_table = np.asarray(garbage((batch, kv_len // block_kv), num_pages), np.int32)
    for b, j in zip(*np.nonzero(mapped)):
        page_table[b, j] = shared_page if share and j == 0 else next(pages)
    k_pool, v_pool = (np.full((1, kv_heads, num_pages * block_kv, head_dim), np.nan)
                      for _ in range(2))
    for b, h, j in zip(*np.nonzero(listed)):
        valid = int(np.clip(lengths[b] - j * block_kv, 0, block_kv))
        page = page_table[b, j] * block_kv
        k_pool[0, h, page: page + valid] = k[b, h, j * block_kv: j * block_kv + valid]
        v_pool[0, h, page: page + valid] = v[b, h, j * block_kv: j * block_kv + valid]
    return k, v, k_pool, v_pool, page_table


def gather_pages(pool, page_table, block_kv):
    """The contiguous cache [B, K, M * block_kv, D] that a page table makes of a pool (garbage
    entries clipped: those blocks are never read)."""
    _, kv_heads, pool_len, head_dim = pool.shape
    num_pages = pool_len // block_kv
    pages = pool[0].reshape(kv_heads, num_pages, block_kv, head_dim)
    pages = pages[:, np.clip(page_table, 0, num_pages - 1)]  # [K, B, M, block_kv, D]
    batch, max_pages = page_table.shape
    return pages.transpose(1, 0, 2, 3, 4).reshape(batch, kv_heads, max_pages * block_kv, head_dim)


def listed_blocks(indices, counts, num_blocks):
    listed = np.zeros(indices.shape[:2] + (num_blocks,), bool)
    for b, h in np.ndindex(*indices.shape[:2]):
        listed[b, h, indices[b, h, : counts[b, h]]] = True
    return listed
