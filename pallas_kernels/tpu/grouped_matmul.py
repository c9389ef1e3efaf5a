"""Grouped matmul for TPU (Mosaic): the "dropless" MoE GEMM, in the spirit of megablox.

The rows of x [N, K] are sorted by group: group 0's ``group_sizes[0]`` rows first, then group 1's,
and so on; rows past sum(group_sizes) are padding. Work is proportional to the rows present: the
grid walks a list of (group, row tile) *pairs*, never E dense matmuls.

Pairs (computed with jnp in the wrapper, delivered by scalar prefetch as four int32 [P] arrays:
row tile, group, and the group's first and past-the-end rows; a pair with first == end has no
live rows). A row tile of ``block_rows`` rows may hold rows of several groups, so each group
yields one pair per row tile it touches, in group order; the tiles of the list never decrease, so
the visits of a tile are consecutive. With T = ceil(N / block_rows) row tiles and E groups, a
group that starts inside a tile already touched by an earlier group adds one pair, hence
P = T + E - 1 pairs always suffice (the grid is static); unused trailing pairs are padding.

Kernels:
  ``jaxsparse_grouped_matmul``  grid (F tiles, P, K tiles), ("parallel", "arbitrary", "arbitrary").
      x block (tile, k), w block (group, k, f) ((group, f, k) with ``transpose_rhs``), y block
      (tile, f). x_tile @ w_tile accumulates over k in a float32 VMEM scratch; at the last k the
      rows of the pair's group take the result and the tile's other rows keep what earlier pairs
      of the tile wrote (a revisited output block stays in VMEM). The first visit of a tile
      starts from zeros, so rows of no group come out as 0. For that, the wrapper also lists the
      tiles past the last group's rows ("tail" pairs, no live rows: they only write zeros), so
      every tile is visited; padding pairs repeat the last tile and group: no work, and no new
      DMA when K is a single tile (with several, the x and w blocks still cycle over k).
  ``jaxsparse_grouped_matmul_transposed``  grid (K tiles, F tiles, P), ("parallel", "parallel",
      "arbitrary"). dw[group] block (k, f) accumulates x_tile.T @ dy_tile in a float32 scratch,
      rows outside the pair's group set to 0 in both operands with ``jnp.where`` (never a mask
      product: a row of another group, or past N, may hold Inf or NaN). The scratch starts at
      the group's first pair and is written at its last. An empty group gets one pair with no
      live rows, so its dw is written as zeros; this keeps P = T + E - 1 (a group adds a pair
      only if it is empty or starts inside a tile). Padding pairs carry group E - 1 and no rows.

Edges: when block_rows does not divide N the last row tile is partial (Pallas pads the block):
its rows past N are never live, so their contents never reach y or dw; x and y are not copied or
padded by the wrapper. block_rows is lowered to N rounded up to the sublane tile when N is
smaller. The inner (K) and column (F) blocks are the largest multiples of 128 that divide K and F
and do not exceed block_inner and block_cols.

Limits: K and F positive multiples of 128 (``check_support``); float32 or bfloat16 (x, w and dy
share one dtype); block_cols and block_inner multiples of 128; block_rows a multiple of the
dtype's sublane tile (8 rows for float32, 16 for bfloat16, as Mosaic packs two bfloat16 rows per
sublane). group_sizes must be >= 0 with sum <= N; this cannot be checked statically and is the
caller's job. The kernels stay in bounds regardless: negative sizes count as 0 and groups are cut
at row N. Checked in the TPU interpreter and by lowering to Mosaic; not yet compiled on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.tiles import matmul

GROUPED_MATMUL_NAME = "jaxsparse_grouped_matmul"
TRANSPOSED_GROUPED_MATMUL_NAME = "jaxsparse_grouped_matmul_transposed"

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANES = 128


def check_support(inner_dim: int, out_dim: int, dtype) -> None:
    """Raises ValueError unless the kernels can tile K = inner_dim, F = out_dim in this dtype."""
    for name, size in (("inner_dim (K)", inner_dim), ("out_dim (F)", out_dim)):
        if size <= 0 or size % _LANES:
            raise ValueError(
                f"grouped_matmul: {name} must be a positive multiple of {_LANES}, got {size}"
            )
    if jnp.dtype(dtype) not in _DTYPES:
        raise ValueError(
            f"grouped_matmul: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}"
        )


def _sublanes(dtype) -> int:
    """Rows per native Mosaic tile: 8 for 32-bit dtypes, 16 for bfloat16."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _check_blocks(dtype, block_rows, block_cols, block_inner) -> None:
    for name, value in (("block_cols", block_cols), ("block_inner", block_inner)):
        if value <= 0 or value % _LANES:
            raise ValueError(
                f"grouped_matmul: {name} must be a positive multiple of 128, got {value}"
            )
    sublanes = _sublanes(dtype)
    if block_rows <= 0 or block_rows % sublanes:
        raise ValueError(
            f"grouped_matmul: block_rows must be a positive multiple of {sublanes} for "
            f"{jnp.dtype(dtype)}, got {block_rows}"
        )


