"""Block-sparse flash attention for TPU (Mosaic), forward and backward.

Each query block visits only the key/value blocks listed for it in block metadata, delivered by
scalar prefetch so that the K/V ``BlockSpec`` index maps read the list: a padding step repeats the
previous block index, so it costs no DMA, and its compute is skipped under ``pl.when``. Tiles
flagged full skip the element mask; partial tiles call ``element_mask``. The online softmax
(FlashAttention, Dao et al. 2022) keeps its statistics in float32 VMEM scratch.

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

import dataclasses
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

# dot_general dimension numbers: contract the last axes (A @ B.T), and the standard A @ B.
_CONTRACT_LAST = (((1,), (1,)), ((), ()))
_MATMUL = (((1,), (0,)), ((), ()))

ElementMask = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class _ListLayout:
    """Where the list of row ``row`` of (batch b, query head h) starts in flattened metadata.

    Metadata arrays are [Bm, Hm, rows, width] (lists) and [Bm, Hm, rows] (counts), flattened to 1-D
    for SMEM; a size-1 batch or head axis is broadcast.
    """

    broadcast_batch: bool
    broadcast_head: bool
    num_heads: int
    rows: int
    width: int

    @classmethod
    def from_counts(cls, counts: jax.Array, width: int) -> _ListLayout:
        batches, heads, rows = counts.shape
        return cls(batches == 1, heads == 1, heads, rows, width)

    def count_offset(self, b, h, row):
        """Offset of the count of row ``row`` of (b, h) in the flattened counts."""
        b = 0 if self.broadcast_batch else b
        h = 0 if self.broadcast_head else h
        return (b * self.num_heads + h) * self.rows + row

    def entry_offset(self, b, h, row, step):
        """Offset of list entry ``step`` of row ``row`` of (b, h) in flattened lists or flags."""
        return self.count_offset(b, h, row) * self.width + step


@dataclasses.dataclass(frozen=True)
class _MaskLeaves:
    """How ``mask_leaves`` enter a kernel and are restored for ``element_mask``.

    Mosaic has no 0-d or boolean memory: a 0-d leaf travels as shape (1,) in SMEM and is read back
    as a scalar; a boolean leaf travels as int32 and is converted back after loading.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[jnp.dtype, ...]

    @classmethod
    def of(cls, leaves: Sequence[jax.Array]) -> _MaskLeaves:
        leaves = [jnp.asarray(leaf) for leaf in leaves]
        return cls(tuple(leaf.shape for leaf in leaves), tuple(leaf.dtype for leaf in leaves))

    def kernel_inputs(self, leaves: Sequence[jax.Array]) -> list[jax.Array]:
        inputs = []
        for leaf, shape, dtype in zip(leaves, self.shapes, self.dtypes):
            leaf = jnp.asarray(leaf).reshape(shape or (1,))
            inputs.append(leaf.astype(jnp.int32) if dtype == jnp.bool_ else leaf)
        return inputs

    def specs(self) -> list[pl.BlockSpec]:
        """Whole-array specs: the block index never changes, so each leaf is copied in once."""
        specs = []
        for shape in self.shapes:
            if shape:
                specs.append(pl.BlockSpec(shape, functools.partial(_zeros_index_map, len(shape))))
            else:
                specs.append(pl.BlockSpec(memory_space=compat.SMEM))
        return specs

    def load(self, refs) -> tuple[jax.Array, ...]:
        values = []
        for ref, shape, dtype in zip(refs, self.shapes, self.dtypes):
            value = ref[...] if shape else ref[0]
            values.append(value.astype(dtype) if dtype == jnp.bool_ else value)
        return tuple(values)


def _zeros_index_map(ndim, *_):
    return (0,) * ndim


def _interpret_value(interpret):
    """Maps ``interpret=True`` to TPU interpreter parameters; passes parameters through."""
    if interpret is True:
        return compat.tpu_interpret_params()
    return interpret


def _finite_or_zero(x: jax.Array) -> jax.Array:
    """x with -inf replaced by 0: a safe shift for rows whose max (or lse) is -inf."""
    return jnp.where(x == -jnp.inf, 0.0, x)


