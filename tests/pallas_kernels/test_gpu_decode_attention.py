"""GPU (Triton-backend) block-sparse decode attention against a dense reference,
in interpret mode (compiled when run on a GPU: `make test-gpu`).

The reference is built here, independently of ``jaxsparse``: a dense float64 numpy attention
under the mask "key position in a listed block, before the sequence length, and at or before the
query's position (lengths[b] - Tq + t)". The kernel gets the same inputs with every byte it must
not read poisoned with NaN: the blocks that padding entries point at, and the cache tail at or
past each sequence's length. The reference sees clean arrays, so any leak shows as a mismatch.

Paged caches: the same lists read through a page table from a shuffled, NaN-poisoned page pool
must give exactly the contiguous kernel's output on the cache the table gathers.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tests.pallas_kernels.paging import gather_pages, listed_blocks, paginate
from pallas_kernels.common import compat
from tests.backend import GPU_INTERPRET, float32_tolerance
from pallas_kernels.gpu.decode_attention import (
    FORWARD_NAME,
    check_support,
    decode_attention_forward,
)

pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")

BATCH, KV_HEADS, CACHE_LEN = 2, 2, 256
EMPTY_HEAD = (0, 1)  # (b, h) whose random block list is empty.


def reference_decode(q, k, v, block_indices, block_counts, lengths, *, scale, softcap,
                     queries_per_head, block_kv):
    """Dense float64 decode attention; returns (o [B, K, R, D], lse [B, K, R]), o = 0 and
    lse = -inf on rows that see nothing."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, kv_heads, rows, _ = q.shape
    positions = np.arange(k.shape[2])
    query_offset = np.arange(rows) % queries_per_head - queries_per_head  # t - Tq
    mask = np.zeros((batch, kv_heads, rows, k.shape[2]), bool)
    for b in range(batch):
        for h in range(kv_heads):
            listed = np.zeros(k.shape[2], bool)
            for block in block_indices[b, h, : block_counts[b, h]]:
                listed[block * block_kv: (block + 1) * block_kv] = True
            query_pos = lengths[b] + query_offset
            mask[b, h] = (
                listed[None] & (positions[None] < lengths[b])
                & (positions[None] <= query_pos[:, None])
            )
    s = np.einsum("bhrd,bhsd->bhrs", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    s = np.where(mask, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    row_max = np.where(np.isneginf(row_max), 0.0, row_max)
    p = np.exp(s - row_max)
    row_sum = p.sum(axis=-1, keepdims=True)
    safe_sum = np.where(row_sum == 0.0, 1.0, row_sum)
    o = np.einsum("bhrs,bhsd->bhrd", p, v) / safe_sum
    lse = np.where(row_sum == 0.0, -np.inf, row_max + np.log(safe_sum))[..., 0]
    return o, lse


def make_case(rng, *, groups, queries_per_head, head_dim, block_kv, lengths, pattern, dtype):
    """Random inputs and block lists.

    pattern "full": every block listed (dense decode). pattern "random": a random ascending
    subset leaving at least one block out (EMPTY_HEAD lists none; head 0 always lists the block
    holding position lengths[b] - 1, which ends mid-block); padding points at an unlisted block.

    Returns:
      (clean, poisoned, block_indices, block_counts, lengths): clean = (q, k, v) for the
      reference, poisoned = (q, k, v) for the kernel, with the padding target blocks and the
      cache tail past lengths[b] set to NaN.
    """
    num_blocks = CACHE_LEN // block_kv
    rows = groups * queries_per_head
    cache_shape = (BATCH, KV_HEADS, CACHE_LEN, head_dim)
    q, k, v = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((BATCH, KV_HEADS, rows, head_dim), cache_shape, cache_shape)
    )
    # Round to the kernel dtype first, so the reference sees the kernel's exact inputs.
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    k_bad, v_bad = k.copy(), v.copy()
    indices = np.zeros((BATCH, KV_HEADS, num_blocks), np.int32)
    counts = np.zeros((BATCH, KV_HEADS), np.int32)
    for b in range(BATCH):
        k_bad[b, :, lengths[b]:] = np.nan
        v_bad[b, :, lengths[b]:] = np.nan
        for h in range(KV_HEADS):
            if pattern == "full":
                ids = np.arange(num_blocks)
            elif (b, h) == EMPTY_HEAD:
                ids = np.array([], np.int64)
            else:
                size = rng.integers(1, num_blocks)
                ids = rng.choice(num_blocks, size=size, replace=False)
                if h == 0 and lengths[b] > 0:
                    last_valid = (lengths[b] - 1) // block_kv
                    if last_valid not in ids:
                        ids[0] = last_valid
                ids = np.sort(ids)
            indices[b, h, : ids.size] = ids
            counts[b, h] = ids.size
            if ids.size < num_blocks:
                padding = np.setdiff1d(np.arange(num_blocks), ids)[0]
                indices[b, h, ids.size:] = padding
                k_bad[b, h, padding * block_kv: (padding + 1) * block_kv] = np.nan
                v_bad[b, h, padding * block_kv: (padding + 1) * block_kv] = np.nan
    clean = (q, k, v)
    poisoned = tuple(jnp.asarray(x, dtype) for x in (q, k_bad, v_bad))
    return clean, poisoned, indices, counts, np.asarray(lengths, np.int32)


CASES = [  # groups, queries_per_head, head_dim, block_kv, num_splits, softcap, pattern, lengths
    (1, 1, 32, 32, 1, None, "random", (200, 77)),
    (4, 1, 64, 64, 3, None, "random", (256, 1)),  # 4 blocks, 3 splits: the last split is empty.
    (1, 3, 64, 32, 3, None, "full", (3, 131)),  # length == Tq: query 0 sees position 0 only.
    (4, 3, 32, 64, 1, 2.0, "random", (100, 250)),
    (4, 3, 64, 32, 3, 2.0, "full", (45, 256)),
]


def run_and_compare(groups, queries_per_head, head_dim, block_kv, num_splits, softcap, pattern,
                    lengths, *, dtype=jnp.float32, atol=float32_tolerance(2e-5),
                    rtol=float32_tolerance(2e-5), seed=0):
    rng = np.random.default_rng(seed)
    clean, poisoned, indices, counts, lengths = make_case(
        rng, groups=groups, queries_per_head=queries_per_head, head_dim=head_dim,
        block_kv=block_kv, lengths=lengths, pattern=pattern, dtype=dtype,
    )
    kwargs = dict(scale=head_dim ** -0.5, softcap=softcap, queries_per_head=queries_per_head)
    o, lse = decode_attention_forward(
        *poisoned, jnp.asarray(indices), jnp.asarray(counts), jnp.asarray(lengths),
        block_kv=block_kv, num_splits=num_splits, interpret=GPU_INTERPRET, **kwargs,
    )
    assert o.dtype == dtype and o.shape == clean[0].shape
    assert lse.dtype == jnp.float32 and lse.shape == clean[0].shape[:3]
    o, lse = np.asarray(o.astype(jnp.float32)), np.asarray(lse)
    o_ref, lse_ref = reference_decode(
        *clean, indices, counts, lengths, block_kv=block_kv, **kwargs
    )
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(o, o_ref, atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse, lse_ref, atol=atol, rtol=rtol)  # -inf must match exactly.
    if pattern == "random":
        assert np.all(o[EMPTY_HEAD] == 0.0) and np.all(np.isneginf(lse[EMPTY_HEAD]))
    return o, lse


@pytest.mark.parametrize(
    "groups, queries_per_head, head_dim, block_kv, num_splits, softcap, pattern, lengths", CASES
)
def test_matches_reference(groups, queries_per_head, head_dim, block_kv, num_splits, softcap,
                           pattern, lengths):
    run_and_compare(groups, queries_per_head, head_dim, block_kv, num_splits, softcap, pattern,
                    lengths)


def test_bfloat16():
    # The reference sees the same bf16-rounded q, k, v in float64; the kernel additionally
    # rounds p to bf16 before p @ v (and o to bf16 at the end): ~2^-8 relative per term.
    run_and_compare(4, 3, 64, 32, 3, 2.0, "random", (200, 77), dtype=jnp.bfloat16,
                    atol=2e-2, rtol=2e-2, seed=1)


def test_nothing_listed_anywhere():
    """Zero-length block lists (nb = 0) and all-zero counts: o = 0, lse = -inf, no NaN."""
    q = jnp.ones((BATCH, KV_HEADS, 2, 32), jnp.float32)
    k = jnp.full((BATCH, KV_HEADS, 64, 32), jnp.nan, jnp.float32)
    counts = jnp.zeros((BATCH, KV_HEADS), jnp.int32)
    lengths = jnp.array([64, 10], jnp.int32)
    for indices, num_splits in ((jnp.zeros((BATCH, KV_HEADS, 0), jnp.int32), 1),
                                (jnp.zeros((BATCH, KV_HEADS, 2), jnp.int32), 3)):
        o, lse = decode_attention_forward(
            q, k, k, indices, counts, lengths, scale=1.0, queries_per_head=2, block_kv=32,
            num_splits=num_splits, interpret=GPU_INTERPRET,
        )
        assert np.all(np.asarray(o) == 0.0) and np.all(np.isneginf(np.asarray(lse)))


def _args(**overrides):
    args = dict(
        q=jnp.zeros((2, 2, 3, 32), jnp.float32),
        k=jnp.zeros((2, 2, 128, 32), jnp.float32),
        v=jnp.zeros((2, 2, 128, 32), jnp.float32),
        block_indices=jnp.zeros((2, 2, 4), jnp.int32),
        block_counts=jnp.zeros((2, 2), jnp.int32),
        lengths=jnp.zeros((2,), jnp.int32),
        scale=1.0, queries_per_head=3, block_kv=32,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, match", [
    (dict(q=jnp.zeros((2, 3, 32))), "q must be"),
    (dict(k=jnp.zeros((2, 1, 128, 32))), "k must be"),
    (dict(v=jnp.zeros((2, 2, 96, 32))), "v must have"),
    (dict(k=jnp.zeros((2, 2, 128, 32), jnp.bfloat16)), "share a dtype"),
    (dict(q=jnp.zeros((2, 2, 3, 32), jnp.float16), k=jnp.zeros((2, 2, 128, 32), jnp.float16),
          v=jnp.zeros((2, 2, 128, 32), jnp.float16)), "dtype must be .* got float16"),
    (dict(q=jnp.zeros((2, 2, 3, 24)), k=jnp.zeros((2, 2, 128, 24)), v=jnp.zeros((2, 2, 128, 24))),
     "head_dim .* got 24"),
    (dict(block_kv=48), "block_kv .* got 48"),
    (dict(block_kv=8), "block_kv .* got 8"),
    (dict(k=jnp.zeros((2, 2, 112, 32)), v=jnp.zeros((2, 2, 112, 32))), "S=112 .* block_kv=32"),
    (dict(queries_per_head=2), "queries_per_head"),
    (dict(queries_per_head=0), "queries_per_head"),
    (dict(num_splits=0), "num_splits"),
    (dict(softcap=0.0), "softcap"),
    (dict(block_indices=jnp.zeros((2, 4), jnp.int32)), "block_indices must be"),
    (dict(block_indices=jnp.zeros((2, 2, 4), jnp.int64 if jax.config.x64_enabled else jnp.int16)),
     "block_indices must be int32"),
    (dict(block_counts=jnp.zeros((2,), jnp.int32)), "block_counts must be"),
    (dict(block_counts=jnp.zeros((2, 2), jnp.float32)), "block_counts must be int32"),
    (dict(lengths=jnp.zeros((3,), jnp.int32)), "lengths must be"),
    (dict(lengths=jnp.zeros((2,), jnp.uint32)), "lengths must be int32"),
])
def test_rejects_bad_inputs(overrides, match):
    with pytest.raises(ValueError, match=match):
        decode_attention_forward(**_args(**overrides))