def _check_group_sizes(group_sizes, num_groups: int | None) -> int:
    if group_sizes.ndim != 1 or (num_groups is not None and group_sizes.shape[0] != num_groups):
        expected = "[E]" if num_groups is None else f"[{num_groups}] (E = w.shape[0])"
        raise ValueError(
            f"grouped_matmul: group_sizes must have shape {expected}, got {group_sizes.shape}"
        )
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"grouped_matmul: group_sizes must be int32, got {group_sizes.dtype}")
    if group_sizes.shape[0] == 0:
        raise ValueError("grouped_matmul: group_sizes must name at least one group, got E = 0")
    return group_sizes.shape[0]


def _check_matrix(name: str, array, dtype=None) -> None:
    if array.ndim != 2:
        raise ValueError(f"grouped_matmul: {name} must be 2-D [N, ...], got shape {array.shape}")
    if dtype is not None and array.dtype != dtype:
        raise ValueError(f"grouped_matmul: {name} must have x's dtype {dtype}, got {array.dtype}")


def _dividing_block(size: int, requested: int) -> int:
    """The largest multiple of 128 that divides ``size`` (a multiple of 128) and is <= requested."""
    block = min(requested, size) // _LANES * _LANES
    while size % block:
        block -= _LANES
    return block


def _row_block(num_rows: int, block_rows: int, dtype) -> int:
    """block_rows, lowered to num_rows rounded up to the sublane tile when that is smaller."""
    sublanes = _sublanes(dtype)
    return min(block_rows, pl.cdiv(num_rows, sublanes) * sublanes)