def _tile_logits(q, k, *, scale, softcap):
    """Scaled (and soft-capped) logits of one tile.

    Args:
      q: [block_q, D] in the input dtype.
      k: [block_kv, D] in the input dtype.

    Returns:
      (logits [block_q, block_kv] float32, the soft cap's derivative d capped / d scaled logits
      [block_q, block_kv] float32, or None without a soft cap).
    """
    logits = lax.dot_general(q, k, _CONTRACT_LAST, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return logits, None
    capped = jnp.tanh(logits / softcap)
    return softcap * capped, 1.0 - capped * capped


def _tile_visibility(element_mask, leaves, b, h, q_block, kv_block, block_q, block_kv):
    """Calls ``element_mask`` with absolute positions of one tile: bool [block_q, block_kv]."""
    q_idx = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    kv_idx = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    return element_mask(leaves, b, h, q_idx, kv_idx)


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
    logits, softcap_grad = _tile_logits(q, k, scale=scale, softcap=softcap)
    if visible is not None:
        logits = jnp.where(visible, logits, -jnp.inf)
    p = jnp.exp(logits - _finite_or_zero(lse))
    dp = lax.dot_general(do, v, _CONTRACT_LAST, preferred_element_type=jnp.float32)
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
    layout, leaves_info, element_mask, scale, softcap, block_q, block_kv,
):
    num_leaves = len(leaves_info.shapes)
    leaf_refs = refs[:num_leaves]
    o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs[num_leaves:]
    b, h, q_block, step = (pl.program_id(axis) for axis in range(4))
    entry = layout.entry_offset(b, h, q_block, step)

    @pl.when(step == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, -jnp.inf, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def visit(apply_mask):
        v = v_ref[...]
        logits, _ = _tile_logits(q_ref[...], k_ref[...], scale=scale, softcap=softcap)
        if apply_mask:
            visible = _tile_visibility(
                element_mask, leaves_info.load(leaf_refs), b, h, q_block, kv_indices_ref[entry],
                block_q, block_kv,
            )
            logits = jnp.where(visible, logits, -jnp.inf)
        max_prev = max_ref[...]
        max_next = jnp.maximum(max_prev, logits.max(axis=1, keepdims=True))
        shift = _finite_or_zero(max_next)
        p = jnp.exp(logits - shift)
        rescale = jnp.exp(max_prev - shift)
        sum_ref[...] = rescale * sum_ref[...] + p.sum(axis=1, keepdims=True)
        acc_ref[...] = rescale * acc_ref[...] + lax.dot_general(
            p.astype(v.dtype), v, _MATMUL, preferred_element_type=jnp.float32
        )
        max_ref[...] = max_next

    count = kv_counts_ref[layout.count_offset(b, h, q_block)]
    _visit_listed_tile(visit, count, kv_full_ref[entry], step)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finalise():
        row_sum = sum_ref[...]
        has_keys = row_sum > 0.0
        safe_sum = jnp.where(has_keys, row_sum, 1.0)
        o_ref[...] = (acc_ref[...] / safe_sum).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(has_keys, max_ref[...] + jnp.log(safe_sum), -jnp.inf)


def _backward_dq_kernel(
    kv_indices_ref, kv_counts_ref, kv_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    layout, leaves_info, element_mask, scale, softcap, block_q, block_kv,
):
    num_leaves = len(leaves_info.shapes)
    leaf_refs = refs[:num_leaves]
    dq_ref, dq_acc_ref = refs[num_leaves:]
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
                element_mask, leaves_info.load(leaf_refs), b, h, q_block, kv_indices_ref[entry],
                block_q, block_kv,
            )
        _, ds = _tile_gradients(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], visible,
            scale=scale, softcap=softcap,
        )
        dq_acc_ref[...] += lax.dot_general(
            ds.astype(k.dtype), k, _MATMUL, preferred_element_type=jnp.float32
        )

    count = kv_counts_ref[layout.count_offset(b, h, q_block)]
    _visit_listed_tile(visit, count, kv_full_ref[entry], step)

    @pl.when(step == pl.num_programs(3) - 1)
    def _finalise():
        dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def _backward_dkv_kernel(
    q_indices_ref, q_counts_ref, q_full_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
    layout, leaves_info, element_mask, scale, softcap, block_q, block_kv, group_size,
):
    num_leaves = len(leaves_info.shapes)
    leaf_refs = refs[:num_leaves]
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[num_leaves:]
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
                element_mask, leaves_info.load(leaf_refs), b, h, q_indices_ref[entry], kv_block,
                block_q, block_kv,
            )
        p, ds = _tile_gradients(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], visible,
            scale=scale, softcap=softcap,
        )
        dv_acc_ref[...] += lax.dot_general(
            p.T.astype(do.dtype), do, _MATMUL, preferred_element_type=jnp.float32
        )
        dk_acc_ref[...] += lax.dot_general(
            ds.T.astype(q.dtype), q, _MATMUL, preferred_element_type=jnp.float32
        )

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


