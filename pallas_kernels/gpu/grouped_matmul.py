"""Grouped matmul for GPUs (Pallas, Triton backend): the mixture-of-experts "dropless" GEMM.

x [N, K] holds rows sorted by group (group 0's group_sizes[0] rows first, then group 1's, ...,
then padding rows up to N); group e multiplies its rows by its own weight w[e]. Two kernels:

  grouped_matmul:             y[rows of e] = x[rows of e] @ w[e]      (or @ w[e].T, transpose_rhs)
  transposed_grouped_matmul:  dw[e] = x[rows of e].T @ dy[rows of e]

For a forward y = grouped_matmul(x, w, sizes), the backward is dx = grouped_matmul(dy, w, sizes,
transpose_rhs=True) (no transposed copy of w) and dw = transposed_grouped_matmul(x, dy, sizes).
Work follows the rows present, never "E times a dense matmul" (which is what ``lax.ragged_dot``
costs on CPU).

grouped_matmul: a work list of (group, row tile) pairs.
  Rows are cut into T = ceil(N / bm) row tiles (bm = block_rows; x is zero-padded to T * bm rows
  when N is not a multiple). The wrapper computes, with jnp on device, a static-size list of the
  (group, row tile) pairs that hold rows, with the padding rows [sum(sizes), N) treated as an
  extra group E that computes nothing and stores zeros. The E + 1 groups tile [0, T * bm)
  contiguously; each of the E boundaries between them can put one tile into two pairs, so there
  are at most T + E pairs: the list has exactly P = T + E entries, the unused ones empty (row
  range start == end, group E: they neither compute nor store). Pair p carries its group, its tile and its row range [start, end) (absolute
  rows, inside the tile). Grid (P, F // bf); instance (p, j), for a real group, computes
  x[tile rows] @ w[group][:, F tile j] (loop over K in bk steps, float32 accumulation) and stores
  only the rows in [start, end) with a masked store (``pl_triton.store(..., mask=...)``); a
  padding-group pair stores zeros in its rows the same way, so every output row is written
  exactly once and padding rows come out as exactly 0.
  Parallel safety: two pairs may share a tile (a group boundary inside it), but they own
  disjoint rows and each writes only its own with a masked store: no instance reads, let alone
  read-modify-writes, another's rows. (A load, ``jnp.where`` merge and full-tile store would race
  on a GPU; it would pass in interpret mode, which runs the grid sequentially.)
  Cost: sum over pairs of bm * K * bf per F tile, i.e. at most (T + E) / T times a dense
  [N, K] x [K, F] matmul, plus E empty-instance launches at worst.

transposed_grouped_matmul: grid (E, K // bk, F // bf); instance (e, i, j) loops (``fori_loop``
  with a data-dependent trip count) over the row tiles that overlap group e's rows
  [start_e, end_e), loads x[tile, K tile i] and dy[tile, F tile j], zeroes the rows outside the
  group with ``jnp.where`` (both operands, so garbage in other groups' or padding rows cannot
  leak, NaN included) and accumulates x_tile.T @ dy_tile in float32; it writes its [bk, bf] tile
  of dw[e] (zeros for an empty group: the loop runs 0 times). Cost: at most (T + E) row-tile
  steps per (K tile, F tile), the same bound as above.

Operands the kernels index with run-time values (the group's weight, a row tile) are passed as
whole-array blocks (along the dimension indexed) and sliced with ``pl.ds``: the GPU Pallas backends
have no scalar prefetch, so a BlockSpec's index map cannot read the work list.

Limits (Triton ``tl.dot`` needs every dim a power of two >= 16):
  * block_rows, block_cols, block_inner: powers of two >= 16 (ValueError otherwise). Rows are
    padded to a multiple of block_rows. Along K and F the tile actually used is the largest power
    of two <= the requested block size that divides the dim (e.g. 32 for K = 96 with
    block_inner = 64), so K and F must be multiples of 16 (``check_support``); K or F = 16 * odd
    runs on 16-wide tiles (slow on a GPU: prefer multiples of 64).
  * N == 0 returns zeros without a kernel. When N % block_rows != 0, x (and dy) are copied
    zero-padded and y is sliced back: one extra pass over the activations.
  * dtypes float32 and bfloat16; x and w (or dy) must share it; group_sizes int32 [E], E >= 1.
  * float32 ``tl.dot`` products use the Triton lowering's default precision (TF32 on GPU).
  * sum(group_sizes) <= N and group_sizes >= 0 cannot be checked statically and are the caller's
    job (jaxsparse's API checks them when the sizes are concrete). The kernels stay in bounds
    regardless: negative sizes count as 0 and group bounds are clipped to N, so groups past N are
    truncated (grouped_matmul) or see only their rows below N (transposed_grouped_matmul).

Checked on CPU only (interpret mode, and lowering to Triton for CUDA); not yet compiled or timed
on a GPU.
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

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MIN_TILE = 16  # tl.dot needs every dim >= 16.


# ----------------------------------------------------------------------------------------------
# Checks and tile choice.


def _is_block_size(size) -> bool:
    return isinstance(size, int) and size >= _MIN_TILE and size & (size - 1) == 0


def _tile(dim: int, block: int) -> int:
    """The largest power of two <= block dividing dim (dim a multiple of 16, block >= 16)."""
    tile = block
    while dim % tile:
        tile //= 2
    return tile


def check_support(inner_dim: int, out_dim: int, dtype) -> None:
    """Raises ValueError (naming the size or dtype, expected and actual) unless the kernels can
    tile an inner dimension K and an output dimension F in this dtype."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"grouped_matmul: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}."
        )
    for name, dim in (("inner dim K", inner_dim), ("output dim F", out_dim)):
        if dim <= 0 or dim % _MIN_TILE:
            raise ValueError(
                f"grouped_matmul: {name} must be a positive multiple of {_MIN_TILE}, got {dim}."
            )


