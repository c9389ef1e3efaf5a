"""Block-sparse flash attention for TPU (Mosaic), forward and backward.

Each query block visits only the key/value blocks listed for it in block metadata, delivered by
scalar prefetch so that the K/V ``BlockSpec`` index maps read the list: a padding step repeats the
previous block index, so it costs no DMA, and its compute is skipped under ``pl.when``. Tiles
flagged full skip the element mask; partial tiles call ``element_mask``. The online softmax
(FlashAttention, Dao et al. 2022) keeps its statistics in float32 VMEM scratch.

The arrays a mask reads reach the kernels as per-tile operands, as splash attention delivers its
segment ids: row operands (one value per query position) through BlockSpecs that follow the q
block, column operands (one value per key position) through the same scalar-prefetched index map
as K/V, and per-sequence scalars in SMEM. ``element_mask`` thus never gathers, which Mosaic cannot
lower.

Kernels:
  ``jaxsparse_block_sparse_attention_fwd``      grid (B, H, nq, max_kv): o and logsumexp.
  ``jaxsparse_block_sparse_attention_bwd_dq``   grid (B, H, nq, max_kv): dq.
  ``jaxsparse_block_sparse_attention_bwd_dkv``  grid (B, K, nk, G * max_q): dk and dv, iterating the
      transposed (per kv block) lists of all G query heads that share a kv head, so the group sum
      happens in the float32 accumulator and dk/dv are written once, in k.dtype.

Row statistics (logsumexp and delta = rowsum(do * o)) travel between kernels as [B, H, Tp, 1]
float32 columns, so a tile loads them as a [block_q, 1] column without a transpose.

A row with no visible key gives o = 0, lse = -inf and zero gradients: exponentials are shifted by a
max (or lse) that is replaced by 0 when it is -inf, so masked logits (-inf) always give p = 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.tiles import finite_or_zero, matmul
from pallas_kernels.tpu import online_softmax
from pallas_kernels.tpu.block_sparse_layout import (
    ListLayout,
    MaskOperandLayout,
    MaskOperands,
    check_inputs,
    flat_metadata,
)

FORWARD_NAME = "jaxsparse_block_sparse_attention_fwd"
BACKWARD_DQ_NAME = "jaxsparse_block_sparse_attention_bwd_dq"
BACKWARD_DKV_NAME = "jaxsparse_block_sparse_attention_bwd_dkv"


ElementMask = Callable[..., jax.Array]


def _tile_visibility(
    element_mask, operand_layout, operand_refs, b, h, q_block, kv_block, block_q, block_kv
):
    """Calls ``element_mask`` on one tile: bool [block_q, block_kv].

    The operand refs hold the tiles of the current q block and kv block (delivered by BlockSpecs);
    q_idx and kv_idx are absolute positions.
    """
    row_tiles, column_tiles, scalars = operand_layout.load(operand_refs, b)
    q_idx = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    kv_idx = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    return element_mask(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx)


def _tile_gradients(q, k, v, do, lse, delta, visible, *, scale, softcap):
    """Attention probabilities and scaled logit gradients of one tile.

    Args:
      q, do: [block_q, D] in the input dtype.
      k, v: [block_kv, D] in the input dtype.
      lse, delta: [block_q, 1] float32.
      visible: bool [block_q, block_kv], or None for a full tile.

    Returns:
      (p, ds), both [block_q, block_kv] float32, with ds = d loss / d (q k^T) (scale included), so
      dq = ds @ k and dk = ds^T @ q.
    """
    logits, softcap_grad = online_softmax.tile_logits(q, k, scale=scale, softcap=softcap)
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)
    p = jnp.exp(logits - finite_or_zero(lse))
    dp = matmul(do, v, transpose_b=True)
    ds = p * (dp - delta)
    if softcap_grad is not None:
        ds = ds * softcap_grad
    return p, ds * scale


def _visit_listed_tile(visit, count, full_flag, step):
    """Runs ``visit(apply_mask)`` for a valid list entry; full tiles skip the element mask."""
    listed = step < count
    is_full = full_flag != 0
    pl.when(jnp.logical_and(listed, is_full))(lambda: visit(False))
    pl.when(jnp.logical_and(listed, jnp.logical_not(is_full)))(lambda: visit(True))


def _forward_kernel(
    kv_indices_ref, kv_counts_ref, kv_full_ref, q_ref, k_ref, v_ref, *refs,
    layout, operand_layout, element_mask, scale, softcap, block_q, block_kv,
):
    num_operands = operand_layout.num_inputs
    operand_refs = refs[:num_operands]
    o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs[num_operands:]
    b, h, q_block, step = (pl.program_id(axis) for axis in range(4))
    entry = layout.entry_offset(b, h, q_block, step)

    pl.when(step == 0)(lambda: online_softmax.init(max_ref, sum_ref, acc_ref))

    def visit(apply_mask):
        logits, _ = online_softmax.tile_logits(q_ref[...], k_ref[...], scale=scale, softcap=softcap)
        if apply_mask:
            visible = _tile_visibility(
                element_mask, operand_layout, operand_refs, b, h, q_block, kv_indices_ref[entry],
                block_q, block_kv,
            )
            logits = jnp.where(visible, logits, -jnp.inf)
        online_softmax.accumulate(logits, v_ref[...], max_ref, sum_ref, acc_ref)

    count = kv_counts_ref[layout.count_offset(b, h, q_block)]
    _visit_listed_tile(visit, count, kv_full_ref[entry], step)

    pl.when(step == pl.num_programs(3) - 1)(
        lambda: online_softmax.finalise(max_ref, sum_ref, acc_ref, o_ref, lse_ref))


def _backward_dq_kernel(
    kv_indices_ref, kv_counts_ref, kv_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    layout, operand_layout, element_mask, scale, softcap, block_q, block_kv,
):
    num_operands = operand_layout.num_inputs
    operand_refs = refs[:num_operands]
    dq_ref, dq_acc_ref = refs[num_operands:]
    b, h, q_block, step = (pl.program_id(axis) for axis in range(4))
    entry = layout.entry_offset(b, h, q_block, step)

    @pl.when(step == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    def visit(apply_mask):
        k = k_ref[...]
        visible = None
        if apply_mask:
            visible = _tile_visibility(
                element_mask, operand_layout, operand_refs, b, h, q_block, kv_indices_ref[entry],
                block_q, block_kv,
            )
        _, ds = _tile_gradients(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], visible,
            scale=scale, softcap=softcap,
        )
        dq_acc_ref[...] += matmul(ds.astype(k.dtype), k)

    count = kv_counts_ref[layout.count_offset(b, h, q_block)]
    _visit_listed_tile(visit, count, kv_full_ref[entry], step)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finalise():
        dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _backward_dkv_kernel(
    q_indices_ref, q_counts_ref, q_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    layout, operand_layout, element_mask, scale, softcap, block_q, block_kv, group_size,
):
    num_operands = operand_layout.num_inputs
    operand_refs = refs[:num_operands]
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[num_operands:]
    b, kv_head, kv_block, step = (pl.program_id(axis) for axis in range(4))
    h, list_step = _query_head_and_list_step(kv_head, step, group_size, layout.width)
    entry = layout.entry_offset(b, h, kv_block, list_step)

    @pl.when(step == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    def visit(apply_mask):
        q, do = q_ref[...], do_ref[...]
        visible = None
        if apply_mask:
            visible = _tile_visibility(
                element_mask, operand_layout, operand_refs, b, h, q_indices_ref[entry], kv_block,
                block_q, block_kv,
            )
        p, ds = _tile_gradients(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], visible,
            scale=scale, softcap=softcap,
        )
        dv_acc_ref[...] += matmul(p.T.astype(do.dtype), do)
        dk_acc_ref[...] += matmul(ds.T.astype(q.dtype), q)

    count = q_counts_ref[layout.count_offset(b, h, kv_block)]
    _visit_listed_tile(visit, count, q_full_ref[entry], list_step)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finalise():
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _query_head_and_list_step(kv_head, step, group_size, width):
    """Splits a dkv grid step into (query head, entry in that head's list)."""
    return kv_head * group_size + step // width, step % width


def _query_block_index_map(b, h, i, step, *_):
    """Blocks of q, o, do, dq and the row statistics on the (B, H, nq, max_kv) grid."""
    return b, h, i, 0


def _listed_kv_block_index_map(layout: ListLayout, group_size: int):
    """K/V blocks on the (B, H, nq, max_kv) grid: entry ``step`` of the kv list of (b, h, i)."""

    def index_map(b, h, i, step, kv_indices_ref, *_):
        return b, h // group_size, kv_indices_ref[layout.entry_offset(b, h, i, step)], 0

    return index_map


def _compiler_params():
    return compat.TPUCompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )


