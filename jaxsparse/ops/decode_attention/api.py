"""``jaxsparse.decode_attention``: a few new queries over a KV cache, reading only what is selected."""

from __future__ import annotations

import importlib

import jax.numpy as jnp

from jaxsparse.kv.cache import KVCache
from jaxsparse.kv.paged_cache import PagedKVCache
from jaxsparse.ops.decode_attention.reference import reference_decode_attention
from jaxsparse.ops.decode_attention.selection import BlockSelection, PositionSelection
from jaxsparse.ops.decode_attention.xla import xla_decode_attention

_KERNELS = {
    "pallas_tpu": "jaxsparse.ops.decode_attention.pallas_tpu",
    "pallas_gpu": "jaxsparse.ops.decode_attention.pallas_gpu",
}
IMPLEMENTATIONS = ("reference", "xla") + tuple(_KERNELS)


def _check(q, cache: KVCache | PagedKVCache, selection) -> None:
    if not isinstance(cache, (KVCache, PagedKVCache)):
        raise TypeError(f"cache must be a KVCache or a PagedKVCache, got {type(cache).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Tq, H, D], got shape {q.shape}")
    batch, _, heads, head_dim = q.shape
    if batch != cache.batch or head_dim != cache.head_dim:
        raise ValueError(f"q [B, Tq, H, D] = {q.shape} does not match the cache (B = {cache.batch}, D = {cache.head_dim})")
    if heads % cache.kv_heads:
        raise ValueError(f"query heads H = {heads} must be a multiple of the cache's kv heads K = {cache.kv_heads}")
    if selection is not None:
        if not isinstance(selection, (BlockSelection, PositionSelection)):
            raise TypeError(f"selection must be a BlockSelection, a PositionSelection or None, got {type(selection).__name__}")
        listed = selection.indices if isinstance(selection, BlockSelection) else selection.positions
        if listed.ndim != 3 or listed.shape[:2] != (batch, cache.kv_heads):
            raise ValueError(f"the selection must be [B, K, n] = [{batch}, {cache.kv_heads}, n], got {listed.shape}")


def decode_attention(q, cache: KVCache | PagedKVCache, *, selection: BlockSelection | PositionSelection | None = None,
                     scale: float | None = None, softcap: float | None = None, return_lse: bool = False,
                     implementation: str | None = None):
    """Attention of ``Tq`` new queries (usually 1) over a KV cache, or over a selected part of it.

    Query ``t`` of sequence ``b`` sits at position ``cache.lengths[b] - Tq + t`` (append the new keys
    first) and attends to the cache positions that are selected, inside the sequence, and not after
    it. Query head ``h`` reads kv head ``h // (H // K)``; selections are per kv head (shared by its
    query heads, as in GQA-aware selection).

    Args:
      q: ``[B, Tq, H, D]``.
      cache: a :class:`~jaxsparse.kv.KVCache` or :class:`~jaxsparse.kv.PagedKVCache` with ``K`` kv
        heads. Selections name logical positions (or logical pages); a paged cache translates them
        through its page table, and its block selections must use ``block_size == page_size``.
      selection: None (the whole cache), a :class:`BlockSelection` (pages, e.g. Quest) or a
        :class:`PositionSelection` (tokens, e.g. top-k keys, TokenSelect, H2O).
      scale: default ``D ** -0.5``. softcap: optional tanh soft-cap on the logits.
      return_lse: also return the logsumexp ``[B, Tq, H]`` (float32).
      implementation: ``"reference"`` (dense, masked: the spec), ``"xla"`` (gathers only the
        selection), ``"pallas_tpu"`` / ``"pallas_gpu"`` (kernels that read only the listed blocks,
        split-K over the list; block selections or None), or None (``"xla"``).

    Returns:
      ``o [B, Tq, H, D]`` in q's dtype (and ``lse``). A query that sees nothing gets 0 (lse -inf).

    Raises:
      ValueError / TypeError: shapes that do not match the cache, an unknown implementation.
      NotImplementedError: a kernel asked for something it does not do (position selections).
    """
    q = jnp.asarray(q)
    _check(q, cache, selection)
    batch, queries, heads, head_dim = q.shape
    kv_heads = cache.kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    grouped = q.reshape(batch, queries, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tq, D]
    name = "xla" if implementation is None else implementation
    if name == "reference":
        contiguous = cache.to_contiguous() if isinstance(cache, PagedKVCache) else cache
        out, lse = reference_decode_attention(grouped, contiguous.keys, contiguous.values, contiguous.lengths,
                                              selection, scale=scale, softcap=softcap)
    elif name == "xla":
        out, lse = xla_decode_attention(grouped, cache, selection, scale=scale, softcap=softcap)
    elif name in _KERNELS:
        module = importlib.import_module(_KERNELS[name])
        out, lse = module.run(grouped, cache, selection, scale=scale, softcap=softcap)
    else:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {name!r}")
    out = out.transpose(0, 3, 1, 2, 4).reshape(batch, queries, heads, head_dim).astype(q.dtype)
    if not return_lse:
        return out
    return out, lse.transpose(0, 3, 1, 2).reshape(batch, queries, heads)
