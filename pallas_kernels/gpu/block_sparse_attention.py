"""Block-sparse flash attention for GPUs (Pallas, Triton backend), forward and backward.

FlashAttention-2 (Dao, 2023) restricted to a block-sparse pattern, in the spirit of splash
attention, but without scalar prefetch (the GPU Pallas backends reject it). Each kernel instance
owns one (batch, query head, block) cell and walks a per-block list of partner blocks with a
``lax.fori_loop`` whose trip count is the list's length, read from the metadata at run time. The
partner operand (K/V in the forward and dQ kernels, Q/dO in the dK/dV kernel) covers the whole
sequence, and each step loads one tile with ``pl.ds(block_id * block_size, block_size)``.

Layout (internal, padded by the caller):
  q: [B, H, Tp, D]; k, v: [B, K, Sp, D]; query head h reads kv head h // G with G = H // K.
  nq = Tp // block_q, nk = Sp // block_kv.
  kv_indices, kv_full: int32 [Bm, Hm, nq, max_kv]; kv_counts: int32 [Bm, Hm, nq].
  q_indices, q_full: int32 [Bm, Hm, nk, max_q]; q_counts: int32 [Bm, Hm, nk].
  Bm in {1, B} and Hm in {1, H}; a size-1 axis is broadcast.

Per visited tile, with s the scaled (and soft-capped) scores:
  s = scale * q @ k.T;  s = c * tanh(s / c) if softcap c;  s = where(visible, s, -inf)
where ``visible`` is all-true in full tiles (kv_full == 1) and ``element_mask(...)`` in partial
ones. Softmax statistics are float32; matmuls run in the input dtype with float32 accumulation. A
row with nothing visible yields o = 0, lse = -inf and zero gradients, never NaN.

Mask operands (``mask_operands = (row_operands, column_operands, scalar_operands)``) reach
``element_mask`` as per-tile values, never as whole arrays to index, so no gather is needed:
  row operand int32 [Bo, Tp]: one value per query position; ``element_mask`` sees the [block_q, 1]
    tile of the current q block (a BlockSpec'd tile in the forward and dQ kernels, a
    ``pl.ds`` slice per listed q block in the dK/dV kernel);
  column operand int32 [Bo, Sp]: one value per key position; ``element_mask`` sees the
    [1, block_kv] tile of the current kv block (a ``pl.ds`` slice per listed kv block like K in
    the forward and dQ kernels, a BlockSpec'd tile in the dK/dV kernel);
  scalar operand int32 [Bo]: one value per sequence, delivered as a 0-d block (entry b).
Bo in {1, B}; Bo == 1 broadcasts over the batch (row 0 / entry 0 for every b).

Triton notes: block sizes and head dims must be powers of two (>= 16 for ``tl.dot``); the loops
have data-dependent trip counts but no Python-level data-dependent control flow. ``element_mask``
must itself avoid gathers and stick to elementwise arithmetic and comparisons on its tiles,
scalars, b, h, q_idx and kv_idx (the Triton lowering has no ``gather``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.tiles import finite_or_zero, matmul
from pallas_kernels.gpu import online_softmax
from pallas_kernels.gpu.block_sparse_layout import (
    check_inputs,
    check_mask_operands,
    check_metadata,
    mask_specs,
    metadata_specs,
)

FORWARD_NAME = "jaxsparse_block_sparse_attention_fwd"
BACKWARD_DQ_NAME = "jaxsparse_block_sparse_attention_bwd_dq"
BACKWARD_DKV_NAME = "jaxsparse_block_sparse_attention_bwd_dkv"

ElementMask = Callable[..., jax.Array]
# (row_operands [Bo, Tp] each, column_operands [Bo, Sp] each, scalar_operands [Bo] each), int32.
MaskOperands = tuple[Sequence[jax.Array], Sequence[jax.Array], Sequence[jax.Array]]


# ----------------------------------------------------------------------------------------------
# Tile math shared by the three kernels.


def _tile_scores(q, k, *, is_full, visible_fn, q_start, kv_start, scale, softcap):
    """Scaled, soft-capped and masked scores of one tile.

    Args:
      q: [block_q, D] query tile.
      k: [block_kv, D] key tile.
      is_full: int32 scalar; nonzero means every element of the tile is visible.
      visible_fn: ``visible_fn(q_idx, kv_idx) -> bool [block_q, block_kv]``, the element mask of
        this tile (it loads its own mask tiles); traced inside the partial-tile branch only.
      q_start: int32 scalar, absolute position of the tile's first query.
      kv_start: int32 scalar, absolute position of the tile's first key.
      scale: multiplies q.k.
      softcap: None or the cap c.

    Returns:
      (s, capped_tanh): s float32 [block_q, block_kv] with -inf where invisible; capped_tanh is
      tanh(scale * q.k / c) (needed by the backward) or None without softcap.
    """
    block_q, block_kv = q.shape[0], k.shape[0]
    s = matmul(q, k, transpose_b=True) * scale
    capped_tanh = None
    if softcap is not None:
        capped_tanh = jnp.tanh(s / softcap)
        s = softcap * capped_tanh

    def apply_element_mask(scores):
        q_idx = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        kv_idx = kv_start + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        return jnp.where(visible_fn(q_idx, kv_idx), scores, -jnp.inf)

    s = lax.cond(is_full != 0, lambda scores: scores, apply_element_mask, s)
    return s, capped_tanh


def _split_mask_refs(refs, operand_counts):
    """Splits the kernel refs after the metadata into (row, column, scalar) refs and the rest."""
    groups, offset = [], 0
    for count in operand_counts:
        groups.append(tuple(refs[offset:offset + count]))
        offset += count
    return tuple(groups), refs[offset:]


def _load_scalars(mask_refs):
    """Loads the program's mask scalars (0-d blocks: entry b, or 0 when Bo == 1), once per
    program, before its loop."""
    return tuple(ref[...] for ref in mask_refs[2])


def _make_visible_fn(element_mask, mask_refs, scalars, b, h, *, row_slice, column_slice):
    """The per-tile element mask of one kernel step.

    Args:
      element_mask: the user's mask, see :func:`block_sparse_attention_forward`.
      mask_refs: (row refs, column refs, scalar refs) of this program.
      scalars: the loaded scalars, from :func:`_load_scalars`.
      b, h: int32 program ids.
      row_slice, column_slice: index for the row / column refs: ``...`` for a BlockSpec'd tile,
        a ``pl.ds`` for a whole-sequence ref.

    Returns:
      ``visible_fn(q_idx, kv_idx)`` for :func:`_tile_scores`; row and column tiles are loaded
      inside the partial-tile branch, so full tiles do not read them.
    """
    row_refs, column_refs, _ = mask_refs

    def visible_fn(q_idx, kv_idx):
        row_tiles = tuple(ref[row_slice][:, None] for ref in row_refs)
        column_tiles = tuple(ref[column_slice][None, :] for ref in column_refs)
        return element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx)

    return visible_fn


# ----------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(
    q_ref, k_ref, v_ref, kv_indices_ref, kv_counts_ref, kv_full_ref, *refs,
    operand_counts, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, q block): online softmax over the q block's kv list.

    Refs: q [block_q, D]; k, v [Sp, D]; kv_indices, kv_full [max_kv]; kv_counts []; mask rows
    [block_q], mask columns [Sp], mask scalars []; outputs o [block_q, D] and lse [block_q].
    """
    mask_refs, (o_ref, lse_ref) = _split_mask_refs(refs, operand_counts)
    batch, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    scalars = _load_scalars(mask_refs)
    q = q_ref[...]

    def visit_kv_block(step, carry):
        kv_block = kv_indices_ref[step]
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        visible_fn = _make_visible_fn(
            element_mask, mask_refs, scalars, batch, head, row_slice=..., column_slice=kv_slice
        )
        s, _ = _tile_scores(
            q, k_ref[kv_slice, :], is_full=kv_full_ref[step], visible_fn=visible_fn,
            q_start=q_block * block_q, kv_start=kv_block * block_kv, scale=scale,
            softcap=softcap,
        )
        return online_softmax.step(carry, s, v_ref[kv_slice, :])

    init = online_softmax.init(block_q, o_ref.shape[1])
    carry = lax.fori_loop(0, kv_counts_ref[...], visit_kv_block, init)
    o, lse = online_softmax.finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _backward_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_indices_ref, kv_counts_ref, kv_full_ref,
    *refs, operand_counts, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, q block): dQ accumulated over the q block's kv list.

    Refs: q, do [block_q, D]; k, v [Sp, D]; lse, delta [block_q]; kv_indices, kv_full [max_kv];
    kv_counts []; mask rows [block_q], mask columns [Sp], mask scalars []; output dq [block_q, D].
    """
    mask_refs, (dq_ref,) = _split_mask_refs(refs, operand_counts)
    batch, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    scalars = _load_scalars(mask_refs)
    q, do = q_ref[...], do_ref[...]
    lse_shift = finite_or_zero(lse_ref[...])[:, None]
    delta = delta_ref[...][:, None]

    def visit_kv_block(step, dq_acc):
        kv_block = kv_indices_ref[step]
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        k = k_ref[kv_slice, :]
        visible_fn = _make_visible_fn(
            element_mask, mask_refs, scalars, batch, head, row_slice=..., column_slice=kv_slice
        )
        s, capped_tanh = _tile_scores(
            q, k, is_full=kv_full_ref[step], visible_fn=visible_fn, q_start=q_block * block_q,
            kv_start=kv_block * block_kv, scale=scale, softcap=softcap,
        )
        p = jnp.exp(s - lse_shift)
        dp = matmul(do, v_ref[kv_slice, :], transpose_b=True)
        ds = p * (dp - delta)
        if capped_tanh is not None:
            ds = ds * (1.0 - capped_tanh * capped_tanh)
        return dq_acc + matmul(ds.astype(k.dtype), k)

    dq = lax.fori_loop(
        0, kv_counts_ref[...], visit_kv_block, jnp.zeros(dq_ref.shape, jnp.float32)
    )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_indices_ref, q_counts_ref, q_full_ref,
    *refs, operand_counts, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, kv block): this head's dK, dV over the kv block's q list.

    Refs: q, do [Tp, D]; k, v [block_kv, D]; lse, delta [Tp]; q_indices, q_full [max_q];
    q_counts []; mask rows [Tp], mask columns [block_kv], mask scalars []; outputs dk, dv
    [block_kv, D].
    """
    mask_refs, (dk_ref, dv_ref) = _split_mask_refs(refs, operand_counts)
    batch, head, kv_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    scalars = _load_scalars(mask_refs)
    k, v = k_ref[...], v_ref[...]

    def visit_q_block(step, carry):
        dk_acc, dv_acc = carry
        q_block = q_indices_ref[step]
        q_slice = pl.ds(q_block * block_q, block_q)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        visible_fn = _make_visible_fn(
            element_mask, mask_refs, scalars, batch, head, row_slice=q_slice, column_slice=...
        )
        s, capped_tanh = _tile_scores(
            q, k, is_full=q_full_ref[step], visible_fn=visible_fn, q_start=q_block * block_q,
            kv_start=kv_block * block_kv, scale=scale, softcap=softcap,
        )
        p = jnp.exp(s - finite_or_zero(lse_ref[q_slice])[:, None])
        dv_acc = dv_acc + matmul(p.astype(do.dtype), do, transpose_a=True)
        dp = matmul(do, v, transpose_b=True)
        ds = p * (dp - delta_ref[q_slice][:, None])
        if capped_tanh is not None:
            ds = ds * (1.0 - capped_tanh * capped_tanh)
        dk_acc = dk_acc + matmul(ds.astype(q.dtype), q, transpose_a=True)
        return dk_acc, dv_acc

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_counts_ref[...], visit_q_block, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _compiler_params(head_dim, num_warps, num_stages):
    """Triton launch settings; ignored in interpret mode."""
    return compat.TritonCompilerParams(
        num_warps=(4 if head_dim <= 64 else 8) if num_warps is None else num_warps,
        num_stages=2 if num_stages is None else num_stages,
    )


