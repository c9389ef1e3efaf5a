"""Masks: elementwise rules against numpy formulas; block metadata against brute-force classification."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse import masks
from jaxsparse.masks import BlockGrid, BlockMask, make_block_mask

T_MAX = 300
ROWS = np.arange(T_MAX)[:, None]
COLS = np.arange(T_MAX)[None, :]
SEGMENTS = np.repeat(np.arange(6), 50)[:T_MAX]
GLOBALS = np.array([0, 7, 130, 131, 299])


def _is_power_of_two_offset(offset):
    return (offset == 0) | ((offset > 0) & ((offset & (offset - 1)) == 0))


# name -> (mask, numpy rule over ROWS x COLS); each rule is written independently of the library.
PRIMITIVES = {
    "full": (masks.full(), np.ones((T_MAX, T_MAX), bool)),
    "causal": (masks.causal(), COLS <= ROWS),
    "causal_offset": (masks.causal(offset=5), COLS <= ROWS + 5),
    "sliding_window": (masks.sliding_window(37), (ROWS - COLS <= 37) & (COLS <= ROWS)),
    "two_sided_window": (masks.sliding_window(20, 9), (COLS >= ROWS - 20) & (COLS <= ROWS + 9)),
    "sinks": (masks.sinks(5), np.broadcast_to(COLS < 5, (T_MAX, T_MAX))),
    "chunked": (masks.chunked(48), ROWS // 48 == COLS // 48),
    "dilated": (masks.dilated(3), (ROWS - COLS) % 3 == 0),
    "power_of_two": (masks.power_of_two(), _is_power_of_two_offset(ROWS - COLS)),
    "prefix_lm": (masks.prefix_lm(70), (COLS < 70) | (COLS <= ROWS)),
    "document": (masks.document(SEGMENTS), SEGMENTS[:, None] == SEGMENTS[None, :]),
    "global_tokens": (masks.global_tokens(GLOBALS), np.isin(ROWS, GLOBALS) | np.isin(COLS, GLOBALS)),
    "from_fn": (masks.from_fn(lambda b, h, q, k: (q + k) % 5 != 0), (ROWS + COLS) % 5 != 0),
}

COMPOSITIONS = {
    "causal_and_sinks_or_window": masks.causal() & (masks.sinks(4) | masks.sliding_window(40)),
    "causal_and_document": masks.causal() & masks.document(SEGMENTS),
    "not_chunked": ~masks.chunked(64),
    "window_and_dilated": masks.sliding_window(64) & masks.dilated(4),
    "global_or_window": masks.global_tokens(GLOBALS) | masks.sliding_window(16, 16),
    "causal_and_not_window": masks.causal() & ~masks.sliding_window(30),
}


def _elementwise(mask, q_len, kv_len, batch=1, heads=1):
    b = jnp.arange(batch).reshape(-1, 1, 1, 1)
    h = jnp.arange(heads).reshape(1, -1, 1, 1)
    q_idx = jnp.arange(q_len).reshape(1, 1, -1, 1)
    kv_idx = jnp.arange(kv_len).reshape(1, 1, 1, -1)
    return np.broadcast_to(np.asarray(mask(b, h, q_idx, kv_idx)), (batch, heads, q_len, kv_len))


def _brute_force_blocks(dense, block_q, block_kv):
    """(any, all) per block from a dense [Bm, Hm, T, S] table; padding keys count as invisible."""
    batch, heads, q_len, kv_len = dense.shape
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    padded = np.zeros((batch, heads, nq * block_q, nk * block_kv), bool)
    padded[:, :, :q_len, :kv_len] = dense
    real = np.zeros_like(padded)
    real[:, :, :q_len, :kv_len] = True
    tiles = padded.reshape(batch, heads, nq, block_q, nk, block_kv)
    real_tiles = real.reshape(batch, heads, nq, block_q, nk, block_kv)
    any_visible = tiles.any(axis=(3, 5))
    all_visible = (tiles | ~real_tiles).all(axis=(3, 5))
    all_visible &= (np.arange(nk) + 1) * block_kv <= kv_len  # blocks holding padding keys are partial
    return any_visible, all_visible & any_visible


def _table(indices, counts, flags, num_cols):
    """numpy bool [..., rows, num_cols] marking listed entries (whose flag is set)."""
    indices, counts, flags = np.asarray(indices), np.asarray(counts), np.asarray(flags)
    table = np.zeros(indices.shape[:-1] + (num_cols,), bool)
    for row in np.ndindex(counts.shape):
        listed = indices[row][: counts[row]]
        table[row][listed[flags[row][: counts[row]] != 0]] = True
    return table


def _visited_table(block_mask: BlockMask):
    return _table(block_mask.kv_indices, block_mask.kv_counts, np.ones(block_mask.kv_indices.shape), block_mask.num_kv_blocks)


def _full_table(block_mask: BlockMask):
    return _table(block_mask.kv_indices, block_mask.kv_counts, block_mask.kv_full, block_mask.num_kv_blocks)


def _check_list_invariants(indices, counts, num_cols):
    indices, counts = np.asarray(indices), np.asarray(counts)
    for row in np.ndindex(counts.shape):
        listed = indices[row][: counts[row]]
        assert np.all(np.diff(listed) > 0), f"row {row}: not strictly increasing: {listed}"
        assert np.all((listed >= 0) & (listed < num_cols))
        padding = indices[row][counts[row]:]
        expected = listed[-1] if counts[row] else 0
        assert np.all(padding == expected), f"row {row}: padding {padding} should repeat {expected}"


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_elementwise_rule_matches_numpy(name):
    mask, rule = PRIMITIVES[name]
    np.testing.assert_array_equal(_elementwise(mask, T_MAX, T_MAX)[0, 0], rule)


@given(
    name=st.sampled_from(sorted(PRIMITIVES)),
    q_len=st.integers(1, T_MAX),
    kv_len=st.integers(1, T_MAX),
    block_q=st.sampled_from([8, 16, 32, 64, 128]),
    block_kv=st.sampled_from([8, 16, 32, 64, 128]),
)
def test_primitive_block_metadata_is_exact(name, q_len, kv_len, block_q, block_kv):
    mask, rule = PRIMITIVES[name]
    if name == "document" or name == "global_tokens":
        q_len = kv_len = max(q_len, kv_len)  # these masks describe one sequence of T_MAX positions
    block_mask = make_block_mask(mask, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv)
    dense = rule[None, None, :q_len, :kv_len]
    expected_any, expected_all = _brute_force_blocks(dense, block_q, block_kv)
    np.testing.assert_array_equal(_visited_table(block_mask), np.broadcast_to(expected_any, block_mask.shape))
    np.testing.assert_array_equal(_full_table(block_mask), np.broadcast_to(expected_all, block_mask.shape))


@given(
    name=st.sampled_from(sorted(COMPOSITIONS)),
    length=st.integers(1, T_MAX),
    block_q=st.sampled_from([16, 32, 64]),
    block_kv=st.sampled_from([16, 32, 128]),
)
def test_composed_block_metadata_is_conservative_and_dense_is_exact(name, length, block_q, block_kv):
    mask = COMPOSITIONS[name]
    block_mask = make_block_mask(mask, q_len=length, kv_len=length, block_q=block_q, block_kv=block_kv)
    dense = _elementwise(mask, length, length)
    expected_any, expected_all = _brute_force_blocks(dense, block_q, block_kv)
    assert np.all(_visited_table(block_mask) >= expected_any), "a block with visible elements is skipped"
    assert np.all(_full_table(block_mask) <= expected_all), "a block marked full has invisible elements"


@pytest.mark.parametrize("name", sorted(PRIMITIVES) + sorted(COMPOSITIONS))
def test_index_lists_and_transposed_lists_agree(name):
    mask = PRIMITIVES[name][0] if name in PRIMITIVES else COMPOSITIONS[name]
    block_mask = make_block_mask(mask, q_len=T_MAX, kv_len=250, block_q=32, block_kv=64)
    _check_list_invariants(block_mask.kv_indices, block_mask.kv_counts, block_mask.num_kv_blocks)
    _check_list_invariants(block_mask.q_indices, block_mask.q_counts, block_mask.num_q_blocks)
    visited = _visited_table(block_mask)
    np.testing.assert_array_equal(np.asarray(block_mask.visited()), visited)
    transposed = _table(block_mask.q_indices, block_mask.q_counts, np.ones(block_mask.q_indices.shape), block_mask.num_q_blocks)
    np.testing.assert_array_equal(visited, transposed.swapaxes(-1, -2))
    full_transposed = _table(block_mask.q_indices, block_mask.q_counts, block_mask.q_full, block_mask.num_q_blocks)
    np.testing.assert_array_equal(_full_table(block_mask), full_transposed.swapaxes(-1, -2))
    # The element picture implied by the metadata equals the mask (padding keys excluded).
    np.testing.assert_array_equal(np.asarray(block_mask.dense()), _elementwise(mask, T_MAX, 250))
    assert block_mask.max_pairs == int(np.asarray(block_mask.kv_counts).sum(-1).max())


def test_index_lists_are_as_wide_as_the_busiest_row():
    block_mask = make_block_mask(masks.causal() & masks.sliding_window(100), q_len=1024, kv_len=1024, block_q=64, block_kv=64)
    assert block_mask.kv_indices.shape[-1] == 3
    assert float(block_mask.density) == pytest.approx((16 + 15 + 14) / 256)


def test_document_mask_under_jit_with_traced_segment_ids():
    segments = jnp.asarray(np.repeat([0, 1, 2, 3], [30, 70, 10, 90])[None].repeat(2, 0).copy())
    segments = segments.at[1].set(jnp.asarray(np.repeat([0, 1], [150, 50])))

    def build(segment_ids):
        return make_block_mask(masks.causal() & masks.document(segment_ids), q_len=200, kv_len=200, block_q=32, block_kv=32)

    traced = jax.jit(build)(segments)
    eager = build(segments)
    assert traced.kv_indices.shape[-1] == traced.num_kv_blocks  # traced: lists as wide as nk
    np.testing.assert_array_equal(np.asarray(traced.dense()), np.asarray(eager.dense()))
    expected = (segments[:, :, None] == segments[:, None, :]) & (np.arange(200)[None, :] <= np.arange(200)[:, None])
    np.testing.assert_array_equal(np.asarray(traced.dense())[:, 0], np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(traced.visited()), np.asarray(eager.visited()))


def test_from_fn_depending_on_batch_and_head():
    fn = lambda b, h, q, k: jnp.abs(q - k) <= 8 * (h + 1) + 16 * b  # noqa: E731
    block_mask = make_block_mask(masks.from_fn(fn), q_len=128, kv_len=128, block_q=16, block_kv=16, batch=2, heads=3)
    assert block_mask.shape[:2] == (2, 3)
    dense = _elementwise(masks.from_fn(fn), 128, 128, batch=2, heads=3)
    np.testing.assert_array_equal(np.asarray(block_mask.dense()), dense)
    expected_any, expected_all = _brute_force_blocks(dense, 16, 16)
    np.testing.assert_array_equal(_visited_table(block_mask), expected_any)
    np.testing.assert_array_equal(_full_table(block_mask), expected_all)


def test_per_head_windows():
    windows = (4, 16, 64, 200)
    mask = masks.causal() & masks.per_head([masks.sliding_window(w) for w in windows])
    block_mask = make_block_mask(mask, q_len=256, kv_len=256, block_q=32, block_kv=32)
    assert block_mask.shape[:2] == (1, 4)
    for head, window in enumerate(windows):
        expected = (COLS[:, :256] <= ROWS[:256]) & (ROWS[:256] - COLS[:, :256] <= window)
        np.testing.assert_array_equal(np.asarray(block_mask.dense())[0, head], expected)
    counts = np.asarray(block_mask.num_visited_blocks)[0]
    assert list(counts) == sorted(counts) and counts[0] < counts[-1]


def test_from_indices_merges_duplicates_and_applies_the_mask():
    indices = jnp.array([[3, 0, 0, 1], [2, 2, 9, 0], [1, 0, 3, 2]])  # 9 is out of range: ignored
    counts = jnp.array([3, 3, 2])
    block_mask = BlockMask.from_indices(indices, counts, q_len=40, kv_len=50, block_q=16, block_kv=16)
    expected_blocks = np.zeros((3, 4), bool)
    expected_blocks[0, [0, 3]] = True
    expected_blocks[1, [2]] = True
    expected_blocks[2, [0, 1]] = True
    np.testing.assert_array_equal(np.asarray(block_mask.visited())[0, 0], expected_blocks)
    # Block 3 holds keys 48..63 of which only 48, 49 are real: partial, with the padding masked.
    dense = np.asarray(block_mask.dense())[0, 0]
    assert dense[0:16, 48:50].all() and dense.shape == (40, 50)
    full_table = _full_table(block_mask)[0, 0]
    assert full_table[0, 0] and not full_table[0, 3]
    causal_blocks = BlockMask.from_indices(indices, counts, q_len=40, kv_len=50, block_q=16, block_kv=16, mask=masks.causal())
    np.testing.assert_array_equal(np.asarray(causal_blocks.dense())[0, 0], dense & (COLS[:, :50] <= ROWS[:40]))


def test_from_indices_under_jit_feeds_dynamic_choices():
    scores = jax.random.normal(jax.random.key(0), (2, 8, 8))
    top = jax.lax.top_k(scores, 3)[1]

    @jax.jit
    def build(top):
        return BlockMask.from_indices(top, jnp.full(top.shape[:-1], 3), q_len=128, kv_len=128, block_q=16, block_kv=16)

    block_mask = build(top)
    assert block_mask.shape == (1, 2, 8, 8)
    np.testing.assert_array_equal(np.asarray(block_mask.kv_counts), 3)
    chosen = np.zeros((2, 8, 8), bool)
    np.put_along_axis(chosen, np.asarray(top), True, axis=-1)
    np.testing.assert_array_equal(np.asarray(block_mask.visited())[0], chosen)


def test_structured_masks_never_form_a_t_by_s_array():
    """Block classification of structured masks works on [nq, nk]-sized arrays only."""
    length, block = 8192, 128
    mask = masks.causal() & (masks.sinks(4) | masks.sliding_window(1024)) & masks.document(jnp.zeros(length, jnp.int32))
    mask = mask | masks.prefix_lm(16) | masks.global_tokens([1, 2]) | masks.chunked(256) | masks.power_of_two()

    def classify(q_start, kv_start, segment_ids):
        grid = BlockGrid(
            q_start=q_start, q_end=q_start + block, kv_start=kv_start, kv_end=kv_start + block,
            batch_index=jnp.zeros((1, 1, 1, 1), jnp.int32), head_index=jnp.zeros((1, 1, 1, 1), jnp.int32),
            q_len=length, kv_len=length, block_q=block, block_kv=block,
        )
        traced_mask = mask & masks.document(segment_ids)
        return traced_mask.block_visibility(grid)

    starts = jnp.arange(length // block, dtype=jnp.int32) * block
    jaxpr = jax.make_jaxpr(classify)(starts[:, None], starts[None, :], jnp.zeros((1, length), jnp.int32))
    sizes = [np.prod(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars if hasattr(var.aval, "shape")]
    assert max(sizes) <= max((length // block) ** 2, length), f"an intermediate has {max(sizes)} elements"


TILE_MASKS = {
    **{name: mask for name, (mask, _) in PRIMITIVES.items()},
    **COMPOSITIONS,
    "per_batch_prefix_and_documents": masks.prefix_lm(jnp.array([10, 200])) & masks.document(
        jnp.stack([jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS[::-1].copy())])
    ),
    "per_head": masks.per_head([masks.document(SEGMENTS), masks.causal(), masks.global_tokens(GLOBALS)]),
}


@pytest.mark.parametrize("name", sorted(TILE_MASKS))
def test_tile_visibility_from_sliced_operands_equals_the_mask(name):
    """What kernels evaluate (tile slices of row/column/scalar operands, no gathers) equals the mask."""
    mask = TILE_MASKS[name]
    q_len, kv_len, block_q, block_kv = 260, 300, 32, 64
    rows, columns, scalars = mask.tile_operands(q_len, kv_len)
    rng = np.random.default_rng(0)
    for b in range(2):
        for h in range(3):
            for q_start, kv_start in zip(rng.integers(0, q_len - block_q, 4), rng.integers(0, kv_len - block_kv, 4)):
                q_idx = jnp.arange(q_start, q_start + block_q)[:, None]
                kv_idx = jnp.arange(kv_start, kv_start + block_kv)[None, :]
                pick = lambda x: x[min(b, x.shape[0] - 1)]  # noqa: E731  (B' == 1 broadcasts)
                row_tiles = jax.tree.map(lambda x: pick(x)[q_start:q_start + block_q, None], rows)
                column_tiles = jax.tree.map(lambda x: pick(x)[None, kv_start:kv_start + block_kv], columns)
                scalar_values = jax.tree.map(pick, scalars)
                expected = jnp.broadcast_to(mask(b, h, q_idx, kv_idx), (block_q, block_kv))
                actual = jnp.broadcast_to(
                    mask.tile_visible(row_tiles, column_tiles, scalar_values, b, h, q_idx, kv_idx), (block_q, block_kv)
                )
                np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=f"{name} b={b} h={h}")


def test_visualize_and_plot():
    block_mask = make_block_mask(masks.causal(), q_len=64, kv_len=64, block_q=16, block_kv=16)
    text = block_mask.visualize()
    assert text.splitlines()[:4] == ["+...", "#+..", "##+.", "###+"]
    assert "62.5% visited" in text
    import matplotlib

    matplotlib.use("Agg")
    ax = block_mask.plot()
    assert ax.get_images()[0].get_array().shape == (4, 4)


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: masks.sliding_window(-1), ValueError),
        (lambda: masks.sliding_window(2.5), TypeError),
        (lambda: masks.chunked(0), ValueError),
        (lambda: masks.dilated(0), ValueError),
        (lambda: masks.sinks(-3), ValueError),
        (lambda: masks.document(jnp.zeros((2, 3, 4), jnp.int32)), ValueError),
        (lambda: masks.document(jnp.zeros(4)), TypeError),
        (lambda: masks.prefix_lm(jnp.zeros((2, 2), jnp.int32)), ValueError),
        (lambda: masks.per_head([]), ValueError),
        (lambda: masks.per_head([masks.causal(), "local"]), TypeError),
        (lambda: masks.causal() & "causal", TypeError),
        (lambda: masks.from_fn(3), TypeError),
        (lambda: make_block_mask("causal", q_len=8, kv_len=8), TypeError),
        (lambda: make_block_mask(masks.causal(), q_len=0, kv_len=8), ValueError),
        (lambda: make_block_mask(masks.causal(), q_len=8, kv_len=8, block_q=-16), ValueError),
        (lambda: BlockMask.from_indices(jnp.zeros((3, 2), jnp.int32), jnp.ones(3), q_len=64, kv_len=64, block_q=16, block_kv=16), ValueError),
        (lambda: BlockMask.from_indices(jnp.zeros((4, 2), jnp.int32), jnp.ones(3), q_len=64, kv_len=64, block_q=16, block_kv=16), ValueError),
    ],
)
def test_bad_input_raises_a_clear_error(build, error):
    with pytest.raises(error):
        build()