def block_sparse_attention_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    kv_full: jax.Array,
    mask_operands: MaskOperands,
    *,
    element_mask: ElementMask,
    scale: float,
    softcap: float | None,
    block_q: int,
    block_kv: int,
    interpret: bool | compat.TPUInterpretParams = False,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward: o = softmax(mask(cap(scale * q k^T))) v, and its logsumexp.

    Args:
      q: [B, H, Tp, D] float32 or bfloat16; Tp a multiple of block_q.
      k, v: [B, K, Sp, D], same dtype as q; H a multiple of K, Sp a multiple of block_kv. Query head
        h reads kv head h // (H // K).
      kv_indices: int32 [Bm, Hm, nq, max_kv], Bm in {1, B}, Hm in {1, H}: increasing kv block
        indices per q block; entries past the count repeat the last valid one (0 if none).
      kv_counts: int32 [Bm, Hm, nq]: number of valid entries per row.
      kv_full: int32 [Bm, Hm, nq, max_kv]: 1 where the whole tile is visible (no element mask).
      mask_operands: (row_operands, column_operands, scalar_operands), each a tuple (possibly
        empty) of int32 arrays (other integer or bool dtypes are converted), Bo in {1, B}; Bo == 1
        broadcasts over batch:
        row_operands: [Bo, Tp], one value per query position (already padded to Tp);
        column_operands: [Bo, Sp], one value per key position;
        scalar_operands: [Bo], one value per sequence.
        Row and column tiles reach the kernel through BlockSpecs that follow the q block and the
        listed kv block (no gather), so ``element_mask`` lowers to Mosaic.
      element_mask: ``(row_tiles, column_tiles, scalars, b, h, q_idx, kv_idx) -> bool
        [block_q, block_kv]``, evaluated in partial tiles only: row_tiles is a tuple of int32
        [block_q, 1] (the current q tile of each row operand, batch b or row 0), column_tiles a
        tuple of int32 [1, block_kv] (the current kv tile of each column operand), scalars a tuple
        of int32 scalars (entry b, or 0), b and h int32 scalars, q_idx int32 [block_q, 1] and
        kv_idx int32 [1, block_kv] absolute positions.
      scale: multiplies q.k.
      softcap: None, or c: logits s become c * tanh(s / c) (after scaling, before masking).
      block_q, block_kv: tile sizes. To compile for TPU, block_q must be a multiple of 8 and, with
        column operands, block_kv a multiple of 128 (or the full length).
      interpret: True (or ``pltpu.InterpretParams``) to run in the TPU interpreter on CPU.

    Returns:
      (o [B, H, Tp, D] in q.dtype, lse [B, H, Tp] float32). Rows with no visible key give o = 0 and
      lse = -inf.

    Raises:
      ValueError / TypeError: on inconsistent shapes, dtypes, tilings or metadata.
    """
    batch, num_heads, num_kv_heads, q_len, _, head_dim = check_inputs(q, k, v, block_q, block_kv)
    group_size = num_heads // num_kv_heads
    num_q_blocks = q_len // block_q
    kv_indices, kv_counts, kv_full, layout = flat_metadata(
        kv_indices, kv_counts, kv_full, batch=batch, num_heads=num_heads, rows=num_q_blocks,
        name="kv",
    )
    operand_layout, operand_inputs = MaskOperandLayout.check(
        mask_operands, batch=batch, q_len=q_len, kv_len=k.shape[2]
    )

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), _query_block_index_map)
    kv_spec = pl.BlockSpec(
        (None, None, block_kv, head_dim), _listed_kv_block_index_map(layout, group_size)
    )
    kernel = functools.partial(
        _forward_kernel, layout=layout, operand_layout=operand_layout, element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    o, lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32),
        ],
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_heads, num_q_blocks, layout.width),
            in_specs=[
                q_spec, kv_spec, kv_spec,
                *operand_layout.specs(
                    q_spec.index_map, kv_spec.index_map, block_q=block_q, block_kv=block_kv
                ),
            ],
            out_specs=[q_spec, pl.BlockSpec((None, None, block_q, 1), _query_block_index_map)],
            scratch_shapes=[
                compat.VMEM((block_q, 1), jnp.float32),
                compat.VMEM((block_q, 1), jnp.float32),
                compat.VMEM((block_q, head_dim), jnp.float32),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=compat.tpu_interpret_value(interpret),
        name=FORWARD_NAME,
    )(kv_indices, kv_counts, kv_full, q, k, v, *operand_inputs)
    return o, lse[..., 0]


def block_sparse_attention_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    o: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    kv_indices: jax.Array,
    kv_counts: jax.Array,
    kv_full: jax.Array,
    q_indices: jax.Array,
    q_counts: jax.Array,
    q_full: jax.Array,
    mask_operands: MaskOperands,
    *,
    element_mask: ElementMask,
    scale: float,
    softcap: float | None,
    block_q: int,
    block_kv: int,
    interpret: bool | compat.TPUInterpretParams = False,
    delta: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of :func:`block_sparse_attention_forward`'s o with respect to q, k and v.

    With p = exp(s - lse) and delta = rowsum(do * o): dv = p^T do, ds = p * (do v^T - delta) (times
    1 - tanh^2 under a soft cap), dq = scale * ds k, dk = scale * ds^T q, dk and dv summed over the
    G = H // K query heads of each kv head.

    Args:
      q, k, v, kv_indices, kv_counts, kv_full, mask_operands: as for the forward (in the dk/dv
        kernel, row tiles follow the listed q block and column tiles the kv block).
      o: [B, H, Tp, D], the forward output.
      lse: [B, H, Tp] float32, the forward logsumexp.
      do: [B, H, Tp, D], the cotangent of o.
      q_indices: int32 [Bm, Hm, nk, max_q]: for each kv block, the q blocks that visit it (same
        conventions as kv_indices).
      q_counts: int32 [Bm, Hm, nk].
      q_full: int32 [Bm, Hm, nk, max_q].
      element_mask, scale, softcap, block_q, block_kv, interpret: as for the forward.
      delta: optional float32 [B, H, Tp] replacing rowsum(do * o); pass rowsum(do * o) - dlse to
        include the gradient of a loss that also depends on lse.

    Returns:
      (dq [B, H, Tp, D] in q.dtype, dk [B, K, Sp, D] in k.dtype, dv [B, K, Sp, D] in k.dtype). Rows
      with no visible key contribute zero.

    Raises:
      ValueError / TypeError: on inconsistent shapes, dtypes, tilings or metadata.
    """
    batch, num_heads, num_kv_heads, q_len, kv_len, head_dim = check_inputs(
        q, k, v, block_q, block_kv
    )
    group_size = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // block_q, kv_len // block_kv
    kv_metadata = flat_metadata(
        kv_indices, kv_counts, kv_full, batch=batch, num_heads=num_heads, rows=num_q_blocks,
        name="kv",
    )
    q_metadata = flat_metadata(
        q_indices, q_counts, q_full, batch=batch, num_heads=num_heads, rows=num_kv_blocks,
        name="q",
    )
    operand_layout, operand_inputs = MaskOperandLayout.check(
        mask_operands, batch=batch, q_len=q_len, kv_len=kv_len
    )
    lse = lse.astype(jnp.float32)[..., None]
    if delta is None:
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = delta.astype(jnp.float32)[..., None]
    common = dict(
        operand_layout=operand_layout, element_mask=element_mask, scale=scale, softcap=softcap,
        block_q=block_q, block_kv=block_kv,
    )
    dq = _backward_dq(
        q, k, v, do, lse, delta, kv_metadata, operand_inputs, group_size=group_size,
        interpret=interpret, **common,
    )
    dk, dv = _backward_dkv(
        q, k, v, do, lse, delta, q_metadata, operand_inputs, group_size=group_size,
        interpret=interpret, **common,
    )
    return dq, dk, dv


