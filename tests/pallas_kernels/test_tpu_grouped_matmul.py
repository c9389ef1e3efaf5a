"""Grouped matmul TPU kernels (the MoE "dropless" GEMM), run in the TPU interpreter on CPU.

The reference is a per-group float64 numpy loop written from the definition, independent of
``jaxsparse``: y[rows of e] = x[rows of e] @ w[e], dw[e] = x[rows of e].T @ dy[rows of e], rows
past sum(group_sizes) give 0. Every interpreted run has race detection on. The interpreter fills
uninitialised memory with NaN, so a row tile the forward never writes shows up as NaN, and rows
past the groups are NaN / Inf in the inputs, so a missing mask shows up too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import compat
from pallas_kernels.tpu.grouped_matmul import (
    GROUPED_MATMUL_NAME,
    TRANSPOSED_GROUPED_MATMUL_NAME,
    _pairs,
    check_support,
    grouped_matmul,
    transposed_grouped_matmul,
)

# atol = rtol by dtype (outputs are O(1) by the input scaling). In bfloat16 the inputs are rounded
# in both the kernel and the reference, so only the rounding of the output to bfloat16 (8 mantissa
# bits, 2**-9 relative) and float32 accumulation order remain: compared at about 2**-7.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
RACE_CHECKING = compat.tpu_interpret_params(detect_races=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    sizes: tuple[int, ...]  # group sizes: E = len(sizes); N - sum(sizes) rows of padding
    num_rows: int
    inner: int = 128  # K
    out_dim: int = 128  # F
    block_rows: int = 32
    block_cols: int = 128
    block_inner: int = 128
    dtype: type = jnp.float32
    seed: int = 0


def make_inputs(case: Case):
    """x [N, K], w [E, K, F] (~unit-variance outputs) and dy [N, F] as float64 numpy, rounded to
    the dtype; rows past the groups are NaN in x and Inf in dy (they must never matter)."""
    rng = np.random.default_rng(case.seed)
    num_groups, total = len(case.sizes), sum(case.sizes)
    assert total <= case.num_rows
    x = rng.normal(size=(case.num_rows, case.inner))
    w = rng.normal(size=(num_groups, case.inner, case.out_dim)) * case.inner**-0.5
    dy = rng.normal(size=(case.num_rows, case.out_dim)) * max(total, 1) ** -0.5
    x, w, dy = (np.asarray(jnp.asarray(a, case.dtype), np.float64) for a in (x, w, dy))
    x[total:], dy[total:] = np.nan, np.inf
    return x, w, dy


def reference_forward(x, w, sizes):
    y, start = np.zeros((x.shape[0], w.shape[2])), 0
    for e, size in enumerate(sizes):
        y[start:start + size] = x[start:start + size] @ w[e]
        start += size
    return y


def reference_transposed(x, dy, sizes):
    dw, start = np.zeros((len(sizes), x.shape[1], dy.shape[1])), 0
    for e, size in enumerate(sizes):
        dw[e] = x[start:start + size].T @ dy[start:start + size]
        start += size
    return dw


_BLOCKS = ("block_rows", "block_cols", "block_inner")


@functools.partial(jax.jit, static_argnames=("transpose_rhs", *_BLOCKS, "interpret"))
def run_forward(x, w, sizes, **settings):
    return grouped_matmul(x, w, sizes, **settings)


@functools.partial(jax.jit, static_argnames=(*_BLOCKS, "interpret"))
def run_transposed(x, dy, sizes, **settings):
    return transposed_grouped_matmul(x, dy, sizes, **settings)


def _blocks(case: Case):
    return {name: getattr(case, name) for name in _BLOCKS}


def _assert_close(actual, expected, dtype):
    assert np.isfinite(actual).all()
    tolerance = TOLERANCES[dtype]
    np.testing.assert_allclose(actual, expected, atol=tolerance, rtol=tolerance)


def check_forward(case: Case, transpose_rhs: bool = False):
    x, w, _ = make_inputs(case)
    sizes = jnp.array(case.sizes, jnp.int32)
    w_kernel = np.swapaxes(w, 1, 2) if transpose_rhs else w
    y = run_forward(
        jnp.asarray(x, case.dtype), jnp.asarray(w_kernel, case.dtype), sizes,
        transpose_rhs=transpose_rhs, interpret=RACE_CHECKING, **_blocks(case),
    )
    assert compat.tpu_interpret_races_found() is False
    assert y.dtype == case.dtype and y.shape == (case.num_rows, case.out_dim)
    y = np.asarray(y, np.float64)
    _assert_close(y, reference_forward(x, w, case.sizes), case.dtype)
    assert (y[sum(case.sizes):] == 0).all(), "padding rows must be exactly 0"


def check_transposed(case: Case):
    x, _, dy = make_inputs(case)
    dw = run_transposed(
        jnp.asarray(x, case.dtype), jnp.asarray(dy, case.dtype), jnp.array(case.sizes, jnp.int32),
        interpret=RACE_CHECKING, **_blocks(case),
    )
    assert compat.tpu_interpret_races_found() is False
    assert dw.dtype == case.dtype and dw.shape == (len(case.sizes), case.inner, case.out_dim)
    dw = np.asarray(dw, np.float64)
    _assert_close(dw, reference_transposed(x, dy, case.sizes), case.dtype)
    for e, size in enumerate(case.sizes):
        if size == 0:
            assert (dw[e] == 0).all(), "an empty group must give exactly 0"


def _random_sizes(seed, num_groups, total):
    """Random group sizes summing to ``total``, one of them empty when num_groups > 1."""
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(total, rng.dirichlet(np.ones(num_groups)))
    empty = rng.integers(num_groups)
    sizes[empty] = 0
    sizes[(empty + 1) % num_groups] += total - sizes.sum()
    return tuple(int(s) for s in sizes)


# Group sizes with N = num_rows and 32-row tiles unless noted: empty groups (first, middle, last),
# groups inside one tile, groups spanning several tiles, several groups sharing a tile, padding.
CASES = {
    # One group over every row, two tiles.
    "one_group_full": Case(sizes=(64,), num_rows=64),
    # Empty first and middle groups, a small group sharing tile 0 with a 4-tile group; 43 rows of
    # padding, tail tiles 5 and 6 (the last partial: 200 = 6 * 32 + 8).
    "three_groups_padding": Case(sizes=(0, 9, 148), num_rows=200, out_dim=256),
    # Five groups, 64-row tiles, two K tiles (accumulation over k); last group empty, 48 rows of
    # padding, N = 300 leaves a partial last tile.
    "five_groups_two_k_tiles": Case(
        sizes=(5, 150, 7, 90, 0), num_rows=300, inner=256, block_rows=64
    ),
    # Random sizes (one forced to 0), 8-row tiles: many pairs and tiles holding 3 groups.
    "random_small_tiles": Case(sizes=_random_sizes(1, 5, 70), num_rows=77, block_rows=8, seed=1),
    # N smaller than the default 128-row block (lowered to 24 rows, partial), default blocks;
    # block_cols 384 > F and block_inner 512 > K are lowered to 256 and 128.
    "defaults_small_n": Case(
        sizes=(7, 0, 11), num_rows=20, out_dim=256, block_rows=128, block_cols=384,
        block_inner=512,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward(name):
    check_forward(CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_transposed(name):
    check_transposed(CASES[name])


@pytest.mark.parametrize("name", ["three_groups_padding", "five_groups_two_k_tiles"])
def test_forward_transpose_rhs(name):
    """w passed as [E, F, K]: the dx form, two F (or K) tiles."""
    check_forward(CASES[name], transpose_rhs=True)


BF16_CASE = Case(
    sizes=_random_sizes(2, 3, 140), num_rows=150, inner=256, out_dim=256, dtype=jnp.bfloat16,
    seed=2,
)


def test_forward_bfloat16():
    check_forward(BF16_CASE)
    check_forward(dataclasses.replace(BF16_CASE, seed=3), transpose_rhs=True)


def test_transposed_bfloat16():
    check_transposed(BF16_CASE)


def test_all_groups_empty():
    """Nothing to compute: y is all zeros (every tile still written) and so is dw."""
    case = Case(sizes=(0, 0, 0), num_rows=40, seed=4)
    check_forward(case)
    check_transposed(case)


def test_zero_rows():
    x, w = jnp.ones((0, 128)), jnp.ones((2, 128, 256))
    sizes = jnp.zeros((2,), jnp.int32)
    assert grouped_matmul(x, w, sizes).shape == (0, 256)
    dw = transposed_grouped_matmul(x, jnp.ones((0, 256)), sizes)
    assert dw.shape == (2, 128, 256) and (np.asarray(dw) == 0).all()


# (E, N, block_rows) of the pair-list check: one tile, partial last tiles, 3 groups per tile.
PAIR_LIST_SHAPES = [(1, 5, 8), (3, 64, 32), (3, 77, 8), (5, 131, 32), (5, 300, 64)]


@pytest.mark.parametrize("visit_empty_groups", [False, True], ids=["forward", "transposed"])
def test_pair_lists_stay_in_bounds_and_cover_each_group(visit_empty_groups):
    """The scalar-prefetched pair list over many group sizes (jnp only, no kernel): the
    interpreter clamps out-of-range block indices silently, so they are checked here. Some
    size lists sum past N (groups are then cut at row N)."""
    rng = np.random.default_rng(5)
    for num_groups, num_rows, block_rows in PAIR_LIST_SHAPES:
        size_lists = [
            _random_sizes(trial, num_groups, int(rng.integers(0, num_rows + 1)))
            for trial in range(12)
        ]
        size_lists += [(0,) * num_groups, (num_rows + 7,) * num_groups]
        pair_lists = jax.jit(jax.vmap(functools.partial(
            _pairs, num_rows=num_rows, block_rows=block_rows,
            visit_empty_groups=visit_empty_groups,
        )))(jnp.array(size_lists, jnp.int32))
        for index, sizes in enumerate(size_lists):
            tiles, groups, firsts, ends = (np.asarray(a[index]) for a in pair_lists)
            _check_pair_list(
                sizes, tiles, groups, firsts, ends, num_rows, block_rows, visit_empty_groups
            )


def _check_pair_list(sizes, tiles, groups, firsts, ends, num_rows, block_rows, visit_empty_groups):
    num_groups, num_tiles = len(sizes), -(-num_rows // block_rows)
    assert len(tiles) == num_tiles + num_groups - 1
    assert ((0 <= tiles) & (tiles < num_tiles)).all(), sizes
    assert ((0 <= groups) & (groups < num_groups)).all(), sizes
    assert (0 <= firsts).all() and (firsts <= ends).all() and (ends <= num_rows).all(), sizes
    bounds = np.minimum(np.cumsum((0,) + tuple(sizes)), num_rows)
    live = ends > firsts
    for e in range(num_groups):
        # The live pairs of group e: one per tile its rows touch, each with its row range.
        mine = live & (groups == e)
        expected = []
        if bounds[e] < bounds[e + 1]:
            expected = list(range(bounds[e] // block_rows, -(-bounds[e + 1] // block_rows)))
        assert sorted(tiles[mine]) == expected, (sizes, e)
        assert (firsts[mine] == bounds[e]).all() and (ends[mine] == bounds[e + 1]).all()
    if visit_empty_groups:
        # Output blocks are per group: each group's pairs are consecutive and all present.
        assert (np.diff(groups) >= 0).all() and set(groups) == set(range(num_groups)), sizes
    else:
        # Output blocks are per tile: visits consecutive, every tile visited.
        assert (np.diff(tiles) >= 0).all() and set(tiles) == set(range(num_tiles)), sizes


def test_sum_larger_than_n_cuts_groups_at_n():
    """Not the caller's contract, but the kernels stay in bounds and cut the last groups."""
    case = Case(sizes=(30, 50, 40), num_rows=100, seed=6)  # group 2 gets 20 rows, not 40
    x, w, dy = make_inputs(dataclasses.replace(case, sizes=(30, 50, 20)))
    sizes = jnp.array(case.sizes, jnp.int32)
    x32, w32, dy32 = (jnp.asarray(a, jnp.float32) for a in (x, w, dy))
    y = run_forward(x32, w32, sizes, interpret=True, **_blocks(case))
    _assert_close(np.asarray(y, np.float64), reference_forward(x, w, (30, 50, 20)), jnp.float32)
    dw = run_transposed(x32, dy32, sizes, interpret=True, **_blocks(case))
    expected = reference_transposed(x, dy, (30, 50, 20))
    _assert_close(np.asarray(dw, np.float64), expected, jnp.float32)