def block_sparse_attention_forward(
    q, k, v, kv_indices, kv_counts, kv_full, mask_operands: MaskOperands, *,
    element_mask: ElementMask, scale: float, softcap: float | None, block_q: int, block_kv: int,
    interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None,
):
    """Block-sparse attention forward: output and row logsumexp.

    Equivalent to, per (b, h) with g = h // (H // K) and ``visible`` the block pattern refined by
    ``element_mask`` in partial tiles::

        s = scale * q[b, h] @ k[b, g].T;  s = softcap * tanh(s / softcap) if softcap
        s = where(visible, s, -inf);  lse = logsumexp(s, -1);  o = softmax(s) @ v[b, g]

    with o = 0 and lse = -inf on rows where nothing is visible.

    Args:
      q: [B, H, Tp, D] float32 or bfloat16.
      k, v: [B, K, Sp, D], same dtype as q; H % K == 0.
      kv_indices: int32 [Bm, Hm, nq, max_kv]; row (b, h, i) lists, increasing, the kv blocks that
        q block i visits; entries past ``kv_counts`` are ignored.
      kv_counts: int32 [Bm, Hm, nq], the valid length of each row.
      kv_full: int32 [Bm, Hm, nq, max_kv]; 1 if the tile is entirely visible, 0 if partial.
      mask_operands: ``(row_operands, column_operands, scalar_operands)``, tuples (any may be
        empty) of int32 arrays: rows [Bo, Tp] (one value per query position, already padded),
        columns [Bo, Sp] (one value per key position), scalars [Bo] (one value per sequence);
        Bo in {1, B}, and Bo == 1 broadcasts over the batch.
      element_mask: ``element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx) ->
        bool [block_q, block_kv]``: row_tiles a tuple of int32 [block_q, 1] (each row operand's
        values at the tile's queries, for batch b or row 0 when Bo == 1), column_tiles a tuple of
        int32 [1, block_kv] (likewise at the tile's keys), scalars a tuple of int32 scalars
        (entry b, or 0 when Bo == 1), b, h int32 scalars, q_idx int32 [block_q, 1] and kv_idx
        int32 [1, block_kv] absolute positions. Called in partial tiles only; it must also hide
        padded keys. On GPU it must not gather (elementwise operations only).
      scale: multiplies q.k.
      softcap: None or c > 0 for s -> c * tanh(s / c).
      block_q, block_kv: tile sizes (powers of two on GPU); Tp % block_q == Sp % block_kv == 0.
      interpret: run with the Pallas interpreter (CPU).
      num_warps, num_stages: Triton launch settings (defaults: 4 warps, 8 if D > 64; 2 stages).

    Returns:
      (o, lse): o [B, H, Tp, D] in q.dtype; lse [B, H, Tp] float32.

    Raises:
      ValueError, TypeError: on inconsistent shapes, dtypes or block sizes.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_inputs(q, k, v, block_q, block_kv)
    num_q_blocks, group = q_len // block_q, heads // kv_heads
    check_metadata("kv", kv_indices, kv_counts, kv_full, batch, heads, num_q_blocks)
    mask_groups = check_mask_operands(mask_operands, batch, q_len, kv_len)
    kernel = functools.partial(
        _forward_kernel, operand_counts=tuple(map(len, mask_groups)), element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    mask_block_specs = mask_specs(mask_groups, block_q=block_q, block_kv=block_kv, tile_rows=True)
    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // group, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_q_blocks),
        in_specs=[q_spec, kv_spec, kv_spec, *metadata_specs(kv_indices), *mask_block_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=_compiler_params(head_dim, num_warps, num_stages),
        interpret=interpret,
        name=FORWARD_NAME,
    )(q, k, v, kv_indices, kv_counts, kv_full, *(x for group in mask_groups for x in group))


def block_sparse_attention_backward(
    q, k, v, o, lse, do, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full,
    mask_operands: MaskOperands, *,
    element_mask: ElementMask, scale: float, softcap: float | None, block_q: int, block_kv: int,
    interpret: bool = False, num_warps: int | None = None, num_stages: int | None = None,
    delta: jax.Array | None = None,
):
    """Gradients of :func:`block_sparse_attention_forward`'s output o with respect to q, k, v.

    Two kernels: dQ on a (B, H, nq) grid looping over each q block's kv list, and dK/dV on a
    (B, H, nk) grid looping over each kv block's q list (per query head; the G = H // K query
    heads of a kv head are summed afterwards). With p = exp(s - lse) and
    delta = rowsum(do * o)::

        dv = p.T @ do;  ds = p * (do @ v.T - delta) * (1 - tanh(s_scaled / c)^2 if softcap)
        dq = scale * ds @ k;  dk = scale * ds.T @ q

    Args:
      q, k, v: as in the forward.
      o: [B, H, Tp, D] forward output; lse: [B, H, Tp] float32 forward logsumexp.
      do: [B, H, Tp, D] cotangent of o.
      kv_indices, kv_counts, kv_full: the forward's metadata.
      q_indices: int32 [Bm, Hm, nk, max_q]; row (b, h, j) lists, increasing, the q blocks that
        visit kv block j (the transpose of the kv lists).
      q_counts: int32 [Bm, Hm, nk]; q_full: int32 [Bm, Hm, nk, max_q].
      mask_operands, element_mask, scale, softcap, block_q, block_kv, interpret, num_warps,
        num_stages: as in the forward.
      delta: optional float32 [B, H, Tp] replacing rowsum(do * o); pass rowsum(do * o) - dlse to
        include the gradient of a loss that also depends on lse.

    Returns:
      (dq, dk, dv): dq [B, H, Tp, D] in q.dtype; dk, dv [B, K, Sp, D] in k.dtype.

    Raises:
      ValueError, TypeError: on inconsistent shapes, dtypes or block sizes.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = check_inputs(q, k, v, block_q, block_kv)
    num_q_blocks, num_kv_blocks, group = q_len // block_q, kv_len // block_kv, heads // kv_heads
    check_metadata("kv", kv_indices, kv_counts, kv_full, batch, heads, num_q_blocks)
    check_metadata("q", q_indices, q_counts, q_full, batch, heads, num_kv_blocks)
    if o.shape != q.shape or do.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"o and do must have shape {q.shape} and lse {q.shape[:3]}, "
            f"got {o.shape}, {do.shape}, {lse.shape}."
        )
    if delta is None:
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = delta.astype(jnp.float32)
    lse = lse.astype(jnp.float32)
    mask_groups = check_mask_operands(mask_operands, batch, q_len, kv_len)
    mask_arrays = tuple(x for group in mask_groups for x in group)
    static = dict(
        operand_counts=tuple(map(len, mask_groups)), element_mask=element_mask, scale=scale,
        softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    mask_sizes = dict(block_q=block_q, block_kv=block_kv)
    compiler_params = _compiler_params(head_dim, num_warps, num_stages)

    q_tile_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    row_tile_spec = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    kv_whole_spec = pl.BlockSpec(
        (None, None, kv_len, head_dim), lambda b, h, i: (b, h // group, 0, 0)
    )
    dq = pl.pallas_call(
        functools.partial(_backward_dq_kernel, **static),
        grid=(batch, heads, num_q_blocks),
        in_specs=[
            q_tile_spec, kv_whole_spec, kv_whole_spec, q_tile_spec, row_tile_spec, row_tile_spec,
            *metadata_specs(kv_indices), *mask_specs(mask_groups, tile_rows=True, **mask_sizes),
        ],
        out_specs=q_tile_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name=BACKWARD_DQ_NAME,
    )(q, k, v, do, lse, delta, kv_indices, kv_counts, kv_full, *mask_arrays)

    q_whole_spec = pl.BlockSpec((None, None, q_len, head_dim), lambda b, h, j: (b, h, 0, 0))
    row_whole_spec = pl.BlockSpec((None, None, q_len), lambda b, h, j: (b, h, 0))
    kv_tile_spec = pl.BlockSpec(
        (None, None, block_kv, head_dim), lambda b, h, j: (b, h // group, j, 0)
    )
    per_head_spec = pl.BlockSpec((None, None, block_kv, head_dim), lambda b, h, j: (b, h, j, 0))
    # Per-query-head partial gradients, kept in float32 when G > 1 until the group sum.
    per_head_dtype = k.dtype if group == 1 else jnp.float32
    per_head_shape = jax.ShapeDtypeStruct((batch, heads, kv_len, head_dim), per_head_dtype)
    dk, dv = pl.pallas_call(
        functools.partial(_backward_dkv_kernel, **static),
        grid=(batch, heads, num_kv_blocks),
        in_specs=[
            q_whole_spec, kv_tile_spec, kv_tile_spec, q_whole_spec, row_whole_spec, row_whole_spec,
            *metadata_specs(q_indices), *mask_specs(mask_groups, tile_rows=False, **mask_sizes),
        ],
        out_specs=[per_head_spec, per_head_spec],
        out_shape=[per_head_shape, per_head_shape],
        compiler_params=compiler_params,
        interpret=interpret,
        name=BACKWARD_DKV_NAME,
    )(q, k, v, do, lse, delta, q_indices, q_counts, q_full, *mask_arrays)
    if group > 1:
        dk = dk.reshape(batch, kv_heads, group, kv_len, head_dim).sum(axis=2).astype(k.dtype)
        dv = dv.reshape(batch, kv_heads, group, kv_len, head_dim).sum(axis=2).astype(k.dtype)
    return dq, dk, dv
