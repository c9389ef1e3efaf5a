"""Block-sparse attention in pure JAX: gathers only the visited (q block, kv block) pairs.

The visited pairs of each (batch, head) are compacted into one list and processed in chunks of
``C`` pairs by a ``lax.scan``. Each step gathers ``C`` query tiles and ``C`` key/value tiles, computes
their ``C x block_q x block_kv`` logits, and merges the partial softmax statistics into per-row
accumulators with scatter-max / scatter-add (online softmax, as flash attention, but across a ragged
list). Work follows the number of visited blocks, never ``T x S``: a causal mask costs half of full
attention, a sliding window ``O(T * window)``.

The backward pass recomputes the probabilities from the saved logsumexp and scatter-adds the
``dQ``, ``dK``, ``dV`` contributions of each pair, so it needs no transposed lists.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxsparse.masks.block_mask import BlockMask
from jaxsparse.ops.attention.differentiable import differentiable

# Aim for about this many logits per scan step (summed over batch and heads): large enough to keep
# the two CPU cores busy with few steps, small enough to stay in cache-friendly sizes.
_LOGITS_PER_STEP = 1 << 21


def _chunk_size(block_mask: BlockMask, batch: int, heads: int) -> int:
    per_pair = batch * heads * block_mask.block_q * block_mask.block_kv
    return int(max(1, min(block_mask.max_pairs, _LOGITS_PER_STEP // per_pair)))


def _pair_list(kv_indices, kv_counts, num_pairs: int):
    """Compacts one (batch, head)'s lists ``[nq, W]`` into ``num_pairs`` (q block, kv block) pairs.

    Returns int32 ``[num_pairs]`` arrays ``(q_block, kv_block, valid)``; invalid pairs point at block 0.
    """
    num_q_blocks, width = kv_indices.shape
    listed = (jnp.arange(width) < kv_counts[:, None]).reshape(-1)
    slot = jnp.where(listed, jnp.cumsum(listed) - 1, num_pairs)
    q_block = jnp.zeros(num_pairs, jnp.int32).at[slot].set(
        jnp.repeat(jnp.arange(num_q_blocks, dtype=jnp.int32), width), mode="drop"
    )
    kv_block = jnp.zeros(num_pairs, jnp.int32).at[slot].set(kv_indices.reshape(-1), mode="drop")
    valid = jnp.arange(num_pairs) < listed.sum()
    return q_block, kv_block, valid


def _pairs_per_head(block_mask: BlockMask, num_pairs: int):
    """``_pair_list`` over the metadata's ``[Bm, Hm]`` axes."""
    per_row = jax.vmap(jax.vmap(functools.partial(_pair_list, num_pairs=num_pairs)))
    return per_row(block_mask.kv_indices, block_mask.kv_counts)


def _tile_logits(q_tiles, k_tiles, q_block, kv_block, valid, bias, b, h, block_mask, scale, softcap):
    """Masked logits ``[C, block_q, block_kv]`` of a chunk of pairs, and the pre-cap tanh (or None)."""
    logits = jnp.einsum("cqd,ckd->cqk", q_tiles, k_tiles, preferred_element_type=jnp.float32) * scale
    capped_tanh = None
    if softcap is not None:
        capped_tanh = jnp.tanh(logits / softcap)
        logits = softcap * capped_tanh
    q_idx = q_block[:, None, None] * block_mask.block_q + jnp.arange(block_mask.block_q)[None, :, None]
    kv_idx = kv_block[:, None, None] * block_mask.block_kv + jnp.arange(block_mask.block_kv)[None, None, :]
    if bias is not None:
        logits = logits + bias[q_idx, kv_idx].astype(jnp.float32)
    visible = block_mask.element_mask(b, h, q_idx, kv_idx) & valid[:, None, None]
    return visible, logits, capped_tanh