def _pairs(group_sizes, *, num_rows: int, block_rows: int, visit_empty_groups: bool):
    """The (tile, group, first row, end row) pair list: four int32 [P] arrays, P = T + E - 1.

    Group pairs come first, in group order, one per row tile a group touches (one with no live
    rows for an empty group when ``visit_empty_groups``). Without ``visit_empty_groups`` (the
    forward), "tail" pairs follow for the tiles past the last group's rows. Padding pairs repeat
    the last tile with no live rows; their group is the last pair's group.
    """
    num_groups = group_sizes.shape[0]
    num_tiles = pl.cdiv(num_rows, block_rows)
    num_pairs = num_tiles + num_groups - 1
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    nonempty = ends > starts
    first_tile = jnp.minimum(starts // block_rows, num_tiles - 1)
    last_tile = (ends - 1) // block_rows
    group_pairs = jnp.where(nonempty, last_tile - first_tile + 1, 1 if visit_empty_groups else 0)
    pair_ends = jnp.cumsum(group_pairs)
    pair_starts = pair_ends - group_pairs
    num_group_pairs = pair_ends[-1]

    p = jnp.arange(num_pairs, dtype=jnp.int32)
    listed = p < num_group_pairs
    if visit_empty_groups:
        # Every group has a pair, so the last group pair exists and is group E - 1's.
        p = jnp.minimum(p, num_group_pairs - 1)
    group = jnp.minimum(jnp.searchsorted(pair_ends, p, side="right"), num_groups - 1)
    group = group.astype(jnp.int32)
    tile = first_tile[group] + p - pair_starts[group]
    first, end = jnp.where(listed, starts[group], 0), jnp.where(listed, ends[group], 0)
    if not visit_empty_groups:
        # Tail and padding pairs: the tiles past the last group's rows, then the last tile again,
        # with the last non-empty group (no new w block) and no live rows.
        covered_tiles = pl.cdiv(ends[-1], block_rows)
        tail_tile = jnp.minimum(covered_tiles + p - num_group_pairs, num_tiles - 1)
        last_group = jnp.max(jnp.where(nonempty, jnp.arange(num_groups, dtype=jnp.int32), 0))
        tile = jnp.where(listed, tile, tail_tile)
        group = jnp.where(listed, group, last_group)
    return tile.astype(jnp.int32), group, first.astype(jnp.int32), end.astype(jnp.int32)


def _rows_in_group(tile, first, end, shape, block_rows):
    """bool ``shape``: whether row r of the tile (row tile * block_rows + r) is in [first, end)."""
    rows = tile * block_rows + lax.broadcasted_iota(jnp.int32, shape, 0)
    return jnp.logical_and(rows >= first, rows < end)


def _grouped_matmul_kernel(
    tiles_ref, groups_ref, firsts_ref, ends_ref, x_ref, w_ref, y_ref, acc_ref, *,
    transpose_rhs, block_rows,
):
    del groups_ref  # Only the w index map reads it.
    p, k = pl.program_id(1), pl.program_id(2)
    tile, first, end = tiles_ref[p], firsts_ref[p], ends_ref[p]
    live = end > first
    first_visit = jnp.logical_or(p == 0, tiles_ref[jnp.maximum(p - 1, 0)] != tile)
    last_k = k == pl.num_programs(2) - 1

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(live)
    def _accumulate():
        acc_ref[...] += matmul(x_ref[...], w_ref[...], transpose_b=transpose_rhs)

    def merge(previous):
        in_group = _rows_in_group(tile, first, end, acc_ref.shape, block_rows)
        y_ref[...] = jnp.where(in_group, acc_ref[...].astype(y_ref.dtype), previous)

    @pl.when(jnp.logical_and(last_k, first_visit))
    def _first_write():
        merge(jnp.zeros(y_ref.shape, y_ref.dtype))

    @pl.when(jnp.logical_and(last_k, jnp.logical_and(live, jnp.logical_not(first_visit))))
    def _merge():
        merge(y_ref[...])


def _transposed_kernel(
    tiles_ref, groups_ref, firsts_ref, ends_ref, x_ref, dy_ref, dw_ref, acc_ref, *, block_rows,
):
    p, last = pl.program_id(2), pl.num_programs(2) - 1
    tile, group, first, end = tiles_ref[p], groups_ref[p], firsts_ref[p], ends_ref[p]
    group_starts = jnp.logical_or(p == 0, groups_ref[jnp.maximum(p - 1, 0)] != group)
    group_ends = jnp.logical_or(p == last, groups_ref[jnp.minimum(p + 1, last)] != group)

    @pl.when(group_starts)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(end > first)
    def _accumulate():
        x, dy = x_ref[...], dy_ref[...]
        x = jnp.where(_rows_in_group(tile, first, end, x.shape, block_rows), x, 0)
        dy = jnp.where(_rows_in_group(tile, first, end, dy.shape, block_rows), dy, 0)
        acc_ref[...] += matmul(x, dy, transpose_a=True)

    @pl.when(group_ends)
    def _write():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    block_rows: int = 128,
    block_cols: int = 128,
    block_inner: int = 128,
    interpret: bool | compat.TPUInterpretParams = False,
) -> jax.Array:
    """Grouped matmul: y[rows of e] = x[rows of e] @ w[e] (w[e].T with ``transpose_rhs``).

    Args:
      x: [N, K] float32 or bfloat16, rows sorted by group; K a multiple of 128.
      w: [E, K, F] in x.dtype, or [E, F, K] with ``transpose_rhs`` (group e then uses w[e].T, so
        dx = grouped_matmul(dy, w, sizes, transpose_rhs=True) needs no transposed copy of w);
        F a multiple of 128.
      group_sizes: int32 [E], each >= 0, sum <= N (the caller's job: not checked; negative sizes
        count as 0 and groups are cut at row N).
      transpose_rhs: see w.
      block_rows: rows per tile, a multiple of 8 (float32) or 16 (bfloat16); lowered to N
        (rounded up to that multiple) when N is smaller.
      block_cols, block_inner: F and K tile sizes, multiples of 128; each is lowered to the
        largest multiple of 128 that divides F (K).
      interpret: True (or ``pltpu.InterpretParams``) to run in the TPU interpreter on CPU.

    Returns:
      y [N, F] in x.dtype, float32 accumulation; rows past sum(group_sizes) are exactly 0.

    Raises:
      ValueError: on wrong ranks or shapes, mismatched or unsupported dtypes, group_sizes not
        int32 [E] (E >= 1), or block sizes that are not multiples of 128 (block_rows: 8 or 16).
    """
    _check_matrix("x", x)
    if w.ndim != 3:
        raise ValueError(f"grouped_matmul: w must be 3-D [E, K, F], got shape {w.shape}")
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_matmul: w must have x's dtype {x.dtype}, got {w.dtype}")
    num_rows, inner = x.shape
    num_groups = w.shape[0]
    w_inner, out_dim = (w.shape[2], w.shape[1]) if transpose_rhs else (w.shape[1], w.shape[2])
    if w_inner != inner:
        layout = "[E, F, K] (transpose_rhs)" if transpose_rhs else "[E, K, F]"
        raise ValueError(
            f"grouped_matmul: w must be {layout} with K = x.shape[1] = {inner}, got shape {w.shape}"
        )
    _check_group_sizes(group_sizes, num_groups)
    check_support(inner, out_dim, x.dtype)
    _check_blocks(x.dtype, block_rows, block_cols, block_inner)
    if num_rows == 0:
        return jnp.zeros((0, out_dim), x.dtype)

    tm = _row_block(num_rows, block_rows, x.dtype)
    tk, tf = _dividing_block(inner, block_inner), _dividing_block(out_dim, block_cols)
    metadata = _pairs(group_sizes, num_rows=num_rows, block_rows=tm, visit_empty_groups=False)
    num_pairs = metadata[0].shape[0]

    def x_index_map(f, p, k, tiles_ref, *_):
        return tiles_ref[p], k

    def w_index_map(f, p, k, tiles_ref, groups_ref, *_):
        return (groups_ref[p], f, k) if transpose_rhs else (groups_ref[p], k, f)

    def y_index_map(f, p, k, tiles_ref, *_):
        return tiles_ref[p], f

    w_block = (None, tf, tk) if transpose_rhs else (None, tk, tf)
    kernel = functools.partial(_grouped_matmul_kernel, transpose_rhs=transpose_rhs, block_rows=tm)
    itemsize = x.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * num_pairs * tm * inner * out_dim,
        transcendentals=0,
        bytes_accessed=itemsize * (
            (out_dim // tf) * num_rows * inner + num_pairs * inner * out_dim + num_rows * out_dim
        ),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_rows, out_dim), x.dtype),
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(out_dim // tf, num_pairs, inner // tk),
            in_specs=[pl.BlockSpec((tm, tk), x_index_map), pl.BlockSpec(w_block, w_index_map)],
            out_specs=pl.BlockSpec((tm, tf), y_index_map),
            scratch_shapes=[compat.VMEM((tm, tf), jnp.float32)],
        ),
        compiler_params=compat.TPUCompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=compat.tpu_interpret_value(interpret),
        cost_estimate=cost,
        name=GROUPED_MATMUL_NAME,
    )(*metadata, x, w)


