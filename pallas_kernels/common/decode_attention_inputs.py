"""Argument checks and the split merge shared by the GPU and TPU decode-attention kernels."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_decode_attention_inputs(q, k, v, block_indices, block_counts, lengths, scale, softcap,
                                  queries_per_head, block_kv, num_splits, check_support,
                                  page_table=None):
    """Validates the kernel contract; returns ``(B, K, R, S, D, nb)``.

    S is the logical cache length: k.shape[2] for a contiguous cache, max_pages * block_kv with
    a ``page_table`` (then k and v are a shared page pool [1, K, P * block_kv, D]). Concrete
    lengths must lie in [0, max_pages * block_kv] when a page table is given (traced lengths are
    not checked).

    ``check_support(D, block_kv, dtype)`` is the kernel's own size check, run once the shapes are known.

    Raises:
      ValueError: naming the argument, the expected and the actual value.
    """
    if q.ndim != 4:
        raise ValueError(f"decode_attention: q must be [B, K, R, D], got shape {q.shape}.")
    batch, kv_heads, rows, head_dim = q.shape
    paged = page_table is not None
    cache_batch = 1 if paged else batch
    for name, x in (("k", k), ("v", v)):
        if x.ndim != 4 or x.shape[:2] != (cache_batch, kv_heads) or x.shape[3] != head_dim:
            expected = (f"a page pool [1, {kv_heads}, P * block_kv, {head_dim}] when page_table "
                        "is given" if paged else f"[{batch}, {kv_heads}, S, {head_dim}]")
            raise ValueError(f"decode_attention: {name} must be {expected}, got shape {x.shape}.")
    if v.shape != k.shape:
        raise ValueError(f"decode_attention: v must have k's shape {k.shape}, got {v.shape}.")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(
            f"decode_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    check_support(head_dim, block_kv, q.dtype)
    kv_len = k.shape[2]
    if kv_len == 0 or kv_len % block_kv:
        raise ValueError(
            f"decode_attention: {'page pool length k.shape[2]' if paged else 'cache length S'}"
            f"={kv_len} must be a positive multiple of block_kv={block_kv}."
        )
    if not isinstance(queries_per_head, int) or queries_per_head < 1 or rows % queries_per_head:
        raise ValueError(
            f"decode_attention: queries_per_head must be a positive divisor of R={rows}, "
            f"got {queries_per_head}."
        )
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be an int >= 1, got {num_splits}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"decode_attention: softcap must be None or > 0, got {softcap}.")
    if not isinstance(scale, numbers.Real):
        raise ValueError(f"decode_attention: scale must be a Python float, got {type(scale)}.")
    if block_indices.ndim != 3 or block_indices.shape[:2] != (batch, kv_heads):
        raise ValueError(
            f"decode_attention: block_indices must be [{batch}, {kv_heads}, nb], "
            f"got shape {block_indices.shape}."
        )
    if block_counts.shape != (batch, kv_heads):
        raise ValueError(
            f"decode_attention: block_counts must be [{batch}, {kv_heads}], "
            f"got shape {block_counts.shape}."
        )
    if lengths.shape != (batch,):
        raise ValueError(f"decode_attention: lengths must be [{batch}], got shape {lengths.shape}.")
    for name, x in (("block_indices", block_indices), ("block_counts", block_counts),
                    ("lengths", lengths)):
        if x.dtype != jnp.int32:
            raise ValueError(f"decode_attention: {name} must be int32, got {x.dtype}.")
    if paged:
        kv_len = _check_page_table(page_table, lengths, batch, block_kv)
    return batch, kv_heads, rows, kv_len, head_dim, block_indices.shape[2]


def _check_page_table(page_table, lengths, batch, block_kv):
    """Checks a page table [B, max_pages] and the (concrete) lengths it bounds; returns the
    logical cache length max_pages * block_kv."""
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.shape[1] < 1:
        raise ValueError(
            f"decode_attention: page_table must be [{batch}, max_pages] with max_pages >= 1, "
            f"got shape {page_table.shape}."
        )
    if page_table.dtype != jnp.int32:
        raise ValueError(f"decode_attention: page_table must be int32, got {page_table.dtype}.")
    logical_len = page_table.shape[1] * block_kv
    if not isinstance(lengths, jax.core.Tracer):
        values = np.asarray(lengths)
        if values.size and (values.min() < 0 or values.max() > logical_len):
            raise ValueError(
                f"decode_attention: lengths must lie in [0, max_pages * block_kv = {logical_len}] "
                f"with page_table [{batch}, {page_table.shape[1]}], got {values.tolist()}."
            )
    return logical_len


def merge_splits(o_parts, lse_parts):
    """Log-sum-exp merge of split partials over axis 2: o [B, K, P, R, D], lse [B, K, P, R]
    (float32) -> (o [B, K, R, D], lse [B, K, R]). All-empty rows give o = 0, lse = -inf."""
    row_max = jnp.max(lse_parts, axis=2, keepdims=True)
    shift = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    weights = jnp.exp(lse_parts - shift)  # exp(-inf) = 0 for empty splits.
    total = jnp.sum(weights, axis=2)
    safe_total = jnp.where(total == 0.0, 1.0, total)
    o = jnp.sum(weights[..., None] * o_parts, axis=2) / safe_total[..., None]
    return o, shift[:, :, 0] + jnp.log(total)  # log(0) = -inf on empty rows.
