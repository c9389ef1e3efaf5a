"""Block-sparse decode attention TPU kernel, run in the TPU interpreter on CPU.

The reference is dense float64 numpy attention written from the op's definition, independent of
``jaxsparse``: a [B, K, R, S] visibility mask built from the listed blocks, the lengths and the
causal rule of multi-token decode (query t of sequence b sits at lengths[b] - Tq + t).

Paged caches: the same lists read through a page table from a shuffled, NaN-poisoned page pool
(unmapped blocks' entries out of range) must give exactly the contiguous kernel's output on the
cache the table gathers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import compat
from tests.pallas_kernels.paging import gather_pages, paginate
from pallas_kernels.tpu.decode_attention import (
    FORWARD_NAME,
    check_support,
    decode_attention_forward,
    kv_block_index_map,
    live_counts,
)

pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")

BATCH, KV_HEADS, HEAD_DIM, CACHE_LEN, BLOCK_KV = 2, 2, 128, 512, 128
NUM_BLOCKS = CACHE_LEN // BLOCK_KV

# atol = rtol by dtype. Float32 matmuls are exact float32 in the interpreter. In bfloat16 q, k
# and v are rounded identically for kernel and reference, but the kernel also rounds p to
# bfloat16 before p @ v and rounds o (8 mantissa bits each), so it is compared at about 2**-6.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    groups: int = 1  # G query heads per kv head
    queries: int = 1  # Tq query positions per sequence
    # Listed blocks per (b, kv head): "random" picks counts[b][h] random ascending blocks,
    # "full" lists every block (dense decode).
    lists: str = "random"
    counts: tuple[tuple[int, ...], ...] = ((2, 0), (3, 1))
    width: int = 3  # nb, list entries per (b, kv head)
    lengths: tuple[int, ...] = (300, 450)  # both end mid-block
    num_splits: int = 1
    softcap: float | None = None
    dtype: type = jnp.float32
    # Poison: unlisted blocks and every position at or past the length hold NaN in k and v, and
    # padding entries point at NaN blocks; the clean (reference) inputs hold random numbers there.
    poison: bool = False
    seed: int = 0


def make_inputs(case: Case):
    """(clean inputs, kernel inputs, listed) as numpy; listed: bool [B, K, NUM_BLOCKS]."""
    rng = np.random.default_rng(case.seed)
    rows = case.groups * case.queries
    q = rng.normal(size=(BATCH, KV_HEADS, rows, HEAD_DIM))
    k, v = (rng.normal(size=(BATCH, KV_HEADS, CACHE_LEN, HEAD_DIM)) for _ in range(2))
    q, k, v = (np.asarray(jnp.asarray(x, case.dtype), np.float64) for x in (q, k, v))
    indices = np.zeros((BATCH, KV_HEADS, case.width), np.int32)
    counts = np.zeros((BATCH, KV_HEADS), np.int32)
    listed = np.zeros((BATCH, KV_HEADS, NUM_BLOCKS), bool)
    for b, h in np.ndindex(BATCH, KV_HEADS):
        if case.lists == "full":
            blocks = np.arange(NUM_BLOCKS)
        else:
            blocks = np.sort(rng.permutation(NUM_BLOCKS)[: case.counts[b][h]])
        count = len(blocks)
        unlisted = np.setdiff1d(np.arange(NUM_BLOCKS), blocks)
        pool = unlisted if case.poison and len(unlisted) else np.arange(NUM_BLOCKS)
        indices[b, h, :count] = blocks
        indices[b, h, count:] = rng.choice(pool, case.width - count)
        counts[b, h] = count
        listed[b, h, blocks] = True
    lengths = np.array(case.lengths, np.int32)
    clean = dict(q=q, k=k, v=v, block_indices=indices, block_counts=counts, lengths=lengths)
    kernel = dict(clean)
    if case.poison:
        position = np.arange(CACHE_LEN)
        hidden = ~listed[..., position // BLOCK_KV] | (position >= lengths[:, None, None])
        kernel["k"] = np.where(hidden[..., None], np.nan, k)
        kernel["v"] = np.where(hidden[..., None], np.nan, v)
    return clean, kernel, listed


def reference_decode(inputs, listed, *, queries, softcap):
    """Dense float64 attention with safe empty rows: (o [B, K, R, D], lse [B, K, R])."""
    q, k, v, lengths = inputs["q"], inputs["k"], inputs["v"], inputs["lengths"]
    rows = q.shape[2]
    position = np.arange(CACHE_LEN)
    query_pos = lengths[:, None] - queries + np.arange(rows)[None, :] % queries  # [B, R]
    visible = (
        listed[:, :, None, position // BLOCK_KV]
        & (position < lengths[:, None, None, None])
        & (position <= query_pos[:, None, :, None])
    )
    logits = np.einsum("bkrd,bksd->bkrs", q, k) * HEAD_DIM**-0.5
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    logits = np.where(visible, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(logits - row_max)
    row_sum = weights.sum(-1, keepdims=True)
    safe_sum = np.where(row_sum > 0, row_sum, 1.0)
    o = weights @ v / safe_sum
    lse = np.where(row_sum > 0, row_max + np.log(safe_sum), -np.inf)[..., 0]
    return o, lse, visible.any(-1)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "softcap", "queries_per_head", "block_kv", "num_splits", "interpret"),
)
def run_kernel(q, k, v, block_indices, block_counts, lengths, **settings):
    return decode_attention_forward(q, k, v, block_indices, block_counts, lengths, **settings)


def assert_matches_reference(case: Case, interpret=None):
    clean, kernel_inputs, listed = make_inputs(case)
    floats = {name: jnp.asarray(kernel_inputs[name], case.dtype) for name in ("q", "k", "v")}
    ints = {
        name: jnp.asarray(kernel_inputs[name])
        for name in ("block_indices", "block_counts", "lengths")
    }
    o, lse = run_kernel(
        **floats, **ints, scale=HEAD_DIM**-0.5, softcap=case.softcap,
        queries_per_head=case.queries, block_kv=BLOCK_KV, num_splits=case.num_splits,
        interpret=interpret or compat.tpu_interpret_params(),
    )
    return check_against_reference(case, o, lse, clean, listed)


def check_against_reference(case: Case, o, lse, clean, listed):
    """Asserts the kernel's (o, lse) match the reference on the clean inputs; returns them as
    float64 numpy with the rows that see something."""
    rows = case.groups * case.queries
    assert o.dtype == case.dtype and o.shape == (BATCH, KV_HEADS, rows, HEAD_DIM)
    assert lse.dtype == jnp.float32 and lse.shape == (BATCH, KV_HEADS, rows)
    o, lse = np.asarray(o, np.float64), np.asarray(lse, np.float64)
    ref_o, ref_lse, sees = reference_decode(
        clean, listed, queries=case.queries, softcap=case.softcap
    )
    tolerance = TOLERANCES[case.dtype]
    assert np.isfinite(o).all(), "o must never be NaN or inf"
    np.testing.assert_allclose(o, ref_o, atol=tolerance, rtol=tolerance)
    np.testing.assert_allclose(lse, ref_lse, atol=tolerance, rtol=tolerance)
    # Rows that see nothing: exactly o = 0 and lse = -inf; every other lse is finite.
    assert (o[~sees] == 0).all() and (lse[~sees] == -np.inf).all()
    assert np.isfinite(lse[sees]).all()
    return o, lse, sees


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "groups, queries, num_splits", [(1, 1, 1), (4, 1, 2), (1, 3, 2), (4, 3, 1)]
)
def test_random_block_lists(groups, queries, num_splits):
    """Random ascending lists of width 3 (so two splits take 2 + 1 entries plus a padding step),
    a kv head with nothing listed, lengths ending mid-block."""
    _, _, sees = assert_matches_reference(
        Case(groups=groups, queries=queries, num_splits=num_splits, seed=groups + queries)
    )
    assert (~sees[0, 1]).all() and sees[1].all()


def test_full_lists_are_dense_decode():
    """Every block listed: plain causal decode over the first lengths[b] positions; length 129
    leaves one key in block 1 for the last query and none for the first two."""
    case = Case(
        groups=4, queries=3, lists="full", width=NUM_BLOCKS, lengths=(512, 129), num_splits=2,
        seed=5,
    )
    assert_matches_reference(case)


def test_softcap():
    assert_matches_reference(Case(groups=4, queries=1, softcap=1.0, seed=6))


def test_bfloat16_with_splits_and_softcap():
    assert_matches_reference(
        Case(groups=4, queries=3, num_splits=2, softcap=20.0, dtype=jnp.bfloat16, seed=7)
    )


def test_nan_cache_outside_the_visible_keys_never_leaks_and_no_races():
    """Unlisted blocks and positions past the length are NaN, padding entries name NaN blocks;
    listed blocks hold the length (NaN in their tail: K masked, V zeroed) or lie wholly past it.
    Race detection is on, with splits."""
    case = Case(
        groups=4, queries=3, counts=((3, 0), (1, 2)), lengths=(100, 300), num_splits=2,
        poison=True, seed=8,
    )
    _, _, listed = make_inputs(case)
    # Block 0 of (0, 0) and block 2 of (1, 1) hold the length (NaN past it); blocks 2 and 3 of
    # (0, 0) lie wholly past it.
    assert listed[0, 0].tolist() == [True, False, True, True]
    assert listed[1, 1].tolist() == [False, True, True, False]
    assert_matches_reference(case, interpret=compat.tpu_interpret_params(detect_races=True))
    assert compat.tpu_interpret_races_found() is False


def test_rows_that_see_nothing():
    """Length 0, length 2 < Tq = 3 (query 0 sits at position -1), an empty head, and a single
    listed block with two splits (the second split is empty: its lse = -inf must merge cleanly)."""
    case = Case(
        groups=2, queries=3, counts=((1, 0), (1, 3)), lengths=(0, 2), num_splits=2, seed=9,
    )
    o, lse, sees = assert_matches_reference(case)
    assert not sees[0].any()
    _, _, listed = make_inputs(case)
    assert listed[1, 0].tolist() == [True, False, False, False]
    assert not sees[1, 0, 0::3].any() and sees[1, 0, 1::3].all()
    assert not sees[1, 1].any(), "blocks 1..3 all start past length 2"


def test_zero_width_lists():
    """nb = 0: nothing listed anywhere; the kernel still writes o = 0 and lse = -inf."""
    q = jnp.ones((BATCH, KV_HEADS, 2, HEAD_DIM))
    k = jnp.ones((BATCH, KV_HEADS, BLOCK_KV, HEAD_DIM))
    o, lse = decode_attention_forward(
        q, k, k, jnp.zeros((BATCH, KV_HEADS, 0), jnp.int32),
        jnp.zeros((BATCH, KV_HEADS), jnp.int32), jnp.full((BATCH,), BLOCK_KV, jnp.int32),
        scale=1.0, interpret=True,
    )
    assert (np.asarray(o) == 0).all() and (np.asarray(lse) == -np.inf).all()


@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_each_live_listed_block_is_fetched_once(num_splits):
    """Walk the (B, K, P, c) grid in order through ``live_counts`` and the K/V index map (no
    interpreter): the block index changes, i.e. a DMA is issued, exactly once per listed block
    that starts before the length, plus once for a head with nothing live; padding steps, empty
    splits and listed blocks past the length never name a new block."""
    width, block_kv = 5, 16
    counts = np.array([[3, 0], [5, 2]], np.int32)
    indices = np.full((BATCH, KV_HEADS, width), 99, np.int32)  # padding: never read
    indices[0, 0, :3] = [1, 4, 6]
    indices[0, 1, 0] = 4  # nothing listed: entry 0 is the one block fetched
    indices[1, 0, :] = [0, 2, 3, 5, 6]
    indices[1, 1, :2] = [6, 7]
    lengths = np.array([90, 6 * block_kv], np.int32)  # block 6 (96..111) is past both
    live = np.asarray(live_counts(
        jnp.asarray(indices), jnp.asarray(counts), jnp.asarray(lengths), block_kv=block_kv
    ))
    np.testing.assert_array_equal(live, [[2, 0], [4, 0]])
    steps = -(-width // num_splits)
    index_map = kv_block_index_map(KV_HEADS, steps, width)
    flat_indices, flat_counts = indices.reshape(-1), live.reshape(-1)
    fetched, previous = {}, None
    for b, h, split, step in np.ndindex(BATCH, KV_HEADS, num_splits, steps):
        block = tuple(int(x) for x in index_map(b, h, split, step, flat_indices, flat_counts, None))
        if block != previous:
            fetched.setdefault((b, h), []).append(block[2])
        previous = block
    assert fetched == {(0, 0): [1, 4], (0, 1): [4], (1, 0): [0, 2, 3, 5], (1, 1): [6]}


def test_lowers_to_mosaic_for_tpu():
    """Both output paths lower to Mosaic: bfloat16 with splits (float32 partials, merged), a soft
    cap and Tq = 3 (R = 12 padded to 16); float32 with one split (o written in q.dtype)."""
    rows = 12
    q = jnp.ones((BATCH, KV_HEADS, rows, HEAD_DIM), jnp.bfloat16)
    k = jnp.ones((BATCH, KV_HEADS, CACHE_LEN, HEAD_DIM), jnp.bfloat16)
    indices = jnp.zeros((BATCH, KV_HEADS, 3), jnp.int32)
    counts = jnp.ones((BATCH, KV_HEADS), jnp.int32)
    lengths = jnp.array([300, 512], jnp.int32)

    def both(q, k, indices, counts, lengths):
        split = decode_attention_forward(
            q, k, k, indices, counts, lengths, scale=0.1, softcap=30.0, queries_per_head=3,
            num_splits=2,
        )
        q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
        single = decode_attention_forward(q32, k32, k32, indices, counts, lengths, scale=0.1)
        return split, single

    with compat.tpu_lowering_without_tpu():
        exported = jax.export.export(jax.jit(both), platforms=["tpu"])(
            q, k, indices, counts, lengths
        )
    module = exported.mlir_module()
    assert FORWARD_NAME in module and module.count("tpu_custom_call") >= 2


def _ones(length, head_dim, dtype=jnp.float32):
    return jnp.ones((2, 2, length, head_dim), dtype)


def _arguments(**changes):
    """Valid arguments (B = K = 2, R = 6, S = 256) with some replaced."""
    arguments = dict(
        q=jnp.ones((2, 2, 6, 128)), k=jnp.ones((2, 2, 256, 128)), v=jnp.ones((2, 2, 256, 128)),
        block_indices=jnp.zeros((2, 2, 2), jnp.int32), block_counts=jnp.zeros((2, 2), jnp.int32),
        lengths=jnp.zeros((2,), jnp.int32), scale=1.0, queries_per_head=3,
    )
    return {**arguments, **changes}


@pytest.mark.parametrize(
    "arguments, match",
    [
        (_arguments(q=jnp.ones((2, 6, 128))), "q must be"),
        (_arguments(k=jnp.ones((2, 3, 256, 128))), "k must be"),
        (_arguments(v=jnp.ones((2, 2, 128, 128))), "v must"),
        (_arguments(v=jnp.ones((2, 2, 256, 128), jnp.bfloat16)), "share a dtype"),
        (_arguments(q=_ones(6, 128, jnp.float16), k=_ones(256, 128, jnp.float16),
                    v=_ones(256, 128, jnp.float16)), "float16"),
        (_arguments(q=_ones(6, 64), k=_ones(256, 64), v=_ones(256, 64)), "head_dim"),
        (_arguments(block_kv=64), "block_kv"),
        (_arguments(k=jnp.ones((2, 2, 320, 128)), v=jnp.ones((2, 2, 320, 128))), "S=320"),
        (_arguments(queries_per_head=4), "queries_per_head"),
        (_arguments(num_splits=0), "num_splits"),
        (_arguments(softcap=0.0), "softcap"),
        (_arguments(block_indices=jnp.zeros((2, 2), jnp.int32)), "block_indices"),
        (_arguments(block_indices=jnp.zeros((2, 2, 2))), "block_indices must be int32"),
        (_arguments(block_counts=jnp.zeros((2,), jnp.int32)), "block_counts"),
        (_arguments(lengths=jnp.zeros((2, 1), jnp.int32)), "lengths"),
    ],
)
def test_rejects_bad_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        decode_attention_forward(**arguments, interpret=True)


def test_check_support():
    check_support(128, 128, jnp.bfloat16)
    check_support(256, 512, np.float32)
    with pytest.raises(ValueError, match="head_dim.*got 96"):
        check_support(96, 128, jnp.float32)
    with pytest.raises(ValueError, match="block_kv.*got 8"):
        check_support(128, 8, jnp.float32)
    with pytest.raises(ValueError, match="float16"):
        check_support(128, 128, jnp.float16)


# ----------------------------------------------------------------------------- paged caches

# The page-table entry of every unmapped block: far out of any pool's range, yet its row offset
# HUGE_PAGE * BLOCK_KV = 2**31 - 128 still fits in int32 (2**30 would wrap around to row 0, back
# in range), so an unclipped copy of it is out of bounds and the interpreter raises.
HUGE_PAGE = 2**24 - 1


def _huge_pages(shape, num_pages):
    return np.full(shape, HUGE_PAGE, np.int32)


# Each contiguous run has the shapes and settings of an earlier test (full lists, soft cap,
# bfloat16), so the jitted ``run_kernel`` reuses its compilation when the module runs whole.
PAGED_CASES = {
    # Tq = 3, GQA, two splits, counts 4 (every block) / 0 / 1 / 2 of width 4; both lengths
    # pass block 0: one page shared by the two sequences. Race detection on.
    "shared-page-splits-races": Case(
        groups=4, queries=3, counts=((4, 0), (1, 2)), width=NUM_BLOCKS, num_splits=2, seed=11,
    ),
    # Tq = 1, soft cap, a full list of width 3; length 100 < BLOCK_KV: no shared page.
    "tq1-softcap": Case(groups=4, queries=1, counts=((3, 0), (1, 2)), lengths=(100, 450),
                        softcap=1.0, seed=12),
    "bf16-splits-softcap": Case(groups=4, queries=3, num_splits=2, softcap=20.0,
                                dtype=jnp.bfloat16, seed=13),
}


@pytest.mark.parametrize("name", PAGED_CASES)
def test_paged_cache_equals_contiguous_cache(name):
    """A shuffled page pool read through a page table gives exactly the contiguous kernel's
    output on the cache the table gathers, and matches the reference. Every pool byte that must
    not be read is NaN and unmapped blocks' page-table entries are HUGE_PAGE, so a stray read
    shows as NaN (and an unclipped DMA would be out of bounds)."""
    case = PAGED_CASES[name]
    races = name.endswith("races")
    clean, _, listed = make_inputs(case)
    rng = np.random.default_rng(case.seed)
    k, v, k_pool, v_pool, page_table = paginate(rng, clean["k"], clean["v"], listed, clean["lengths"],
                                                block_kv=BLOCK_KV, garbage=_huge_pages)
    clean = {**clean, "k": k, "v": v, "block_indices": clean["block_indices"].copy()}
    assert (page_table[0, 0] == page_table[1, 0]) == (min(case.lengths) >= BLOCK_KV)
    # A head with nothing listed copies (never computes) entry 0's page: point that entry at
    # an unmapped block, so that only the index map's clipping keeps the copy in bounds (the
    # interpreter raises on an out-of-bounds block index).
    for b, h in zip(*np.nonzero(clean["block_counts"] == 0)):
        unmapped = np.flatnonzero(page_table[b] == HUGE_PAGE)
        if unmapped.size:
            clean["block_indices"][b, h, 0] = unmapped[0]
    lists = {
        name: jnp.asarray(clean[name]) for name in ("block_indices", "block_counts", "lengths")
    }
    settings = dict(scale=HEAD_DIM**-0.5, softcap=case.softcap, queries_per_head=case.queries,
                    block_kv=BLOCK_KV, num_splits=case.num_splits)

    def floats(k, v):
        arrays = {"q": clean["q"], "k": k, "v": v}
        return {name: jnp.asarray(x, case.dtype) for name, x in arrays.items()}

    contiguous = run_kernel(**floats(gather_pages(k_pool, page_table, BLOCK_KV),
                                     gather_pages(v_pool, page_table, BLOCK_KV)),
                            **lists, **settings, interpret=compat.tpu_interpret_params())
    paged = run_kernel(**floats(k_pool, v_pool), **lists, **settings,
                       page_table=jnp.asarray(page_table),
                       interpret=compat.tpu_interpret_params(detect_races=races))
    if races:
        assert compat.tpu_interpret_races_found() is False
    for got, expected in zip(paged, contiguous):
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(expected, np.float32))
    check_against_reference(case, *paged, clean, listed)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_index_map_reads_only_live_page_table_entries(num_splits):
    """Walk the grid through the paged K/V index map (no interpreter), recording every
    page-table entry it reads: only the entries of live listed blocks (and entry 0's block of a
    head with nothing live) are read, so the HUGE_PAGE entries of unmapped blocks, padding
    entries and listed blocks past the length are never read nor copied; each live block's page
    is fetched once, the pool's batch index is always 0."""
    width, block_kv, max_pages, num_pages = 4, 16, 6, 9
    counts = np.array([[3, 0], [4, 1]], np.int32)
    indices = np.full((BATCH, KV_HEADS, width), 5, np.int32)  # padding: block 5, unmapped
    indices[0, 0, :3] = [0, 2, 4]  # block 4 (64..79) starts past length 50
    indices[0, 1, 0] = 2  # nothing listed: entry 0's block is the one page fetched
    indices[1, 0, :] = [0, 1, 3, 4]  # block 4 starts at length 64
    indices[1, 1, 0] = 1
    lengths = np.array([50, 4 * block_kv], np.int32)
    page_table = np.full((BATCH, max_pages), HUGE_PAGE, np.int32)
    page_table[0, [0, 2]] = [7, 3]
    page_table[1, [0, 1, 3]] = [7, 1, 5]  # page 7: a prefix shared by both sequences
    live = np.asarray(live_counts(
        jnp.asarray(indices), jnp.asarray(counts), jnp.asarray(lengths), block_kv=block_kv
    ))
    np.testing.assert_array_equal(live, [[2, 0], [3, 1]])

    class RecordingTable:
        def __init__(self, table):
            self.table, self.read = table.reshape(-1), set()

        def __getitem__(self, position):
            self.read.add(int(position))
            return self.table[position]

    pages = RecordingTable(page_table)
    steps = -(-width // num_splits)
    index_map = kv_block_index_map(KV_HEADS, steps, width, max_pages=max_pages,
                                   num_pages=num_pages)
    fetched, previous = {}, None
    for b, h, split, step in np.ndindex(BATCH, KV_HEADS, num_splits, steps):
        block = tuple(int(x) for x in index_map(
            b, h, split, step, indices.reshape(-1), live.reshape(-1), None, pages))
        assert block[0] == 0 and block[1] == h
        if block != previous:
            fetched.setdefault((b, h), []).append(block[2])
        previous = block
    assert fetched == {(0, 0): [7, 3], (0, 1): [3], (1, 0): [7, 1, 5], (1, 1): [1]}
    assert pages.read == {0 * max_pages + 0, 0 * max_pages + 2,
                          1 * max_pages + 0, 1 * max_pages + 1, 1 * max_pages + 3}


def test_paged_lowers_to_mosaic_for_tpu():
    """The page table as a fourth scalar-prefetch operand and the translating index map lower
    to Mosaic (bfloat16, two splits, Tq = 3; a pool of 5 pages, max_pages 3)."""
    q = jnp.ones((BATCH, KV_HEADS, 12, HEAD_DIM), jnp.bfloat16)
    pool = jnp.ones((1, KV_HEADS, 5 * BLOCK_KV, HEAD_DIM), jnp.bfloat16)

    def paged(q, pool, indices, counts, lengths, page_table):
        return decode_attention_forward(
            q, pool, pool, indices, counts, lengths, scale=0.1, softcap=30.0, queries_per_head=3,
            num_splits=2, page_table=page_table,
        )

    with compat.tpu_lowering_without_tpu():
        exported = jax.export.export(jax.jit(paged), platforms=["tpu"])(
            q, pool, jnp.zeros((BATCH, KV_HEADS, 3), jnp.int32),
            jnp.ones((BATCH, KV_HEADS), jnp.int32), jnp.array([300, 384], jnp.int32),
            jnp.zeros((BATCH, 3), jnp.int32),
        )
    module = exported.mlir_module()
    assert FORWARD_NAME in module and module.count("tpu_custom_call") == 1


def _paged_arguments(**changes):
    """Valid paged arguments: a pool of 3 pages of 128, max_pages 2, with some replaced."""
    paged = dict(k=jnp.ones((1, 2, 384, 128)), v=jnp.ones((1, 2, 384, 128)),
                 page_table=jnp.zeros((2, 2), jnp.int32))
    return _arguments(**{**paged, **changes})


@pytest.mark.parametrize(
    "arguments, match",
    [
        (_paged_arguments(k=jnp.ones((2, 2, 384, 128)), v=jnp.ones((2, 2, 384, 128))),
         r"k must be a page pool \[1, 2, P \* block_kv, 128\] when page_table is given"),
        (_paged_arguments(v=jnp.ones((1, 2, 256, 128))), "v must have"),
        (_paged_arguments(k=jnp.ones((1, 2, 320, 128)), v=jnp.ones((1, 2, 320, 128))),
         r"page pool length k.shape\[2\]=320"),
        (_paged_arguments(page_table=jnp.zeros((2, 2, 1), jnp.int32)), "page_table must be"),
        (_paged_arguments(page_table=jnp.zeros((1, 2), jnp.int32)), r"page_table must be \[2,"),
        (_paged_arguments(page_table=jnp.zeros((2, 0), jnp.int32)), "max_pages >= 1"),
        (_paged_arguments(page_table=jnp.zeros((2, 2))), "page_table must be int32, got float32"),
        (_paged_arguments(lengths=jnp.array([0, 257], jnp.int32)),
         r"lengths must lie in \[0, max_pages \* block_kv = 256\]"),
    ],
)
def test_rejects_bad_paged_arguments(arguments, match):
    with pytest.raises(ValueError, match=match):
        decode_attention_forward(**arguments, interpret=True)
