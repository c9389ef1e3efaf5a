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

Triton notes: block sizes and head dims must be powers of two (>= 16 for ``tl.dot``); the loops
have data-dependent trip counts but no Python-level data-dependent control flow. Each mask leaf is
loaded whole, so on a real GPU its size must be a power of two, and ``element_mask`` must avoid
gathers (the Triton lowering has no ``gather``): arithmetic on q_idx / kv_idx and scalar leaves
lowers, ``seg[b, q_idx]`` does not (it runs in interpret mode only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat

FORWARD_NAME = "jaxsparse_block_sparse_attention_fwd"
BACKWARD_DQ_NAME = "jaxsparse_block_sparse_attention_bwd_dq"
BACKWARD_DKV_NAME = "jaxsparse_block_sparse_attention_bwd_dkv"

ElementMask = Callable[..., jax.Array]


# ----------------------------------------------------------------------------------------------
# Tile math shared by the three kernels.


def _matmul(a, b, *, transpose_a=False, transpose_b=False):
    """Returns ``op(a) @ op(b)`` for 2-D tiles, in the inputs' dtype with float32 accumulation."""
    contract_a = 0 if transpose_a else 1
    contract_b = 1 if transpose_b else 0
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
    )


def _zero_if_infinite(x):
    """Replaces -inf row statistics by 0 so that ``exp(s - x)`` is 0 (not NaN) for s = -inf."""
    return jnp.where(jnp.isneginf(x), 0.0, x)


def _tile_scores(q, k, *, is_full, mask_args, q_start, kv_start, scale, softcap, element_mask):
    """Scaled, soft-capped and masked scores of one tile.

    Args:
      q: [block_q, D] query tile.
      k: [block_kv, D] key tile.
      is_full: int32 scalar; nonzero means every element of the tile is visible.
      mask_args: (leaves, b, h) forwarded to ``element_mask``.
      q_start: int32 scalar, absolute position of the tile's first query.
      kv_start: int32 scalar, absolute position of the tile's first key.
      scale: multiplies q.k.
      softcap: None or the cap c.
      element_mask: see :func:`block_sparse_attention_forward`.

    Returns:
      (s, capped_tanh): s float32 [block_q, block_kv] with -inf where invisible; capped_tanh is
      tanh(scale * q.k / c) (needed by the backward) or None without softcap.
    """
    block_q, block_kv = q.shape[0], k.shape[0]
    s = _matmul(q, k, transpose_b=True) * scale
    capped_tanh = None
    if softcap is not None:
        capped_tanh = jnp.tanh(s / softcap)
        s = softcap * capped_tanh

    def apply_element_mask(scores):
        leaves, b, h = mask_args
        q_idx = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        kv_idx = kv_start + jnp.arange(block_kv, dtype=jnp.int32)[None, :]
        visible = element_mask(leaves, b, h, q_idx, kv_idx)
        return jnp.where(visible, scores, -jnp.inf)

    s = lax.cond(is_full != 0, lambda scores: scores, apply_element_mask, s)
    return s, capped_tanh


def _load_leaves(leaf_refs, leaf_shapes):
    """Loads the mask leaves and restores their shapes (0-d leaves travel as shape (1,))."""
    return tuple(ref[...].reshape(shape) for ref, shape in zip(leaf_refs, leaf_shapes))


# ----------------------------------------------------------------------------------------------
# Kernels.