def test_lowers_to_mosaic_for_tpu():
    """Both kernels, and the transpose_rhs form, lower to Mosaic with TPU-sized tiles (bf16,
    N = 300 leaving partial row tiles, several K and F tiles)."""
    num_rows, inner, out_dim, num_groups = 300, 256, 384, 4
    x = jnp.ones((num_rows, inner), jnp.bfloat16)
    w = jnp.ones((num_groups, inner, out_dim), jnp.bfloat16)
    dy = jnp.ones((num_rows, out_dim), jnp.bfloat16)
    sizes = jnp.array([100, 0, 50, 100], jnp.int32)

    def all_kernels(x, w, dy, sizes):
        y = grouped_matmul(x, w, sizes, block_rows=128)
        dx = grouped_matmul(dy, w, sizes, transpose_rhs=True, block_rows=64)
        dw = transposed_grouped_matmul(x, dy, sizes, block_rows=32, block_cols=384)
        return y, dx, dw

    with compat.tpu_lowering_without_tpu():
        exported = jax.export.export(jax.jit(all_kernels), platforms=["tpu"])(x, w, dy, sizes)
    module = exported.mlir_module()
    assert module.count("tpu_custom_call") == 3
    assert GROUPED_MATMUL_NAME in module and TRANSPOSED_GROUPED_MATMUL_NAME in module


