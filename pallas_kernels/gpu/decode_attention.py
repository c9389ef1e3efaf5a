"""Block-sparse decode attention over a KV cache for GPUs (Pallas, Triton backend), forward only.

Decode (and short multi-token decode, e.g. speculative verification) reads a long KV cache with a
handful of query rows per kv head. The work is bandwidth bound, so the kernel is built around the
K/V reads: one kernel instance per (batch, kv head, split) loads each listed kv block of its share
of the list once and applies it to all G * Tq query rows that share the kv head (GQA rows are
stacked, not looped), in the spirit of flash-decoding (Dao et al., 2023) with split-K over the
block list.

Layout (internal, padded by the wrapper):
  q: [B, K, Rp, D], R = G * Tq rows per kv head (row r = g * Tq + t), zero rows past R up to
    Rp = max(16, next power of two >= R).
  k, v: [B, K, S, D], whole in every instance; each step loads one tile with
    ``pl.ds(block_id * block_kv, block_kv)``.
  block_indices: int32 [B, K, nb]; block_counts: int32 [B, K]; lengths: int32 [B].
  Partial outputs: o float32 [B, K, P, Rp, D], lse float32 [B, K, P, Rp], P = num_splits.

Grid (B, K, P). With c = ceil(nb / P), instance (b, h, s) walks list entries
[s * c, min((s + 1) * c, block_counts[b, h])) with a ``lax.fori_loop`` whose trip count is read
at run time (possibly zero) and runs an online softmax in float32 over them. Per tile, with
L = lengths[b], query row r at position L - Tq + (r % Tq) and key position p:
  s = scale * q @ k.T;  s = c * tanh(s / c) if softcap c
  s = where(p < L and p <= L - Tq + r % Tq and r < R, s, -inf)
Padded rows (r >= R) see nothing. Every instance writes its partial (o, lse), an empty one
o = 0 and lse = -inf, so no output block is left unwritten. The wrapper merges the P partials by
log-sum-exp (weights exp(lse_s - max), with max -> 0 when every split is empty, so an empty
merge gives o = 0, lse = -inf and no NaN) and casts o to q.dtype.

Paged caches (``page_table`` int32 [B, max_pages]): k and v are then one page pool
[1, K, P * block_kv, D] shared by all sequences (the BlockSpec's batch index is always 0), pages
are blocks, and block_indices hold logical block ids. A step reads the scalar
page_table[b, block] (clipped into [0, P)) and slices ``pl.ds(page * block_kv, block_kv)`` from
the pool; the mask keeps using the logical start block * block_kv. Only the page-table entries of
listed blocks are read.

Only listed entries below block_counts are read, so padding entries may point at anything valid
(blocks full of NaN included). Cache positions at or past lengths[b] inside a listed block may
hold stale data, NaN included: K there is hidden by the ``where`` on s, and V rows there are
zeroed before the p @ v product (0 * NaN would otherwise poison the row).

Products: q rows are padded to Rp >= 16 so that both products are ``tl.dot`` (every dim >= 16),
as in JAX's own ``ops/gpu/decode_attention``. The padding costs only q-side traffic and
registers (q and the partial outputs are tiny next to the K/V tiles), not K/V bandwidth; the
alternative, a broadcast-multiply-and-reduce for R < 16 (as in ``sparse_ffn``), would hold an
[Rp, block_kv, D] float32 intermediate per tile. Matmuls run in the input dtype with float32
accumulation (TF32 for float32 inputs on GPU); p is rounded to v.dtype before p @ v.

Triton limits: head_dim and block_kv are powers of two >= 16; S is a multiple of block_kv (need
not be a power of two); nb and B, K need not be powers of two. dtypes float32 and bfloat16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import compat
from pallas_kernels.common.tiles import matmul
from pallas_kernels.gpu import online_softmax
from pallas_kernels.common.decode_attention_inputs import check_decode_attention_inputs, merge_splits

FORWARD_NAME = "jaxsparse_decode_attention_fwd"

_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MIN_DOT_ROWS = 16  # tl.dot needs every dim >= 16: q rows are padded up to this.


def _is_pow2_at_least_16(n: int) -> bool:
    return isinstance(n, int) and n >= 16 and n & (n - 1) == 0


def check_support(head_dim: int, block_kv: int, dtype) -> None:
    """Raises ValueError unless the kernel supports this head dim, kv block size and dtype."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(
            f"decode_attention: dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}."
        )
    if not _is_pow2_at_least_16(head_dim):
        raise ValueError(
            f"decode_attention: head_dim must be a power of two >= 16, got {head_dim}."
        )
    if not _is_pow2_at_least_16(block_kv):
        raise ValueError(
            f"decode_attention: block_kv must be a power of two >= 16, got {block_kv}."
        )