def test_check_support():
    check_support(128, 64, jnp.bfloat16)
    check_support(16, 16, jnp.float32)
    with pytest.raises(ValueError, match="head_dim .* got 96"):
        check_support(96, 64, jnp.float32)
    with pytest.raises(ValueError, match="block_kv .* got 100"):
        check_support(64, 100, jnp.float32)
    with pytest.raises(ValueError, match="got float16"):
        check_support(64, 64, jnp.float16)


def test_lowers_to_triton_without_a_gpu():
    """Lowering for CUDA runs the Pallas Triton lowering on CPU (rejecting gathers, value slices,
    non-power-of-two loads and tl.dot shapes below 16). B = 3, S = 192 and nb = 3 are not powers
    of two; R = 1 (padded to 16), R = 12 (Tq = 3, padded to 16) and R = 40 (padded to 64); one
    and three splits; float32 and bfloat16 with softcap."""
    batch, kv_heads, kv_len, num_entries = 3, 2, 192, 3
    configs = [  # rows, queries_per_head, head_dim, block_kv, num_splits, softcap, dtype
        (1, 1, 64, 64, 1, None, jnp.float32),
        (12, 3, 128, 32, 3, 30.0, jnp.bfloat16),
        (40, 4, 32, 16, 3, None, jnp.float32),
    ]
    indices = jnp.zeros((batch, kv_heads, num_entries), jnp.int32)
    counts = jnp.zeros((batch, kv_heads), jnp.int32)
    lengths = jnp.zeros((batch,), jnp.int32)

    def kernels(indices, counts, lengths):
        outputs = []
        for rows, tq, head_dim, block_kv, num_splits, softcap, dtype in configs:
            q = jnp.zeros((batch, kv_heads, rows, head_dim), dtype)
            k = jnp.zeros((batch, kv_heads, kv_len, head_dim), dtype)
            outputs.append(decode_attention_forward(
                q, k, k, indices, counts, lengths, scale=0.125, softcap=softcap,
                queries_per_head=tq, block_kv=block_kv, num_splits=num_splits,
            ))
        return outputs

    with compat.triton_lowering_without_gpu():
        text = jax.jit(kernels).trace(indices, counts, lengths).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == len(configs) and FORWARD_NAME in text
    results = sorted(line.rsplit("-> ", 1)[1] for line in text.splitlines() if "gpu.triton" in line)
    assert results == sorted(
        f"(tensor<{batch}x{kv_heads}x{splits}x{padded}x{head_dim}xf32>, "
        f"tensor<{batch}x{kv_heads}x{splits}x{padded}xf32>)"
        for padded, head_dim, splits in ((16, 64, 1), (16, 128, 3), (64, 32, 3))
    )