def _listed_kv_block_index_map(layout: _ListLayout, group_size: int):
    """K/V blocks on the (B, H, nq, max_kv) grid: entry ``step`` of the kv list of (b, h, i)."""

    def index_map(b, h, i, step, kv_indices_ref, *_):
        return b, h // group_size, kv_indices_ref[layout.entry_offset(b, h, i, step)], 0

    return index_map


def _check_inputs(q, k, v, block_q, block_kv):
    """Validates shapes and tiling; returns (B, H, K, Tp, Sp, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be rank 4 [B, H, Tp, D] / [B, K, Sp, D], got shapes "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    batch, num_heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k and v must both be [B={batch}, K, Sp, D={head_dim}], got {k.shape} and {v.shape}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"H={num_heads} must be a multiple of K={num_kv_heads}")
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(
            f"Tp={q_len} must be a multiple of block_q={block_q} and Sp={kv_len} a multiple of "
            f"block_kv={block_kv}"
        )
    return batch, num_heads, num_kv_heads, q_len, kv_len, head_dim


def _flat_metadata(indices, counts, full, *, batch, num_heads, rows, name):
    """Checks one metadata triple and flattens it to 1-D int32 for SMEM.

    A list width of 0 (nothing visible anywhere) is widened to 1 so that the grid is not empty and
    the outputs are still written.

    Returns:
      (flat indices, flat counts, flat full flags, layout).
    """
    if counts.ndim != 3 or counts.shape[2] != rows:
        raise ValueError(f"{name} counts must be [Bm, Hm, {rows}], got {counts.shape}")
    batches, heads = counts.shape[:2]
    if batches not in (1, batch) or heads not in (1, num_heads):
        raise ValueError(
            f"{name} metadata batch/head axes must be 1 or ({batch}, {num_heads}), got "
            f"({batches}, {heads})"
        )
    if indices.shape != full.shape or indices.shape[:3] != counts.shape:
        raise ValueError(
            f"{name} indices {indices.shape} and full flags {full.shape} must be "
            f"[{batches}, {heads}, {rows}, width]"
        )
    if indices.shape[3] == 0:
        widened = (*indices.shape[:3], 1)
        indices, full = jnp.zeros(widened, jnp.int32), jnp.zeros(widened, jnp.int32)
    layout = _ListLayout.from_counts(counts, width=indices.shape[3])
    flat = [jnp.ravel(x).astype(jnp.int32) for x in (indices, counts, full)]
    return (*flat, layout)


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
    mask_leaves: Sequence[jax.Array],
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
      mask_leaves: arrays that ``element_mask`` reads, passed into the kernel whole.
      element_mask: ``(leaves, b, h, q_idx [block_q, 1], kv_idx [1, block_kv]) -> bool
        [block_q, block_kv]``, evaluated in partial tiles only, with absolute positions.
      scale: multiplies q.k.
      softcap: None, or c: logits s become c * tanh(s / c) (after scaling, before masking).
      block_q, block_kv: tile sizes.
      interpret: True (or ``pltpu.InterpretParams``) to run in the TPU interpreter on CPU.

    Returns:
      (o [B, H, Tp, D] in q.dtype, lse [B, H, Tp] float32). Rows with no visible key give o = 0 and
      lse = -inf.

    Raises:
      ValueError / TypeError: on inconsistent shapes, dtypes, tilings or metadata.
    """
    batch, num_heads, num_kv_heads, q_len, _, head_dim = _check_inputs(q, k, v, block_q, block_kv)
    group_size = num_heads // num_kv_heads
    num_q_blocks = q_len // block_q
    kv_indices, kv_counts, kv_full, layout = _flat_metadata(
        kv_indices, kv_counts, kv_full, batch=batch, num_heads=num_heads, rows=num_q_blocks,
        name="kv",
    )
    leaves_info = _MaskLeaves.of(mask_leaves)

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), _query_block_index_map)
    kv_spec = pl.BlockSpec(
        (None, None, block_kv, head_dim), _listed_kv_block_index_map(layout, group_size)
    )
    kernel = functools.partial(
        _forward_kernel, layout=layout, leaves_info=leaves_info, element_mask=element_mask,
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
            in_specs=[q_spec, kv_spec, kv_spec, *leaves_info.specs()],
            out_specs=[q_spec, pl.BlockSpec((None, None, block_q, 1), _query_block_index_map)],
            scratch_shapes=[
                compat.VMEM((block_q, 1), jnp.float32),
                compat.VMEM((block_q, 1), jnp.float32),
                compat.VMEM((block_q, head_dim), jnp.float32),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=_interpret_value(interpret),
        name=FORWARD_NAME,
    )(kv_indices, kv_counts, kv_full, q, k, v, *leaves_info.kernel_inputs(mask_leaves))
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
    mask_leaves: Sequence[jax.Array],
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
      q, k, v, kv_indices, kv_counts, kv_full, mask_leaves: as for the forward.
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
    batch, num_heads, num_kv_heads, q_len, kv_len, head_dim = _check_inputs(
        q, k, v, block_q, block_kv
    )
    group_size = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // block_q, kv_len // block_kv
    kv_metadata = _flat_metadata(
        kv_indices, kv_counts, kv_full, batch=batch, num_heads=num_heads, rows=num_q_blocks,
        name="kv",
    )
    q_metadata = _flat_metadata(
        q_indices, q_counts, q_full, batch=batch, num_heads=num_heads, rows=num_kv_blocks,
        name="q",
    )
    leaves_info = _MaskLeaves.of(mask_leaves)
    leaf_inputs = leaves_info.kernel_inputs(mask_leaves)
    lse = lse.astype(jnp.float32)[..., None]
    if delta is None:
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = delta.astype(jnp.float32)[..., None]
    common = dict(
        leaves_info=leaves_info, element_mask=element_mask, scale=scale, softcap=softcap,
        block_q=block_q, block_kv=block_kv,
    )
    dq = _backward_dq(
        q, k, v, do, lse, delta, kv_metadata, leaf_inputs, group_size=group_size,
        interpret=interpret, **common,
    )
    dk, dv = _backward_dkv(
        q, k, v, do, lse, delta, q_metadata, leaf_inputs, group_size=group_size,
        interpret=interpret, **common,
    )
    return dq, dk, dv


def _backward_dq(
    q, k, v, do, lse, delta, kv_metadata, leaf_inputs, *,
    group_size, leaves_info, element_mask, scale, softcap, block_q, block_kv, interpret,
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
        _backward_dq_kernel, layout=layout, leaves_info=leaves_info, element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_heads, q_len // block_q, layout.width),
            in_specs=[
                q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *leaves_info.specs()
            ],
            out_specs=q_spec,
            scratch_shapes=[compat.VMEM((block_q, head_dim), jnp.float32)],
        ),
        compiler_params=_compiler_params(),
        interpret=_interpret_value(interpret),
        name=BACKWARD_DQ_NAME,
    )(kv_indices, kv_counts, kv_full, q, k, v, do, lse, delta, *leaf_inputs)


def _backward_dkv(
    q, k, v, do, lse, delta, q_metadata, leaf_inputs, *,
    group_size, leaves_info, element_mask, scale, softcap, block_q, block_kv, interpret,
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
        _backward_dkv_kernel, layout=layout, leaves_info=leaves_info, element_mask=element_mask,
        scale=scale, softcap=softcap, block_q=block_q, block_kv=block_kv, group_size=group_size,
    )
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_kv_heads, kv_len // block_kv, group_size * layout.width),
            in_specs=[
                q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *leaves_info.specs()
            ],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[
                compat.VMEM((block_kv, head_dim), jnp.float32),
                compat.VMEM((block_kv, head_dim), jnp.float32),
            ],
        ),
        compiler_params=_compiler_params(),
        interpret=_interpret_value(interpret),
        name=BACKWARD_DKV_NAME,
    )(q_indices, q_counts, q_full, q, k, v, do, lse, delta, *leaf_inputs)