def _check_blocks(**blocks) -> None:
    for name, size in blocks.items():
        if not _is_block_size(size):
            raise ValueError(
                f"grouped_matmul: {name} must be a power of two >= {_MIN_TILE}, got {size!r}."
            )


def _check_group_sizes(group_sizes, num_groups: int | None) -> int:
    """Checks group_sizes is int32 [E] (E = num_groups if given, E >= 1); returns E."""
    shape, dtype = jnp.shape(group_sizes), jnp.result_type(group_sizes)
    if len(shape) != 1 or dtype != jnp.int32 or shape[0] < 1:
        raise ValueError(
            f"grouped_matmul: group_sizes must be int32 [E] with E >= 1, got {dtype} {shape}."
        )
    if num_groups is not None and shape[0] != num_groups:
        raise ValueError(
            f"grouped_matmul: group_sizes must have one entry per group of w (E = {num_groups}),"
            f" got shape {shape}."
        )
    return shape[0]


def _check_rank(name: str, array, rank: int, layout: str) -> None:
    if jnp.ndim(array) != rank:
        raise ValueError(f"grouped_matmul: {name} must be {layout}, got shape {jnp.shape(array)}.")


def _group_bounds(group_sizes, num_rows: int):
    """(starts, ends) int32 [E]: group e owns rows [starts[e], ends[e]), clipped to num_rows;
    negative sizes count as 0, so the ranges are contiguous, disjoint and increasing."""
    ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes, 0)), num_rows).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    return starts, ends


def _pad_rows(a, num_rows: int):
    return a if a.shape[0] == num_rows else jnp.pad(a, ((0, num_rows - a.shape[0]), (0, 0)))


# ----------------------------------------------------------------------------------------------
# grouped_matmul.


