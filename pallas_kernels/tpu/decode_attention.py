"""Block-sparse decode attention over a KV cache for TPU (Mosaic), forward only.

Decode (and short multi-token decode, e.g. speculative verification) reads a long KV cache with a
handful of query rows per kv head: the work is bandwidth bound, so the kernel is built around the
K/V reads. Each listed kv block is copied from HBM once per (batch, kv head) and applied to all
R = G * Tq query rows that share the kv head (GQA rows are stacked into one [Rp, D] tile, not
looped), in the spirit of flash-decoding (Dao et al., 2023) with split-K over the block list.

Kernel ``jaxsparse_decode_attention_fwd``: grid (B, K, P, c), P = num_splits, c = ceil(nb / P),
semantics ("parallel", "parallel", "parallel", "arbitrary"). Step (b, h, s, j) handles list entry
e = s * c + j of (b, h). Block lists, counts and lengths arrive by scalar prefetch (SMEM), which the
K/V ``BlockSpec`` index map reads: entry e while e < count, else the split's last listed entry
(the previous split's last one for an empty split, entry 0 when nothing is listed), so a padding
step repeats the previous block index and the pipeline issues no DMA for it; its compute is
skipped under ``pl.when``. The online softmax (FlashAttention) keeps its row max, row sum and
[Rp, D] accumulator in float32 VMEM scratch; the last step writes the split's partial o and lse.

Visibility, with L = lengths[b] and row r at position L - Tq + t (t = r % Tq): key p is visible
iff p < L - Tq + 1 + t (which implies p < L). A block that ends at or before L - Tq + 1 is visible
to every row and skips the mask; only blocks that hold the last Tq positions build it.
t comes from an iota and G - 1 compares (no vector integer division); padded rows r >= R act as
t = Tq - 1. Cache positions at or past L inside a listed block may hold anything, NaN included:
K there is hidden by the ``where`` on the logits, and V rows there are zeroed before p @ v
(0 * NaN would otherwise poison the row).

Layout (wrapper): q is padded from R to Rp rows (a multiple of 8 for float32, 16 for bfloat16:
one sublane tile); the q block [Rp, D] is the same for every step, so it is copied once per
(b, h). Partial outputs are o [B, K, P, Rp, D] and lse [B, K, P, Rp, 1] (a column, so the kernel
writes the row statistics without a transpose), float32 when P > 1; with P = 1 the kernel writes
o in q.dtype directly. The wrapper merges splits by log-sum-exp (weights exp(lse_s - max) with the
max replaced by 0 when every split is empty, so an empty split or row never makes NaN) and casts
o to q.dtype.

Counts (``live_counts``): the wrapper clamps counts to [0, nb] and then drops the trailing listed
blocks that start at or past lengths[b] (they hold no visible key): with ascending lists these are
a suffix, so the kernel neither copies nor computes them. Listed block ids are clipped to
[0, S / block_kv), so a stray id never reads out of bounds (a clipped id is a different block: the
caller must list valid ids); padding entries are never read, except entry 0 of a list with nothing
live, whose block is copied (the pipeline needs one) but never computed. Lengths are clamped to
[0, S].

Paged caches (``page_table`` int32 [B, max_pages], a fourth scalar-prefetch operand, flattened):
k and v are then one page pool [1, K, P * block_kv, D] shared by all sequences, pages are blocks
and block_indices hold logical block ids. Only the K/V index map translates: it returns
(0, h, page_table[b, block], 0), the page clipped into [0, P); the kernel body, ``live_counts``,
the clipping of block ids (to [0, max_pages)) and the clamping of lengths (to
[0, max_pages * block_kv]) all work on logical blocks and positions. Consecutive steps that name
the same kv head and physical page (a padding step; with K = 1, a page shared by consecutive
sequences) issue no DMA. The page-table entries read are those of live listed blocks and, for a
(b, h) with nothing live, that of entry 0 (copied, never computed; clipping keeps an arbitrary
entry in bounds). SMEM grows by B * max_pages words.

Empty rows: a row that sees nothing (count 0, length 0, or a query position before 0 when
lengths[b] < Tq) gives o = 0 and lse = -inf: exponentials are shifted by a max that is replaced
by 0 when it is -inf, so masked logits always give p = 0.

Limits (``check_support``): float32 or bfloat16; head_dim a positive multiple of 128 (the lane
width; pad smaller heads in the caller); block_kv a positive multiple of 128, because the logits
tile [Rp, block_kv] has block_kv on the lanes. (Lowering to Mosaic also succeeds with block_kv = 8
or 64, float32 and bfloat16 alike: Pallas' block-shape rule asks only for a multiple of 8 in the
K/V block's second-minor dim; whether Mosaic compiles the lane-partial logits tiles is unchecked,
so they are refused.) VMEM per step: 2 buffers each of K and V [block_kv, D] plus q, o and a
float32 [Rp, D] accumulator. SMEM holds B * K * nb + B * K + B int32 words, and SMEM is small:
split very large batches of long lists into several calls. Checked in the TPU interpreter and by
lowering to Mosaic; not yet compiled on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.decode_attention_inputs import check_decode_attention_inputs, merge_splits
from pallas_kernels.tpu import online_softmax

FORWARD_NAME = "jaxsparse_decode_attention_fwd"

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANES = 128
_SUBLANES = 8



def check_support(head_dim: int, block_kv: int, dtype) -> None:
    """Raises ValueError unless the kernel supports this head dim, kv block size and dtype."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"decode_attention: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}."
        )
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % _LANES:
        raise ValueError(
            f"decode_attention: head_dim must be a positive multiple of {_LANES}, got {head_dim}."
        )
    if not isinstance(block_kv, int) or block_kv <= 0 or block_kv % _LANES:
        raise ValueError(
            f"decode_attention: block_kv must be a positive multiple of {_LANES}, got {block_kv}."
        )