def _forward_kernel(
    q_ref, k_ref, v_ref, kv_indices_ref, kv_counts_ref, kv_full_ref, *refs,
    leaf_shapes, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, q block): online softmax over the q block's kv list.

    Refs: q [block_q, D]; k, v [Sp, D]; kv_indices, kv_full [max_kv]; kv_counts []; the mask
    leaves; outputs o [block_q, D] and lse [block_q].
    """
    leaf_refs, (o_ref, lse_ref) = refs[: len(leaf_shapes)], refs[len(leaf_shapes):]
    batch, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mask_args = (_load_leaves(leaf_refs, leaf_shapes), batch, head)
    q = q_ref[...]

    def visit_kv_block(step, carry):
        acc, row_max, row_sum = carry
        kv_block = kv_indices_ref[step]
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        s, _ = _tile_scores(
            q, k_ref[kv_slice, :], is_full=kv_full_ref[step], mask_args=mask_args,
            q_start=q_block * block_q, kv_start=kv_block * block_kv, scale=scale,
            softcap=softcap, element_mask=element_mask,
        )
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        shift = _zero_if_infinite(new_max)
        correction = jnp.exp(row_max - shift)
        p = jnp.exp(s - shift[:, None])
        v = v_ref[kv_slice, :]
        acc = correction[:, None] * acc + _matmul(p.astype(v.dtype), v)
        row_sum = correction * row_sum + jnp.sum(p, axis=1)
        return acc, new_max, row_sum

    init = (
        jnp.zeros(o_ref.shape, jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, row_max, row_sum = lax.fori_loop(0, kv_counts_ref[...], visit_kv_block, init)
    # Empty rows have row_sum == 0 and row_max == -inf: o = 0 and lse = -inf + log(1) = -inf.
    safe_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / safe_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = row_max + jnp.log(safe_sum)


def _backward_dq_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kv_indices_ref, kv_counts_ref, kv_full_ref,
    *refs, leaf_shapes, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, q block): dQ accumulated over the q block's kv list.

    Refs: q, do [block_q, D]; k, v [Sp, D]; lse, delta [block_q]; kv_indices, kv_full [max_kv];
    kv_counts []; the mask leaves; output dq [block_q, D].
    """
    leaf_refs, (dq_ref,) = refs[: len(leaf_shapes)], refs[len(leaf_shapes):]
    batch, head, q_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mask_args = (_load_leaves(leaf_refs, leaf_shapes), batch, head)
    q, do = q_ref[...], do_ref[...]
    lse_shift = _zero_if_infinite(lse_ref[...])[:, None]
    delta = delta_ref[...][:, None]

    def visit_kv_block(step, dq_acc):
        kv_block = kv_indices_ref[step]
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        k = k_ref[kv_slice, :]
        s, capped_tanh = _tile_scores(
            q, k, is_full=kv_full_ref[step], mask_args=mask_args, q_start=q_block * block_q,
            kv_start=kv_block * block_kv, scale=scale, softcap=softcap, element_mask=element_mask,
        )
        p = jnp.exp(s - lse_shift)
        dp = _matmul(do, v_ref[kv_slice, :], transpose_b=True)
        ds = p * (dp - delta)
        if capped_tanh is not None:
            ds = ds * (1.0 - capped_tanh * capped_tanh)
        return dq_acc + _matmul(ds.astype(k.dtype), k)

    dq = lax.fori_loop(
        0, kv_counts_ref[...], visit_kv_block, jnp.zeros(dq_ref.shape, jnp.float32)
    )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _backward_dkv_kernel(
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_indices_ref, q_counts_ref, q_full_ref,
    *refs, leaf_shapes, element_mask, scale, softcap, block_q, block_kv,
):
    """One (batch, query head, kv block): this head's dK, dV over the kv block's q list.

    Refs: q, do [Tp, D]; k, v [block_kv, D]; lse, delta [Tp]; q_indices, q_full [max_q];
    q_counts []; the mask leaves; outputs dk, dv [block_kv, D].
    """
    leaf_refs, (dk_ref, dv_ref) = refs[: len(leaf_shapes)], refs[len(leaf_shapes):]
    batch, head, kv_block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mask_args = (_load_leaves(leaf_refs, leaf_shapes), batch, head)
    k, v = k_ref[...], v_ref[...]

    def visit_q_block(step, carry):
        dk_acc, dv_acc = carry
        q_block = q_indices_ref[step]
        q_slice = pl.ds(q_block * block_q, block_q)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        s, capped_tanh = _tile_scores(
            q, k, is_full=q_full_ref[step], mask_args=mask_args, q_start=q_block * block_q,
            kv_start=kv_block * block_kv, scale=scale, softcap=softcap, element_mask=element_mask,
        )
        p = jnp.exp(s - _zero_if_infinite(lse_ref[q_slice])[:, None])
        dv_acc = dv_acc + _matmul(p.astype(do.dtype), do, transpose_a=True)
        dp = _matmul(do, v, transpose_b=True)
        ds = p * (dp - delta_ref[q_slice][:, None])
        if capped_tanh is not None:
            ds = ds * (1.0 - capped_tanh * capped_tanh)
        dk_acc = dk_acc + _matmul(ds.astype(q.dtype), q, transpose_a=True)
        return dk_acc, dv_acc

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_counts_ref[...], visit_q_block, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers.