def _decode_kernel(
    q_ref, k_ref, v_ref, indices_ref, counts_ref, lengths_ref, *refs,
    scale, softcap, rows, queries_per_head, block_kv, entries_per_split, num_pages,
):
    """One (batch, kv head, split): online softmax over the split's share of the block list.

    Refs: q [Rp, D]; k, v [S, D] (the page pool [P * block_kv, D] when paged); indices [nb];
    counts []; lengths []; then, when paged (num_pages = P is not None), the sequence's page
    table row [max_pages]; outputs o [Rp, D] and lse [Rp], float32.
    """
    if num_pages is None:
        pages_ref, (o_ref, lse_ref) = None, refs
    else:
        pages_ref, o_ref, lse_ref = refs
    padded_rows = q_ref.shape[0]
    first = pl.program_id(2) * entries_per_split
    last = jnp.minimum(first + entries_per_split, counts_ref[...])
    length = lengths_ref[...]
    q = q_ref[...]

    # Query position of each row, [Rp, 1]-like via a full [Rp, block_kv] iota (no value slicing
    # in the Triton lowering). Padded rows get -1: no key position is <= -1.
    row = lax.broadcasted_iota(jnp.int32, (padded_rows, block_kv), 0)
    query_pos = length - queries_per_head + (row % queries_per_head if queries_per_head > 1 else 0)
    query_pos = jnp.where(row < rows, query_pos, -1)
    column = lax.broadcasted_iota(jnp.int32, (padded_rows, block_kv), 1)
    v_row = lax.broadcasted_iota(jnp.int32, (block_kv, v_ref.shape[1]), 0)

    def visit_block(entry, carry):
        block = indices_ref[entry]  # Logical block id: the mask works on logical positions.
        start = pl.multiple_of(block * block_kv, block_kv)
        if pages_ref is None:
            kv_slice = pl.ds(start, block_kv)
        else:  # Physical page, clipped so that a stray entry never reads out of bounds.
            page = jnp.minimum(jnp.maximum(pages_ref[block], 0), num_pages - 1)
            kv_slice = pl.ds(pl.multiple_of(page * block_kv, block_kv), block_kv)
        s = matmul(q, k_ref[kv_slice, :], transpose_b=True) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        key_pos = start + column
        s = jnp.where((key_pos <= query_pos) & (key_pos < length), s, -jnp.inf)
        # Stale cache rows (at or past the length) may hold NaN: 0 * NaN would leak into p @ v.
        v = jnp.where(start + v_row < length, v_ref[kv_slice, :], 0)
        return online_softmax.step(carry, s, v)

    init = online_softmax.init(padded_rows, o_ref.shape[1])
    carry = lax.fori_loop(first, jnp.maximum(first, last), visit_block, init)
    o_ref[...], lse_ref[...] = online_softmax.finish(carry)