def _backward_dq(
    q, k, v, do, lse, delta, kv_metadata, operand_inputs, *,
    group_size, operand_layout, element_mask, scale, softcap, block_q, block_kv, interpret,
):
    """dq kernel call: grid (B, H, nq, max_kv) over the kv lists; lse, delta: [B, H, Tp, 1]."""
    kv_indices, kv_counts, kv_full, layout = kv_metadata
    batch, num_heads, q_len, head_dim = q.shape

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), _query_block_index_map)
    kv_spec = pl.BlockSpec(
        (None, None, block_kv, head_dim), _listed_kv_block_index_map(layout, group_size)
    )
    row_spec = pl.BlockSpec((None, None, block_q, 1), _query_block_index_map)
    kernel = functools.partial(
        _backward_dq_kernel, layout=layout, operand_layout=operand_layout,
        element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_heads, q_len // block_q, layout.width),
            in_specs=[
                q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *operand_layout.specs(
                    q_spec.index_map, kv_spec.index_map, block_q=block_q, block_kv=block_kv
                ),
            ],
            out_specs=q_spec,
            scratch_shapes=[compat.VMEM((block_q, head_dim), jnp.float32)],
        ),
        compiler_params=_compiler_params(),
        interpret=compat.tpu_interpret_value(interpret),
        name=BACKWARD_DQ_NAME,
    )(kv_indices, kv_counts, kv_full, q, k, v, do, lse, delta, *operand_inputs)