# ----------------------------------------------------------------------------- paged caches

PAGED_BLOCK_KV, PAGED_HEAD_DIM = 16, 32  # CACHE_LEN = 256: max_pages = 16 logical blocks.


PAGED_CASES = [  # groups, queries_per_head, num_splits, softcap, pattern, lengths, dtype
    # Length 5 < block_kv: no shared page. EMPTY_HEAD has count 0, the others partial lists.
    (1, 1, 1, None, "random", (5, 131), jnp.float32),
    # Every block listed. Here and below block 0 is one page shared by both sequences.
    (4, 3, 2, 2.0, "full", (45, 256), jnp.float32),
    (2, 3, 2, 2.0, "random", (100, 250), jnp.bfloat16),
]


@pytest.mark.parametrize(
    "groups, queries_per_head, num_splits, softcap, pattern, lengths, dtype", PAGED_CASES
)
def test_paged_cache_equals_contiguous_cache(groups, queries_per_head, num_splits, softcap,
                                             pattern, lengths, dtype):
    """A shuffled page pool read through a page table gives exactly the contiguous kernel's
    output on the cache the table gathers, and matches the reference. Every pool byte that must
    not be read is NaN, and the entries of unmapped blocks are garbage (negative, out of range,
    or naming the NaN pages 0 and P - 1), so a stray read shows as NaN."""
    block_kv, head_dim = PAGED_BLOCK_KV, PAGED_HEAD_DIM
    rng = np.random.default_rng(10 + groups)
    (q, k, v), _, indices, counts, lengths = make_case(
        rng, groups=groups, queries_per_head=queries_per_head, head_dim=head_dim,
        block_kv=block_kv, lengths=lengths, pattern=pattern, dtype=dtype,
    )
    listed = listed_blocks(indices, counts, CACHE_LEN // block_kv)
    k, v, k_pool, v_pool, page_table = paginate(
        rng, k, v, listed, lengths, block_kv=block_kv,
        garbage=lambda shape, pages: rng.choice([-3, 0, pages - 1, pages + 5, 2**30], shape),
    )
    shared = page_table[0, 0] == page_table[1, 0]  # A prefix page, when both lengths pass it.
    assert shared == (min(lengths) >= block_kv)
    kwargs = dict(scale=head_dim ** -0.5, softcap=softcap, queries_per_head=queries_per_head)
    lists = tuple(jnp.asarray(x) for x in (indices, counts, lengths))

    def run(k, v, **extra):
        o, lse = decode_attention_forward(
            jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), *lists,
            block_kv=block_kv, num_splits=num_splits, interpret=GPU_INTERPRET, **kwargs, **extra,
        )
        return np.asarray(o.astype(jnp.float32)), np.asarray(lse)

    o, lse = run(k_pool, v_pool, page_table=jnp.asarray(page_table))
    o_contiguous, lse_contiguous = run(
        gather_pages(k_pool, page_table, block_kv), gather_pages(v_pool, page_table, block_kv)
    )
    np.testing.assert_array_equal(o, o_contiguous)
    np.testing.assert_array_equal(lse, lse_contiguous)
    o_ref, lse_ref = reference_decode(q, k, v, indices, counts, lengths, block_kv=block_kv,
                                      **kwargs)
    tolerance = float32_tolerance(2e-5) if dtype == jnp.float32 else 2e-2
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(o, o_ref, atol=tolerance, rtol=tolerance)
    np.testing.assert_allclose(lse, lse_ref, atol=tolerance, rtol=tolerance)
    if pattern == "random":
        assert np.all(o[EMPTY_HEAD] == 0.0) and np.all(np.isneginf(lse[EMPTY_HEAD]))