def _blocks(x, block: int):
    """``[L, D] -> [L / block, block, D]``."""
    return x.reshape(x.shape[0] // block, block, *x.shape[1:])


def _forward_one(q, k, v, bias, pairs, b, h, *, block_mask: BlockMask, scale, softcap, chunk):
    """One (batch, head): q ``[Tp, D]``, k/v ``[Sp, D]``, bias ``[Tp, Sp]`` or None."""
    q_blocks, k_blocks, v_blocks = _blocks(q, block_mask.block_q), _blocks(k, block_mask.block_kv), _blocks(v, block_mask.block_kv)
    num_q_blocks, block_q, head_dim = q_blocks.shape

    def step(carry, chunk_pairs):
        row_max, row_sum, acc = carry
        q_block, kv_block, valid = chunk_pairs
        visible, logits, _ = _tile_logits(
            q_blocks[q_block], k_blocks[kv_block], q_block, kv_block, valid, bias, b, h, block_mask, scale, softcap
        )
        logits = jnp.where(visible, logits, -jnp.inf)
        new_max = row_max.at[q_block].max(logits.max(-1))
        safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        correction = jnp.exp(row_max - safe_max)
        probs = jnp.exp(logits - safe_max[q_block][:, :, None])
        row_sum = (row_sum * correction).at[q_block].add(probs.sum(-1))
        values = jnp.einsum("cqk,ckd->cqd", probs.astype(v.dtype), v_blocks[kv_block], preferred_element_type=jnp.float32)
        acc = (acc * correction[..., None]).at[q_block].add(values)
        return (new_max, row_sum, acc), None

    init = (
        jnp.full((num_q_blocks, block_q), -jnp.inf, jnp.float32),
        jnp.zeros((num_q_blocks, block_q), jnp.float32),
        jnp.zeros((num_q_blocks, block_q, head_dim), jnp.float32),
    )
    chunks = jax.tree.map(lambda x: x.reshape(-1, chunk), pairs)
    (row_max, row_sum, acc), _ = lax.scan(step, init, chunks)
    has_keys = row_sum > 0
    out = acc / jnp.where(has_keys, row_sum, 1.0)[..., None]
    lse = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), -jnp.inf)
    return out.reshape(q.shape).astype(q.dtype), lse.reshape(-1)


def _backward_one(q, k, v, lse, d_out, delta, bias, pairs, b, h, *, block_mask: BlockMask, scale, softcap, chunk):
    """One (batch, head); returns float32 ``dq [Tp, D]``, ``dk, dv [Sp, D]``, ``dbias [Tp, Sp]`` or None."""
    block_q, block_kv = block_mask.block_q, block_mask.block_kv
    q_blocks, k_blocks, v_blocks = _blocks(q, block_q), _blocks(k, block_kv), _blocks(v, block_kv)
    do_blocks = _blocks(d_out, block_q)
    safe_lse = _blocks(jnp.where(jnp.isfinite(lse), lse, 0.0), block_q)
    delta_blocks = _blocks(delta, block_q)

    def step(carry, chunk_pairs):
        dq, dk, dv, dbias = carry
        q_block, kv_block, valid = chunk_pairs
        q_tiles, k_tiles, v_tiles, do_tiles = q_blocks[q_block], k_blocks[kv_block], v_blocks[kv_block], do_blocks[q_block]
        visible, logits, capped_tanh = _tile_logits(
            q_tiles, k_tiles, q_block, kv_block, valid, bias, b, h, block_mask, scale, softcap
        )
        probs = jnp.where(visible, jnp.exp(logits - safe_lse[q_block][:, :, None]), 0.0)
        dv = dv.at[kv_block].add(
            jnp.einsum("cqk,cqd->ckd", probs.astype(d_out.dtype), do_tiles, preferred_element_type=jnp.float32)
        )
        d_probs = jnp.einsum("cqd,ckd->cqk", do_tiles, v_tiles, preferred_element_type=jnp.float32)
        d_logits = probs * (d_probs - delta_blocks[q_block][:, :, None])
        if dbias is not None:
            q_idx = q_block[:, None, None] * block_q + jnp.arange(block_q)[None, :, None]
            kv_idx = kv_block[:, None, None] * block_kv + jnp.arange(block_kv)[None, None, :]
            dbias = dbias.at[q_idx, kv_idx].add(d_logits)
        if capped_tanh is not None:
            d_logits = d_logits * (1.0 - capped_tanh * capped_tanh)
        d_logits = d_logits * scale
        dq = dq.at[q_block].add(
            jnp.einsum("cqk,ckd->cqd", d_logits.astype(k.dtype), k_tiles, preferred_element_type=jnp.float32)
        )
        dk = dk.at[kv_block].add(
            jnp.einsum("cqk,cqd->ckd", d_logits.astype(q.dtype), q_tiles, preferred_element_type=jnp.float32)
        )
        return (dq, dk, dv, dbias), None

    init = (
        jnp.zeros(q_blocks.shape, jnp.float32),
        jnp.zeros(k_blocks.shape, jnp.float32),
        jnp.zeros(v_blocks.shape, jnp.float32),
        None if bias is None else jnp.zeros(bias.shape, jnp.float32),
    )
    chunks = jax.tree.map(lambda x: x.reshape(-1, chunk), pairs)
    (dq, dk, dv, dbias), _ = lax.scan(step, init, chunks)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dbias