def work_list(group_sizes, num_rows: int, block_rows: int):
    """The (group, row tile) work list of :func:`grouped_matmul`, computed with jnp.

    Args:
      group_sizes: int32 [E].
      num_rows: N, the rows of x (the list covers T * block_rows rows, T = ceil(N / block_rows)).
      block_rows: the row tile.

    Returns:
      (groups, tiles, starts, ends), int32 [T + E] each. Entry p is row tile tiles[p] of group
      groups[p], owning absolute rows [starts[p], ends[p]) inside that tile. groups[p] == E is
      the padding group (rows past sum(group_sizes): zeros). Unused entries have
      starts == ends == 0 (and group E, tile 0).
    """
    num_groups = group_sizes.shape[0]
    num_tiles = -(-num_rows // block_rows)
    padded_rows = num_tiles * block_rows
    starts, ends = _group_bounds(group_sizes, num_rows)
    # Group E: the padding rows, up to the padded row count.
    starts = jnp.concatenate([starts, ends[-1:]])
    ends = jnp.concatenate([ends, jnp.full((1,), padded_rows, jnp.int32)])
    first_tile = starts // block_rows
    tile_counts = jnp.where(ends > starts, (ends - 1) // block_rows + 1 - first_tile, 0)
    pair_ends = jnp.cumsum(tile_counts)  # [E + 1], inclusive.
    num_pairs = num_tiles + num_groups
    p = jnp.arange(num_pairs, dtype=jnp.int32)
    group = jnp.searchsorted(pair_ends, p, side="right").astype(jnp.int32)  # E + 1 past the end.
    used = group <= num_groups
    g = jnp.minimum(group, num_groups)
    tile = first_tile[g] + p - (pair_ends[g] - tile_counts[g])
    tile_start = tile * block_rows
    row_start = jnp.maximum(starts[g], tile_start)
    row_end = jnp.minimum(ends[g], tile_start + block_rows)
    zero = jnp.zeros_like(p)
    return (
        g,
        jnp.where(used, tile, zero),
        jnp.where(used, row_start, zero),
        jnp.where(used, row_end, zero),
    )


def _grouped_matmul_kernel(
    x_ref, w_ref, group_ref, tile_ref, start_ref, end_ref, y_ref, *,
    num_groups: int, block_rows: int, block_inner: int, transpose_rhs: bool,
):
    """One (pair, F tile): the pair's rows of y[:, F tile].

    Refs: x [Np, K]; w [E, K, bf] ([E, bf, K] if transpose_rhs); group, tile, start, end [];
    output y [Np, bf].
    """
    group, start, end = group_ref[...], start_ref[...], end_ref[...]
    tile_start = pl.multiple_of(tile_ref[...] * block_rows, block_rows)
    rows = pl.ds(tile_start, block_rows)
    tile_shape = (block_rows, y_ref.shape[1])
    row_ids = tile_start + lax.broadcasted_iota(jnp.int32, tile_shape, 0)
    mask = (row_ids >= start) & (row_ids < end)  # The pair's rows, over the whole tile.

    @pl.when((start < end) & (group < num_groups))
    def _():
        def step(k, acc):
            inner = pl.ds(pl.multiple_of(k * block_inner, block_inner), block_inner)
            x = x_ref[rows, inner]
            if transpose_rhs:
                return acc + matmul(x, w_ref[group, :, inner], transpose_b=True)
            return acc + matmul(x, w_ref[group, inner, :])

        acc = lax.fori_loop(
            0, x_ref.shape[1] // block_inner, step,
            jnp.zeros(tile_shape, jnp.float32),
        )
        compat.pl_triton.store(y_ref.at[rows, :], acc.astype(y_ref.dtype), mask=mask)

    @pl.when((start < end) & (group >= num_groups))
    def _():
        zeros = jnp.zeros(tile_shape, y_ref.dtype)
        compat.pl_triton.store(y_ref.at[rows, :], zeros, mask=mask)


def grouped_matmul(
    x, w, group_sizes, *, transpose_rhs: bool = False, block_rows: int = 64,
    block_cols: int = 64, block_inner: int = 64, num_warps: int = 4, num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Per-group matmul over rows sorted by group, float32 accumulation::

        y[rows of e] = x[rows of e] @ w[e]        (x[rows of e] @ w[e].T with transpose_rhs)
        y[rows past sum(group_sizes)] = 0

    Args:
      x: [N, K], float32 or bfloat16; group 0's group_sizes[0] rows first, then group 1's, ...;
        rows past sum(group_sizes) are padding.
      w: [E, K, F] in x.dtype, or [E, F, K] with transpose_rhs.
      group_sizes: int32 [E], each >= 0, sum <= N (the caller's job: not checkable statically;
        see the module docstring for what happens otherwise).
      transpose_rhs: multiply by w[e].T (the dx of a backward pass without a copy of w).
      block_rows, block_cols, block_inner: row, F and K tiles, powers of two >= 16; the F and K
        tiles are reduced to divide F and K (see the module docstring).
      num_warps, num_stages: Triton launch settings; interpret: run on CPU.

    Returns:
      y: [N, F] in x.dtype.

    Raises:
      ValueError: on wrong ranks or shapes, dtype mismatch, unsupported K, F or dtype,
        group_sizes not int32 [E], or block sizes not powers of two >= 16.
    """
    _check_rank("x", x, 2, "[N, K]")
    _check_rank("w", w, 3, "[E, F, K] (transpose_rhs)" if transpose_rhs else "[E, K, F]")
    num_rows, inner_dim = x.shape
    num_groups = w.shape[0]
    out_dim, w_inner = (w.shape[1], w.shape[2]) if transpose_rhs else (w.shape[2], w.shape[1])
    if w_inner != inner_dim:
        layout = "[E, F, K]" if transpose_rhs else "[E, K, F]"
        raise ValueError(
            f"grouped_matmul: w must be {layout} with K = x.shape[1] = {inner_dim}, "
            f"got shape {w.shape}."
        )
    if w.dtype != x.dtype:
        raise ValueError(f"grouped_matmul: w must have x's dtype {x.dtype}, got {w.dtype}.")
    check_support(inner_dim, out_dim, x.dtype)
    _check_group_sizes(group_sizes, num_groups)
    _check_blocks(block_rows=block_rows, block_cols=block_cols, block_inner=block_inner)
    if num_rows == 0:
        return jnp.zeros((0, out_dim), x.dtype)
    block_cols, block_inner = _tile(out_dim, block_cols), _tile(inner_dim, block_inner)
    num_tiles = -(-num_rows // block_rows)
    padded_rows = num_tiles * block_rows
    pairs = work_list(group_sizes, num_rows, block_rows)
    num_pairs = num_tiles + num_groups
    kernel = functools.partial(
        _grouped_matmul_kernel, num_groups=num_groups, block_rows=block_rows,
        block_inner=block_inner, transpose_rhs=transpose_rhs,
    )
    if transpose_rhs:
        w_spec = pl.BlockSpec((num_groups, block_cols, inner_dim), lambda p, j: (0, j, 0))
    else:
        w_spec = pl.BlockSpec((num_groups, inner_dim, block_cols), lambda p, j: (0, 0, j))
    scalar_spec = pl.BlockSpec((None,), lambda p, j: (p,))
    y = pl.pallas_call(
        kernel,
        grid=(num_pairs, out_dim // block_cols),
        in_specs=[
            pl.BlockSpec((padded_rows, inner_dim), lambda p, j: (0, 0)),
            w_spec, scalar_spec, scalar_spec, scalar_spec, scalar_spec,
        ],
        out_specs=pl.BlockSpec((padded_rows, block_cols), lambda p, j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((padded_rows, out_dim), x.dtype),
        compiler_params=compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=GROUPED_MATMUL_NAME,
    )(_pad_rows(x, padded_rows), w, *pairs)
    return y if padded_rows == num_rows else y[:num_rows]


# ----------------------------------------------------------------------------------------------
# transposed_grouped_matmul.


def _transposed_grouped_matmul_kernel(
    x_ref, dy_ref, start_ref, end_ref, dw_ref, *, block_rows: int
):
    """One (group, K tile, F tile): dw[e, K tile, F tile] over the group's row tiles.

    Refs: x [Np, bk]; dy [Np, bf]; start, end []; output dw [bk, bf].
    """
    start, end = start_ref[...], end_ref[...]
    first = start // block_rows
    last = jnp.where(end > start, (end - 1) // block_rows + 1, first)

    def step(tile, acc):
        tile_start = pl.multiple_of(tile * block_rows, block_rows)
        rows = pl.ds(tile_start, block_rows)
        row_ids = tile_start + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
        inside = ((row_ids >= start) & (row_ids < end))[:, None]
        x = jnp.where(inside, x_ref[rows, :], 0).astype(x_ref.dtype)
        dy = jnp.where(inside, dy_ref[rows, :], 0).astype(dy_ref.dtype)
        return acc + matmul(x, dy, transpose_a=True)

    acc = lax.fori_loop(first, last, step, jnp.zeros(dw_ref.shape, jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


def transposed_grouped_matmul(
    x, dy, group_sizes, *, block_rows: int = 64, block_cols: int = 64, block_inner: int = 64,
    num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
) -> jax.Array:
    """Per-group x.T @ dy over rows sorted by group, float32 accumulation::

        dw[e] = x[rows of e].T @ dy[rows of e]     (zeros for an empty group)

    Args:
      x: [N, K], float32 or bfloat16, rows sorted by group as in :func:`grouped_matmul`.
      dy: [N, F] in x.dtype.
      group_sizes: int32 [E], each >= 0, sum <= N (the caller's job).
      block_rows: the row tile of the loop; block_cols, block_inner: the F and K tiles of dw;
        powers of two >= 16 (F and K tiles reduced to divide F and K).
      num_warps, num_stages: Triton launch settings; interpret: run on CPU.

    Returns:
      dw: [E, K, F] in x.dtype.

    Raises:
      ValueError: on wrong ranks or shapes, dtype mismatch, unsupported K, F or dtype,
        group_sizes not int32 [E], or block sizes not powers of two >= 16.
    """
    _check_rank("x", x, 2, "[N, K]")
    _check_rank("dy", dy, 2, "[N, F]")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"grouped_matmul: dy must be [N, F] with N = x.shape[0] = {x.shape[0]}, "
            f"got shape {dy.shape}."
        )
    if dy.dtype != x.dtype:
        raise ValueError(f"grouped_matmul: dy must have x's dtype {x.dtype}, got {dy.dtype}.")
    (num_rows, inner_dim), out_dim = x.shape, dy.shape[1]
    check_support(inner_dim, out_dim, x.dtype)
    num_groups = _check_group_sizes(group_sizes, None)
    _check_blocks(block_rows=block_rows, block_cols=block_cols, block_inner=block_inner)
    if num_rows == 0:
        return jnp.zeros((num_groups, inner_dim, out_dim), x.dtype)
    block_cols, block_inner = _tile(out_dim, block_cols), _tile(inner_dim, block_inner)
    padded_rows = -(-num_rows // block_rows) * block_rows
    starts, ends = _group_bounds(group_sizes, num_rows)
    scalar_spec = pl.BlockSpec((None,), lambda e, i, j: (e,))
    return pl.pallas_call(
        functools.partial(_transposed_grouped_matmul_kernel, block_rows=block_rows),
        grid=(num_groups, inner_dim // block_inner, out_dim // block_cols),
        in_specs=[
            pl.BlockSpec((padded_rows, block_inner), lambda e, i, j: (0, i)),
            pl.BlockSpec((padded_rows, block_cols), lambda e, i, j: (0, j)),
            scalar_spec, scalar_spec,
        ],
        out_specs=pl.BlockSpec((None, block_inner, block_cols), lambda e, i, j: (e, i, j)),
        out_shape=jax.ShapeDtypeStruct((num_groups, inner_dim, out_dim), x.dtype),
        compiler_params=compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=TRANSPOSED_GROUPED_MATMUL_NAME,
    )(_pad_rows(x, padded_rows), _pad_rows(dy, padded_rows), starts, ends)