def _paged_args(**overrides):
    """Valid paged arguments: a pool of 4 pages of 32, max_pages 3, then ``overrides``."""
    args = _args(k=jnp.zeros((1, 2, 128, 32)), v=jnp.zeros((1, 2, 128, 32)),
                 page_table=jnp.zeros((2, 3), jnp.int32))
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, match", [
    (dict(k=jnp.zeros((2, 2, 128, 32)), v=jnp.zeros((2, 2, 128, 32))),
     r"k must be a page pool \[1, 2, P \* block_kv, 32\] when page_table is given"),
    (dict(v=jnp.zeros((1, 2, 96, 32))), "v must have"),
    (dict(k=jnp.zeros((1, 2, 112, 32)), v=jnp.zeros((1, 2, 112, 32))),
     r"page pool length k.shape\[2\]=112 .* block_kv=32"),
    (dict(page_table=jnp.zeros((2,), jnp.int32)), r"page_table must be \[2, max_pages\]"),
    (dict(page_table=jnp.zeros((3, 3), jnp.int32)), r"page_table must be \[2, max_pages\]"),
    (dict(page_table=jnp.zeros((2, 0), jnp.int32)), "max_pages >= 1"),
    (dict(page_table=jnp.zeros((2, 3), jnp.uint32)), "page_table must be int32, got uint32"),
    (dict(lengths=jnp.array([96, 97], jnp.int32)), r"lengths must lie in \[0, .* 96\]"),
    (dict(lengths=jnp.array([-1, 0], jnp.int32)), "lengths must lie in"),
])
def test_rejects_bad_paged_inputs(overrides, match):
    with pytest.raises(ValueError, match=match):
        decode_attention_forward(**_paged_args(**overrides))


def test_paged_lowers_to_triton_without_a_gpu():
    """The page-table load (a scalar at a loaded block id) and the pool slice lower to Triton;
    max_pages = 3 and P = 5 pages are not powers of two."""
    q = jnp.zeros((3, 2, 12, 64), jnp.bfloat16)
    pool = jnp.zeros((1, 2, 5 * 32, 64), jnp.bfloat16)

    def kernel(indices, counts, lengths, page_table):
        return decode_attention_forward(
            q, pool, pool, indices, counts, lengths, scale=0.125, softcap=30.0,
            queries_per_head=3, block_kv=32, num_splits=2, page_table=page_table,
        )

    traced = jax.jit(kernel).trace(
        jnp.zeros((3, 2, 3), jnp.int32), jnp.zeros((3, 2), jnp.int32),
        jnp.zeros((3,), jnp.int32), jnp.zeros((3, 3), jnp.int32),
    )
    with compat.triton_lowering_without_gpu():
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1 and FORWARD_NAME in text
