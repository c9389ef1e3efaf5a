"""Calling the Pallas decode-attention kernels: layout, block lists, interpret mode."""

from __future__ import annotations

from types import ModuleType

from jaxsparse.kv.paged_cache import PagedKVCache
from jaxsparse.ops.decode_attention.selection import BlockSelection
from jaxsparse.ops.platform import check_kernel_support, interpret_on


def _num_splits(listed_blocks: int, instances: int, target_programs: int | None) -> int:
    """Split-K over each block list: at least 8 listed blocks per split, and either at most 8 splits
    (``target_programs`` None) or enough that ``instances * splits`` reaches ``target_programs``."""
    wanted = 8 if target_programs is None else -(-target_programs // instances)
    return max(1, min(wanted, listed_blocks // 8))


def kernel_runner(kernel: ModuleType, platform: str, implementation: str, default_block: int,
                  target_programs: int | None = None):
    """``run(q [B, K, G, Tq, D], cache, selection, *, scale, softcap) -> (o, lse)`` over ``kernel``;
    ``cache`` is a :class:`KVCache` or a :class:`PagedKVCache` (pool and page table passed through).

    ``target_programs``: how many kernel instances (sequence x kv head x split) a call should
    launch to fill the device (None: at most 8 splits per block list)."""

    def run(q, cache, selection, *, scale, softcap):
        interpret = interpret_on(platform, implementation)
        paged = isinstance(cache, PagedKVCache)
        block = cache.page_size if paged else default_block
        if selection is None:
            selection = BlockSelection.all_blocks(cache.batch, cache.kv_heads, cache.capacity, block)
        if not isinstance(selection, BlockSelection):
            raise NotImplementedError(
                f"implementation={implementation!r} reads listed blocks; a PositionSelection needs implementation='xla'")
        block = selection.block_size
        check_kernel_support(kernel.check_support, implementation, cache.head_dim, block, q.dtype)
        if paged and block != cache.page_size:
            raise ValueError(f"a paged cache is read page by page: the selection's block_size {block} must equal "
                             f"the page size {cache.page_size}")
        if not paged and cache.capacity % block:
            raise NotImplementedError(f"implementation={implementation!r} needs the cache capacity "
                                      f"{cache.capacity} to be a multiple of the block size {block}")
        batch, kv_heads, groups, queries, head_dim = q.shape
        rows = q.reshape(batch, kv_heads, groups * queries, head_dim)  # row r = g * Tq + t
        if paged:  # the pool as one "sequence" of P pages; the kernel translates through the page table
            keys = cache.keys.reshape(1, kv_heads, -1, head_dim)
            values = cache.values.reshape(1, kv_heads, -1, head_dim)
            paging = dict(page_table=cache.page_table)
        else:
            keys, values, paging = cache.keys, cache.values, {}
        out, lse = kernel.decode_attention_forward(
            rows, keys.astype(q.dtype), values.astype(q.dtype), selection.indices, selection.counts,
            cache.lengths, scale=scale, softcap=softcap, queries_per_head=queries, block_kv=block,
            num_splits=_num_splits(selection.indices.shape[-1], batch * kv_heads, target_programs),
            interpret=interpret, **paging)
        return out.reshape(q.shape), lse.reshape(q.shape[:-1])

    return run