def decode_attention_forward(
    q, k, v, block_indices, block_counts, lengths, *, scale: float,
    softcap: float | None = None, queries_per_head: int = 1, block_kv: int = 64,
    num_splits: int = 1, num_warps: int = 4, num_stages: int = 2, interpret: bool = False,
    page_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention of a few query rows per kv head over a KV cache.

    Args:
      q: [B, K, R, D], float32 or bfloat16, with R = G * Tq query rows per kv head, row
        r = g * Tq + t (t = r % Tq, Tq = queries_per_head).
      k, v: [B, K, S, D] in q.dtype, the cache; S a multiple of block_kv. With a page_table:
        a page pool [1, K, P * block_kv, D] shared by all sequences, page p of kv head h being
        k[0, h, p * block_kv:(p + 1) * block_kv].
      block_indices: int32 [B, K, nb]: the kv blocks (of block_kv positions) to read, listed
        first, ascending, then padding (any valid block id; never read). With a page_table:
        logical block ids in [0, max_pages).
      block_counts: int32 [B, K] in [0, nb]: the number of listed leading entries.
      lengths: int32 [B] in [0, S] (in [0, max_pages * block_kv] with a page_table, checked
        when concrete): valid (logical) cache positions of each sequence.
      scale: multiplies q.k.
      softcap: None or c > 0 for logits -> c * tanh(logits / c).
      queries_per_head: Tq. Query t of sequence b sits at position lengths[b] - Tq + t and sees
        key position p iff p is in a listed block, p < lengths[b] and p <= lengths[b] - Tq + t.
      block_kv: kv block size, a power of two >= 16.
      num_splits: P, instances per (b, kv head) sharing the block list (split-K); each takes
        ceil(nb / P) consecutive entries, merged by log-sum-exp in the wrapper.
      num_warps, num_stages: Triton launch settings; interpret: run on CPU.
      page_table: None (k, v are contiguous caches) or int32 [B, max_pages]: logical block j of
        sequence b lives in pool page page_table[b, j] (pages are blocks: page size = block_kv).
        Only the entries of listed blocks are read (clipped into [0, P), so a stray entry reads
        a wrong page but never out of bounds); the others may hold anything. Positions and the
        mask are logical: position j * block_kv + i is visible under the rule above.

    Returns:
      (o [B, K, R, D] in q.dtype, lse [B, K, R] float32); a row that sees nothing gives o = 0
      and lse = -inf, never NaN.

    Raises:
      ValueError: naming the argument, on bad ranks, shapes, dtypes, block_kv, head dim,
        queries_per_head, num_splits, softcap or page_table (k, v must then be a pool with
        k.shape[0] == 1).
    """
    batch, kv_heads, rows, _, head_dim, num_entries = check_decode_attention_inputs(
        q, k, v, block_indices, block_counts, lengths, scale, softcap, queries_per_head,
        block_kv, num_splits, check_support, page_table=page_table,
    )
    kv_len = k.shape[2]  # The cache, or the page pool.
    if num_entries == 0:  # A zero-size block is not loadable; one padding entry, never read.
        block_indices = jnp.zeros((batch, kv_heads, 1), jnp.int32)
        num_entries = 1
    padded_rows = max(_MIN_DOT_ROWS, 1 << max(0, rows - 1).bit_length())
    q_padded = jnp.pad(q, ((0, 0), (0, 0), (0, padded_rows - rows), (0, 0)))
    kernel = functools.partial(
        _decode_kernel, scale=float(scale), softcap=None if softcap is None else float(softcap),
        rows=rows, queries_per_head=queries_per_head, block_kv=block_kv,
        entries_per_split=-(-num_entries // num_splits),
        num_pages=None if page_table is None else kv_len // block_kv,
    )
    # A contiguous cache is read at batch b; the page pool (batch 1) always at 0.
    cache_batch = (lambda b: b) if page_table is None else (lambda b: 0)
    in_specs = [
        pl.BlockSpec((None, None, padded_rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (cache_batch(b), h, 0, 0)),
        pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, s: (cache_batch(b), h, 0, 0)),
        pl.BlockSpec((None, None, num_entries), lambda b, h, s: (b, h, 0)),
        pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
        pl.BlockSpec((None,), lambda b, h, s: (b,)),
    ]
    operands = [q_padded, k, v, block_indices, block_counts, lengths]
    if page_table is not None:
        in_specs.append(pl.BlockSpec((None, page_table.shape[1]), lambda b, h, s: (b, 0)))
        operands.append(page_table)
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec(
                (None, None, None, padded_rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)
            ),
            pl.BlockSpec((None, None, None, padded_rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(
                (batch, kv_heads, num_splits, padded_rows, head_dim), jnp.float32
            ),
            jax.ShapeDtypeStruct((batch, kv_heads, num_splits, padded_rows), jnp.float32),
        ],
        compiler_params=compat.TritonCompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=FORWARD_NAME,
    )(*operands)
    o_parts, lse_parts = o_parts[:, :, :, :rows], lse_parts[:, :, :, :rows]
    if num_splits == 1:
        o, lse = o_parts[:, :, 0], lse_parts[:, :, 0]
    else:
        o, lse = merge_splits(o_parts, lse_parts)
    return o.astype(q.dtype), lse