def transposed_grouped_matmul(
    x: jax.Array,
    dy: jax.Array,
    group_sizes: jax.Array,
    *,
    block_rows: int = 128,
    block_cols: int = 128,
    block_inner: int = 128,
    interpret: bool | compat.TPUInterpretParams = False,
) -> jax.Array:
    """Per-group x.T @ dy: dw[e] = x[rows of e].T @ dy[rows of e] (the weight gradient).

    Args:
      x: [N, K] float32 or bfloat16, rows sorted by group; K a multiple of 128.
      dy: [N, F] in x.dtype; F a multiple of 128.
      group_sizes: int32 [E], as for :func:`grouped_matmul`.
      block_rows, block_cols, block_inner, interpret: as for :func:`grouped_matmul` (block_inner
        tiles K, block_cols tiles F, block_rows the contracted rows).

    Returns:
      dw [E, K, F] in x.dtype, float32 accumulation; an empty group gives exactly 0.

    Raises:
      ValueError: as for :func:`grouped_matmul`.
    """
    _check_matrix("x", x)
    _check_matrix("dy", dy, x.dtype)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"grouped_matmul: dy must have x's {x.shape[0]} rows, got shape {dy.shape}"
        )
    num_groups = _check_group_sizes(group_sizes, None)
    (num_rows, inner), out_dim = x.shape, dy.shape[1]
    check_support(inner, out_dim, x.dtype)
    _check_blocks(x.dtype, block_rows, block_cols, block_inner)
    if num_rows == 0:
        return jnp.zeros((num_groups, inner, out_dim), x.dtype)

    tm = _row_block(num_rows, block_rows, x.dtype)
    tk, tf = _dividing_block(inner, block_inner), _dividing_block(out_dim, block_cols)
    metadata = _pairs(group_sizes, num_rows=num_rows, block_rows=tm, visit_empty_groups=True)
    num_pairs = metadata[0].shape[0]

    def x_index_map(k, f, p, tiles_ref, *_):
        return tiles_ref[p], k

    def dy_index_map(k, f, p, tiles_ref, *_):
        return tiles_ref[p], f

    def dw_index_map(k, f, p, tiles_ref, groups_ref, *_):
        return groups_ref[p], k, f

    kernel = functools.partial(_transposed_kernel, block_rows=tm)
    itemsize = x.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * num_pairs * tm * inner * out_dim,
        transcendentals=0,
        bytes_accessed=itemsize * (
            (out_dim // tf) * num_rows * inner + (inner // tk) * num_rows * out_dim
            + num_groups * inner * out_dim
        ),
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, inner, out_dim), x.dtype),
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(inner // tk, out_dim // tf, num_pairs),
            in_specs=[pl.BlockSpec((tm, tk), x_index_map), pl.BlockSpec((tm, tf), dy_index_map)],
            out_specs=pl.BlockSpec((None, tk, tf), dw_index_map),
            scratch_shapes=[compat.VMEM((tk, tf), jnp.float32)],
        ),
        compiler_params=compat.TPUCompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=compat.tpu_interpret_value(interpret),
        cost_estimate=cost,
        name=TRANSPOSED_GROUPED_MATMUL_NAME,
    )(*metadata, x, dy)