def _valid(**changes):
    arguments = dict(
        x=jnp.ones((40, 128)), w=jnp.ones((3, 128, 256)), sizes=jnp.array([10, 0, 20], jnp.int32),
        transpose_rhs=False, block_rows=32, block_cols=128, block_inner=128,
    )
    return {**arguments, **changes}


@pytest.mark.parametrize(
    "arguments, match",
    [
        (_valid(x=jnp.ones((40,))), "x must be 2-D"),
        (_valid(w=jnp.ones((128, 256))), "w must be 3-D"),
        (_valid(w=jnp.ones((3, 128, 256), jnp.bfloat16)), "w must have x's dtype"),
        (_valid(w=jnp.ones((3, 256, 256))), r"w must be \[E, K, F\]"),
        (_valid(transpose_rhs=True), r"w must be \[E, F, K\]"),
        (_valid(sizes=jnp.array([10, 0], jnp.int32)), "group_sizes must have shape"),
        (_valid(sizes=jnp.zeros((3, 1), jnp.int32)), "group_sizes must have shape"),
        (_valid(sizes=jnp.array([10.0, 0.0, 20.0])), "group_sizes must be int32"),
        (_valid(w=jnp.ones((0, 128, 256)), sizes=jnp.zeros((0,), jnp.int32)), "E = 0"),
        (_valid(x=jnp.ones((40, 96)), w=jnp.ones((3, 96, 256))), r"inner_dim \(K\).*got 96"),
        (_valid(w=jnp.ones((3, 128, 200))), r"out_dim \(F\).*got 200"),
        (
            _valid(x=jnp.ones((40, 128), jnp.float16), w=jnp.ones((3, 128, 256), jnp.float16)),
            "float16",
        ),
        (_valid(block_rows=12), "block_rows must be a positive multiple of 8"),
        (
            _valid(x=jnp.ones((40, 128), jnp.bfloat16), w=jnp.ones((3, 128, 256), jnp.bfloat16),
                   block_rows=24),
            "block_rows must be a positive multiple of 16 for bfloat16, got 24",
        ),
        (_valid(block_cols=100), "block_cols must be a positive multiple of 128, got 100"),
        (_valid(block_inner=0), "block_inner"),
    ],
)
def test_forward_rejects_bad_arguments(arguments, match):
    x, w, sizes = (arguments.pop(name) for name in ("x", "w", "sizes"))
    with pytest.raises(ValueError, match=match):
        grouped_matmul(x, w, sizes, interpret=True, **arguments)