def _metadata_specs(indices):
    """BlockSpecs for one cell's (indices, count, full) rows, broadcasting size-1 metadata axes.

    The grid is (batch, query head, block); ``indices`` is [Bm, Hm, n_blocks, max_len] and the
    counts and flags share its leading axes.
    """
    broadcast_batch, broadcast_head = indices.shape[0] == 1, indices.shape[1] == 1

    def row(b, h, i):
        return (0 if broadcast_batch else b, 0 if broadcast_head else h, i)

    list_spec = pl.BlockSpec(
        (None, None, None, indices.shape[3]), lambda b, h, i: (*row(b, h, i), 0)
    )
    count_spec = pl.BlockSpec((None, None, None), row)
    return [list_spec, count_spec, list_spec]


def _origin(ndim, *grid_indices):
    """Index map of a whole-array block: always block (0, ..., 0)."""
    del grid_indices
    return (0,) * ndim


def _leaf_inputs(mask_leaves):
    """Mask leaves as whole-array pallas_call inputs: (arrays, specs, original shapes)."""
    leaves = tuple(jnp.asarray(leaf) for leaf in mask_leaves)
    arrays = tuple(leaf.reshape(1) if leaf.ndim == 0 else leaf for leaf in leaves)
    specs = [pl.BlockSpec(a.shape, functools.partial(_origin, a.ndim)) for a in arrays]
    return arrays, specs, tuple(leaf.shape for leaf in leaves)


def _compiler_params(head_dim, num_warps, num_stages):
    """Triton launch settings; ignored in interpret mode."""
    return compat.TritonCompilerParams(
        num_warps=(4 if head_dim <= 64 else 8) if num_warps is None else num_warps,
        num_stages=2 if num_stages is None else num_stages,
    )


def _check_metadata(name, indices, counts, full, batch, heads, num_blocks):
    """Validates one set of block lists ``{name}_indices``, ``{name}_counts``, ``{name}_full``."""
    for suffix, arr in (("indices", indices), ("counts", counts), ("full", full)):
        if arr.dtype != jnp.int32:
            raise TypeError(f"{name}_{suffix} must be int32, got {arr.dtype}.")
    if (
        indices.ndim != 4
        or indices.shape[0] not in (1, batch)
        or indices.shape[1] not in (1, heads)
        or indices.shape[2] != num_blocks
    ):
        raise ValueError(
            f"{name}_indices must have shape [1 or {batch}, 1 or {heads}, {num_blocks}, max_len], "
            f"got {indices.shape}."
        )
    if full.shape != indices.shape or counts.shape != indices.shape[:3]:
        raise ValueError(
            f"{name}_full must have shape {indices.shape} and {name}_counts {indices.shape[:3]}, "
            f"got {full.shape} and {counts.shape}."
        )