def _backward_dkv(
    q, k, v, do, lse, delta, q_metadata, operand_inputs, *,
    group_size, operand_layout, element_mask, scale, softcap, block_q, block_kv, interpret,
):
    """dk/dv kernel call: grid (B, K, nk, G * max_q) over the q lists of the G heads per kv head."""
    q_indices, q_counts, q_full, layout = q_metadata
    batch, num_kv_heads, kv_len, head_dim = k.shape

    def q_index_map(b, kv_head, j, step, indices_ref, *_):
        h, list_step = _query_head_and_list_step(kv_head, step, group_size, layout.width)
        return b, h, indices_ref[layout.entry_offset(b, h, j, list_step)], 0

    def kv_index_map(b, kv_head, j, step, *_):
        return b, kv_head, j, 0

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), q_index_map)
    row_spec = pl.BlockSpec((None, None, block_q, 1), q_index_map)
    kv_spec = pl.BlockSpec((None, None, block_kv, head_dim), kv_index_map)
    kernel = functools.partial(
        _backward_dkv_kernel, layout=layout, operand_layout=operand_layout,
        element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv, group_size=group_size,
    )
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_kv_heads, kv_len // block_kv, group_size * layout.width),
            in_specs=[
                q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *operand_layout.specs(
                    q_spec.index_map, kv_spec.index_map, block_q=block_q, block_kv=block_kv
                ),
            ],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[
                compat.VMEM((block_kv, head_dim), jnp.float32),
                compat.VMEM((block_kv, head_dim), jnp.float32),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=compat.tpu_interpret_value(interpret),
        name=BACKWARD_DKV_NAME,
    )(q_indices, q_counts, q_full, q, k, v, do, lse, delta, *operand_inputs)