def listed_entry(split, step, count, steps):
    """The list entry whose block grid step (split, step) reads: the step's own entry while it
    is listed, else the last listed entry before it (entry 0 when nothing is listed), so that a
    padding step repeats the previous step's block and costs no DMA."""
    return jnp.maximum(jnp.minimum(split * steps + step, count - 1), 0)


def kv_block_index_map(num_kv_heads: int, steps: int, width: int, *,
                       max_pages: int | None = None, num_pages: int | None = None):
    """K/V index map on the (B, K, P, c) grid: (b, h, listed block, 0) for a contiguous cache;
    with a page table (``max_pages`` columns, flattened to [B * max_pages] in SMEM, into a pool of
    ``num_pages`` pages): (0, h, page_table[b, listed block] clipped into [0, num_pages), 0)."""

    def index_map(b, h, split, step, indices_ref, counts_ref, lengths_ref, *pages_ref):
        head = b * num_kv_heads + h
        entry = listed_entry(split, step, counts_ref[head], steps)
        block = indices_ref[head * width + entry]
        if max_pages is None:
            return b, h, block, 0
        page = pages_ref[0][b * max_pages + block]
        return 0, h, jnp.minimum(jnp.maximum(page, 0), num_pages - 1), 0

    return index_map


def _row_limits(length, padded_rows, queries_per_head, group_size):
    """Exclusive visibility limit per row, [Rp, 1] int32: key p is visible to row r iff
    p < L - Tq + 1 + t, t = r % Tq (Tq - 1 for padded rows), built without integer division."""
    tq = queries_per_head
    if tq == 1:
        return jnp.full((padded_rows, 1), length, jnp.int32)
    row = lax.broadcasted_iota(jnp.int32, (padded_rows, 1), 0)
    t = row
    for g in range(1, group_size):
        t = t - jnp.where(row >= g * tq, tq, 0)
    t = jnp.minimum(t, tq - 1)
    return length - tq + 1 + t