@pytest.mark.parametrize(
    "dy, sizes, block_rows, match",
    [
        (jnp.ones((40,)), None, 32, "dy must be 2-D"),
        (jnp.ones((40, 256), jnp.bfloat16), None, 32, "dy must have x's dtype"),
        (jnp.ones((41, 256)), None, 32, "dy must have x's 40 rows"),
        (jnp.ones((40, 200)), None, 32, r"out_dim \(F\)"),
        (None, jnp.zeros((3,), jnp.int16), 32, "group_sizes must be int32"),
        (None, jnp.zeros((3, 2), jnp.int32), 32, "group_sizes must have shape"),
        (None, None, 4, "block_rows"),
    ],
)
def test_transposed_rejects_bad_arguments(dy, sizes, block_rows, match):
    dy = jnp.ones((40, 256)) if dy is None else dy
    sizes = jnp.array([10, 0, 20], jnp.int32) if sizes is None else sizes
    with pytest.raises(ValueError, match=match):
        transposed_grouped_matmul(
            jnp.ones((40, 128)), dy, sizes, block_rows=block_rows, interpret=True
        )


def test_check_support():
    check_support(256, 384, jnp.bfloat16)
    check_support(128, 128, np.float32)
    with pytest.raises(ValueError, match=r"inner_dim \(K\) must be a positive .* got 200"):
        check_support(200, 128, jnp.float32)
    with pytest.raises(ValueError, match=r"out_dim \(F\) must be a positive .* got 64"):
        check_support(128, 64, jnp.float32)
    with pytest.raises(ValueError, match="float32 or bfloat16, got float16"):
        check_support(128, 128, jnp.float16)