def _split_shared_axes(tree, batch_size: int, heads_size: int):
    """Drops the leading ``[Bm, Hm]`` axes of size 1; returns the tree and its vmap axes."""
    if heads_size == 1:
        tree = jax.tree.map(lambda x: x[:, 0], tree)
    if batch_size == 1:
        tree = jax.tree.map(lambda x: x[0], tree)
    return tree, (None if batch_size == 1 else 0), (None if heads_size == 1 else 0)


def _per_batch_and_head(fn, block_mask: BlockMask, pairs, bias, batch: int, heads: int, num_leading: int):
    """vmaps ``fn(*leading, bias, pairs, b, h)`` over batch and heads.

    The first ``num_leading`` operands are ``[B, H, ...]``; ``bias`` and ``pairs`` may be shared
    (leading size 1) across batch entries or heads.
    """
    pairs, pair_batch_axis, pair_head_axis = _split_shared_axes(pairs, *block_mask.shape[:2])
    bias_batch_axis = bias_head_axis = None
    if bias is not None:
        bias, bias_batch_axis, bias_head_axis = _split_shared_axes(bias, *bias.shape[:2])
    over_heads = jax.vmap(fn, in_axes=(0,) * num_leading + (bias_head_axis, pair_head_axis, None, 0))
    over_batch = jax.vmap(over_heads, in_axes=(0,) * num_leading + (bias_batch_axis, pair_batch_axis, 0, None))
    return lambda *leading: over_batch(*leading, bias, pairs, jnp.arange(batch), jnp.arange(heads))


def _padded_pairs(block_mask: BlockMask, batch: int, heads: int):
    chunk = _chunk_size(block_mask, batch, heads)
    num_pairs = -(-block_mask.max_pairs // chunk) * chunk
    return _pairs_per_head(block_mask, num_pairs), chunk


def _repeat_kv(x, heads: int):
    return jnp.repeat(x, heads // x.shape[1], axis=1)


def xla_forward(q, k, v, bias, block_mask: BlockMask, *, scale, softcap):
    """Forward in the internal layout (see :mod:`jaxsparse.ops.attention.differentiable`)."""
    batch, heads = q.shape[:2]
    pairs, chunk = _padded_pairs(block_mask, batch, heads)
    one = functools.partial(_forward_one, block_mask=block_mask, scale=scale, softcap=softcap, chunk=chunk)
    return _per_batch_and_head(one, block_mask, pairs, bias, batch, heads, 3)(q, _repeat_kv(k, heads), _repeat_kv(v, heads))


def xla_backward(q, k, v, bias, block_mask: BlockMask, out, lse, d_out, delta, *, scale, softcap):
    """Backward in the internal layout; returns ``(dq, dk, dv, dbias)``."""
    del out  # folded into delta
    batch, heads = q.shape[:2]
    num_kv_heads = k.shape[1]
    pairs, chunk = _padded_pairs(block_mask, batch, heads)
    one = functools.partial(_backward_one, block_mask=block_mask, scale=scale, softcap=softcap, chunk=chunk)
    dq, dk, dv, dbias = _per_batch_and_head(one, block_mask, pairs, bias, batch, heads, 6)(
        q, _repeat_kv(k, heads), _repeat_kv(v, heads), lse, d_out, delta
    )
    group = heads // num_kv_heads
    dk = dk.reshape(batch, num_kv_heads, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(batch, num_kv_heads, group, *dv.shape[2:]).sum(2)
    if dbias is not None:
        reduce_axes = tuple(axis for axis in (0, 1) if bias.shape[axis] == 1)
        dbias = dbias.sum(reduce_axes, keepdims=True).astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias


attend = differentiable(xla_forward, xla_backward)


def check_support(block_q: int, block_kv: int, head_dim: int, dtype, bias) -> None:
    """The XLA implementation tiles any sizes and supports bias: nothing to reject."""
    del block_q, block_kv, head_dim, dtype, bias