def _forward_kernel(
    indices_ref, counts_ref, lengths_ref, *refs, scale, softcap, block_kv, queries_per_head,
    group_size, steps, width, paged,
):
    # A page table, when given, is a fourth scalar-prefetch operand read only by the index map:
    # the kernel body works on logical blocks and positions.
    q_ref, k_ref, v_ref, o_ref, lse_ref, max_ref, sum_ref, acc_ref = refs[1:] if paged else refs
    b, h, split, step = (pl.program_id(axis) for axis in range(4))
    head = b * pl.num_programs(1) + h
    count = counts_ref[head]
    length = lengths_ref[b]
    entry = split * steps + step

    pl.when(step == 0)(lambda: online_softmax.init(max_ref, sum_ref, acc_ref))

    def visit(block, apply_mask):
        v = v_ref[...]
        logits, _ = online_softmax.tile_logits(q_ref[...], k_ref[...], scale=scale, softcap=softcap)
        if apply_mask:
            start = block * block_kv
            key_pos = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            limits = _row_limits(length, logits.shape[0], queries_per_head, group_size)
            logits = jnp.where(key_pos < limits, logits, -jnp.inf)
            # Positions at or past the length may hold NaN: 0 * NaN would poison p @ v. The
            # iota has v's full shape, so the mask is built without broadcasting booleans.
            v_pos = start + lax.broadcasted_iota(jnp.int32, v.shape, 0)
            v = jnp.where(v_pos < length, v, jnp.zeros_like(v))
        online_softmax.accumulate(logits, v, max_ref, sum_ref, acc_ref)

    @pl.when(entry < count)
    def _listed():
        block = indices_ref[head * width + entry]
        # Every row sees every position below L - Tq + 1 (which is <= L).
        whole = (block + 1) * block_kv <= length - queries_per_head + 1
        pl.when(whole)(lambda: visit(block, False))
        pl.when(jnp.logical_not(whole))(lambda: visit(block, True))

    pl.when(step == pl.num_programs(3) - 1)(
        lambda: online_softmax.finalise(max_ref, sum_ref, acc_ref, o_ref, lse_ref))


def live_counts(block_indices, block_counts, lengths, *, block_kv):
    """The number of list entries the kernel walks per (b, kv head): int32 [B, K].

    Counts are clamped to [0, nb] and cut before the first listed block that starts at or past
    lengths[b]: it holds no visible key, and with ascending lists neither does any later one, so
    those blocks are neither copied nor computed.
    """
    num_entries = block_indices.shape[2]
    counts = jnp.clip(block_counts, 0, num_entries)
    listed = jnp.arange(num_entries, dtype=jnp.int32) < counts[..., None]
    live = listed & (block_indices * block_kv < lengths[:, None, None])
    return jnp.sum(jnp.cumprod(live.astype(jnp.int32), axis=-1), axis=-1, dtype=jnp.int32)