def _check_inputs(q, k, v, block_q, block_kv):
    """Validates shapes and dtypes; returns (B, H, K, Tp, Sp, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B, H, Tp, D] and k, v [B, K, Sp, D], got {q.shape}, {k.shape}, {v.shape}."
        )
    batch, heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape [{batch}, K, Sp, {head_dim}], got {k.shape}.")
    if heads % kv_heads:
        raise ValueError(f"query heads H={heads} must be a multiple of kv heads K={kv_heads}.")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            f"q, k, v must share dtype float32 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}."
        )
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(
            f"Tp={q_len} must be a multiple of block_q={block_q} and Sp={kv_len} of "
            f"block_kv={block_kv}."
        )
    return batch, heads, kv_heads, q_len, kv_len, head_dim


def block_sparse_attention_forward(
    q, k, v, kv_indices, kv_counts, kv_full, mask_leaves: Sequence[jax.Array], *,
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
      mask_leaves: arrays passed into the kernel as inputs and handed, loaded, to ``element_mask``.
      element_mask: ``element_mask(leaves, b, h, q_idx, kv_idx) -> bool [block_q, block_kv]`` with
        b, h int32 scalars, q_idx int32 [block_q, 1] and kv_idx int32 [1, block_kv] absolute
        positions; called in partial tiles only. It must also hide padded keys.
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
    batch, heads, kv_heads, q_len, kv_len, head_dim = _check_inputs(q, k, v, block_q, block_kv)
    num_q_blocks, group = q_len // block_q, heads // kv_heads
    _check_metadata("kv", kv_indices, kv_counts, kv_full, batch, heads, num_q_blocks)
    leaves, leaf_specs, leaf_shapes = _leaf_inputs(mask_leaves)
    kernel = functools.partial(
        _forward_kernel, leaf_shapes=leaf_shapes, element_mask=element_mask, scale=scale,
        softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // group, 0, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, heads, num_q_blocks),
        in_specs=[q_spec, kv_spec, kv_spec, *_metadata_specs(kv_indices), *leaf_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=_compiler_params(head_dim, num_warps, num_stages),
        interpret=interpret,
        name=FORWARD_NAME,
    )(q, k, v, kv_indices, kv_counts, kv_full, *leaves)


def block_sparse_attention_backward(
    q, k, v, o, lse, do, kv_indices, kv_counts, kv_full, q_indices, q_counts, q_full,
    mask_leaves: Sequence[jax.Array], *,
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
      mask_leaves, element_mask, scale, softcap, block_q, block_kv, interpret, num_warps,
        num_stages: as in the forward.
      delta: optional float32 [B, H, Tp] replacing rowsum(do * o); pass rowsum(do * o) - dlse to
        include the gradient of a loss that also depends on lse.

    Returns:
      (dq, dk, dv): dq [B, H, Tp, D] in q.dtype; dk, dv [B, K, Sp, D] in k.dtype.

    Raises:
      ValueError, TypeError: on inconsistent shapes, dtypes or block sizes.
    """
    batch, heads, kv_heads, q_len, kv_len, head_dim = _check_inputs(q, k, v, block_q, block_kv)
    num_q_blocks, num_kv_blocks, group = q_len // block_q, kv_len // block_kv, heads // kv_heads
    _check_metadata("kv", kv_indices, kv_counts, kv_full, batch, heads, num_q_blocks)
    _check_metadata("q", q_indices, q_counts, q_full, batch, heads, num_kv_blocks)
    if o.shape != q.shape or do.shape != q.shape or lse.shape != q.shape[:3]:
        raise ValueError(
            f"o and do must have shape {q.shape} and lse {q.shape[:3]}, "
            f"got {o.shape}, {do.shape}, {lse.shape}."
        )
    if delta is None:
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = delta.astype(jnp.float32)
    lse = lse.astype(jnp.float32)
    leaves, leaf_specs, leaf_shapes = _leaf_inputs(mask_leaves)
    static = dict(
        leaf_shapes=leaf_shapes, element_mask=element_mask, scale=scale, softcap=softcap,
        block_q=block_q, block_kv=block_kv,
    )
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
            *_metadata_specs(kv_indices), *leaf_specs,
        ],
        out_specs=q_tile_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=interpret,
        name=BACKWARD_DQ_NAME,
    )(q, k, v, do, lse, delta, kv_indices, kv_counts, kv_full, *leaves)

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
            *_metadata_specs(q_indices), *leaf_specs,
        ],
        out_specs=[per_head_spec, per_head_spec],
        out_shape=[per_head_shape, per_head_shape],
        compiler_params=compiler_params,
        interpret=interpret,
        name=BACKWARD_DKV_NAME,
    )(q, k, v, do, lse, delta, q_indices, q_counts, q_full, *leaves)
    if group > 1:
        dk = dk.reshape(batch, kv_heads, group, kv_len, head_dim).sum(axis=2).astype(k.dtype)
        dv = dv.reshape(batch, kv_heads, group, kv_len, head_dim).sum(axis=2).astype(k.dtype)
    return dq, dk, dv