def _kernel_metadata(block_indices, block_counts, lengths, *, kv_len, block_kv):
    """(flat block ids, flat live counts, lengths) for scalar prefetch; block ids clipped into
    range, lengths clamped to [0, S] (S = max_pages * block_kv, logical, with a page table)."""
    lengths = jnp.clip(lengths, 0, kv_len)
    block_indices = jnp.clip(block_indices, 0, kv_len // block_kv - 1)
    counts = live_counts(block_indices, block_counts, lengths, block_kv=block_kv)
    return block_indices.reshape(-1), counts.reshape(-1), lengths


def decode_attention_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    block_indices: jax.Array,
    block_counts: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
    queries_per_head: int = 1,
    block_kv: int = 128,
    num_splits: int = 1,
    interpret: bool | compat.TPUInterpretParams = False,
    page_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention of a few query rows per kv head over a KV cache.

    Args:
      q: [B, K, R, D], float32 or bfloat16, with R = G * Tq query rows per kv head, row
        r = g * Tq + t (t = r % Tq, Tq = queries_per_head); D a multiple of 128.
      k, v: [B, K, S, D] in q.dtype, the cache; S a multiple of block_kv. Positions at or past
        lengths[b] may hold anything (NaN included). With a page_table: a page pool
        [1, K, P * block_kv, D] shared by all sequences, page p of kv head h being
        k[0, h, p * block_kv:(p + 1) * block_kv].
      block_indices: int32 [B, K, nb]: the kv blocks (of block_kv positions) to read, listed
        first, ascending, then padding (any valid block id; never read as a listed block).
        With a page_table: logical block ids in [0, max_pages).
      block_counts: int32 [B, K] in [0, nb]: the number of listed leading entries.
      lengths: int32 [B] in [0, S] (in [0, max_pages * block_kv] with a page_table, checked
        when concrete): valid (logical) cache positions of each sequence.
      scale: multiplies q.k.
      softcap: None or c > 0 for logits -> c * tanh(logits / c).
      queries_per_head: Tq. Query t of sequence b sits at position lengths[b] - Tq + t and sees
        key position p iff p is in a listed block, p < lengths[b] and p <= lengths[b] - Tq + t.
      block_kv: kv block size, a multiple of 128.
      num_splits: P, grid instances per (b, kv head) sharing the block list (split-K, so that
        B * K * P instances can fill the cores); each takes ceil(nb / P) consecutive entries,
        merged by log-sum-exp in the wrapper.
      interpret: True (or ``pltpu.InterpretParams``) to run in the TPU interpreter on CPU.
      page_table: None (k, v are contiguous caches) or int32 [B, max_pages]: logical block j of
        sequence b lives in pool page page_table[b, j] (pages are blocks: page size = block_kv).
        Only the entries of live listed blocks are read, plus entry block_indices[b, h, 0] of a
        (b, h) with nothing live (its page is copied, never computed); entries are clipped into
        [0, P), so the others may hold anything. Positions and the mask are logical.

    Returns:
      (o [B, K, R, D] in q.dtype, lse [B, K, R] float32); a row that sees nothing gives o = 0
      and lse = -inf, never NaN.

    Raises:
      ValueError: naming the argument, on bad ranks, shapes, dtypes, block_kv, head dim,
        queries_per_head, num_splits, softcap, scale or page_table (k, v must then be a pool
        with k.shape[0] == 1).
    """
    batch, kv_heads, rows, kv_len, head_dim, num_entries = check_decode_attention_inputs(
        q, k, v, block_indices, block_counts, lengths, scale, softcap, queries_per_head,
        block_kv, num_splits, check_support, page_table=page_table,
    )  # kv_len: the logical cache length (max_pages * block_kv with a page table).
    if num_entries == 0:  # Keep the grid non-empty so that the outputs are written.
        block_indices = jnp.zeros((batch, kv_heads, 1), jnp.int32)
        num_entries = 1
    flat_indices, flat_counts, lengths = _kernel_metadata(
        block_indices, block_counts, lengths, kv_len=kv_len, block_kv=block_kv
    )
    steps = pl.cdiv(num_entries, num_splits)
    row_tile = _SUBLANES * (4 // jnp.dtype(q.dtype).itemsize)
    padded_rows = pl.cdiv(rows, row_tile) * row_tile
    q_padded = jnp.pad(q, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))
    part_dtype = q.dtype if num_splits == 1 else jnp.float32

    def head_index_map(b, h, split, step, *_):
        return b, h, 0, 0

    def split_index_map(b, h, split, step, *_):
        return b, h, split, 0, 0

    prefetch = [flat_indices, flat_counts, lengths]
    if page_table is None:
        index_map = kv_block_index_map(kv_heads, steps, num_entries)
    else:
        index_map = kv_block_index_map(
            kv_heads, steps, num_entries, max_pages=page_table.shape[1],
            num_pages=k.shape[2] // block_kv,
        )
        prefetch.append(page_table.reshape(-1))
    kv_spec = pl.BlockSpec((None, None, block_kv, head_dim), index_map)
    kernel = functools.partial(
        _forward_kernel, scale=float(scale), softcap=None if softcap is None else float(softcap),
        block_kv=block_kv, queries_per_head=queries_per_head,
        group_size=rows // queries_per_head, steps=steps, width=num_entries,
        paged=page_table is not None,
    )
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, padded_rows, head_dim), part_dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, padded_rows, 1), jnp.float32),
        ],
        grid_spec=compat.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(batch, kv_heads, num_splits, steps),
            in_specs=[
                pl.BlockSpec((None, None, padded_rows, head_dim), head_index_map),
                kv_spec,
                kv_spec,
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, padded_rows, head_dim), split_index_map),
                pl.BlockSpec((None, None, None, padded_rows, 1), split_index_map),
            ],
            scratch_shapes=[
                compat.VMEM((padded_rows, 1), jnp.float32),
                compat.VMEM((padded_rows, 1), jnp.float32),
                compat.VMEM((padded_rows, head_dim), jnp.float32),
            ],
        ),
        compiler_params=compat.TPUCompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=compat.tpu_interpret_value(interpret),
        name=FORWARD_NAME,
    )(*prefetch, q_padded, k, v)
    o_parts, lse_parts = o_parts[:, :, :, :rows], lse_parts[:, :, :, :rows, 0]
    if num_splits == 1:
        o, lse = o_parts[:, :, 0], lse_parts[:, :, 0]
    else:
        o, lse = merge_splits(o_parts, lse_parts)
    return o.astype(q.dtype), lse
