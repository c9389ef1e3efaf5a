"""GPU (Triton-backend) grouped matmul kernels against a per-group float64 reference, in interpret
mode (compiled when run on a GPU: `make test-gpu`).

x [N, K] holds rows sorted by group (group 0's group_sizes[0] rows, then group 1's, ..., then
padding rows up to N). The reference loops over the groups in numpy float64, independently of
``jaxsparse``::

    y[rows of e] = x[rows of e] @ w[e]   (w[e].T with transpose_rhs);  padding rows of y are 0
    dw[e] = x[rows of e].T @ dy[rows of e]                              (zeros for empty groups)

Every case poisons what the kernels must never use: padding rows of x and dy, and the weights of
empty groups, are NaN, so an unmasked read shows up as NaN in the output (and unwritten output
tiles are NaN in interpret mode, so a skipped store shows up too).
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.common import compat
from tests.backend import GPU_INTERPRET, float32_tolerance
from pallas_kernels.gpu import grouped_matmul as gmm
from pallas_kernels.gpu.grouped_matmul import (
    GROUPED_MATMUL_NAME,
    TRANSPOSED_GROUPED_MATMUL_NAME,
    check_support,
    grouped_matmul,
    transposed_grouped_matmul,
)

TOLERANCES = {  # Relative to the largest |reference| entry of each output.
    jnp.float32: float32_tolerance(2e-5),
    # bf16: the reference sees the same bf16-rounded inputs; products are exact in float32 and
    # accumulated in float32, so the error is the final rounding of y / dw to bf16 (relative
    # 2^-9 ~ 0.002 per entry) plus float32 summation order.
    jnp.bfloat16: 1e-2,
}

pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")


def group_slices(group_sizes):
    """The row slice of each group."""
    ends = np.cumsum(group_sizes)
    return [slice(end - size, end) for size, end in zip(group_sizes, ends)]


def reference_grouped_matmul(x, w, group_sizes, transpose_rhs=False):
    """float64 [N, F]: each group's rows times its weight, zero padding rows."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y = np.zeros((x.shape[0], w.shape[1] if transpose_rhs else w.shape[2]))
    for e, rows in enumerate(group_slices(group_sizes)):
        y[rows] = x[rows] @ (w[e].T if transpose_rhs else w[e])
    return y


def reference_transposed_grouped_matmul(x, dy, group_sizes):
    """float64 [E, K, F]: x[rows of e].T @ dy[rows of e]."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    return np.stack([x[rows].T @ dy[rows] for rows in group_slices(group_sizes)])


def random_problem(rng, group_sizes, num_rows, inner_dim, out_dim, dtype):
    """Random normal x [N, K], w [E, K, F], w_t [E, F, K], dy [N, F], rounded to dtype and
    returned as float32 numpy (exactly representable in dtype), with NaN in the padding rows of x
    and dy and in the weights of empty groups."""
    num_groups = len(group_sizes)
    x = rng.standard_normal((num_rows, inner_dim), np.float32)
    dy = rng.standard_normal((num_rows, out_dim), np.float32)
    w = rng.standard_normal((num_groups, inner_dim, out_dim), np.float32) / np.sqrt(inner_dim)
    w_t = rng.standard_normal((num_groups, out_dim, inner_dim), np.float32) / np.sqrt(out_dim)
    x, dy, w, w_t = (np.array(jnp.asarray(a, dtype), np.float32) for a in (x, dy, w, w_t))
    used = int(np.sum(group_sizes))
    x[used:] = dy[used:] = np.nan
    empty = np.asarray(group_sizes) == 0
    w[empty] = w_t[empty] = np.nan
    return x, w, w_t, dy


def assert_close(actual, reference, dtype):
    actual = np.asarray(actual, np.float32)
    assert np.isfinite(actual).all()
    scale = max(1.0, float(np.max(np.abs(reference), initial=0.0)))
    np.testing.assert_allclose(actual, reference, rtol=0, atol=TOLERANCES[dtype] * scale)


def run_and_compare(
    group_sizes, num_rows, inner_dim=64, out_dim=64, *, dtype=jnp.float32, seed=0, **blocks
):
    """Runs grouped_matmul (plain and transpose_rhs) and transposed_grouped_matmul in one jit,
    checks them against the reference, padding rows of y and empty groups of dw exactly 0."""
    group_sizes = np.asarray(group_sizes, np.int32)
    assert group_sizes.sum() <= num_rows
    rng = np.random.default_rng(seed)
    x, w, w_t, dy = random_problem(rng, group_sizes, num_rows, inner_dim, out_dim, dtype)

    @jax.jit  # One compilation per case: interpret-mode cost is compile time.
    def kernels(x, w, w_t, dy, group_sizes):
        x, w, w_t, dy = (a.astype(dtype) for a in (x, w, w_t, dy))
        kwargs = dict(interpret=GPU_INTERPRET, **blocks)
        return (
            grouped_matmul(x, w, group_sizes, **kwargs),
            grouped_matmul(x, w_t, group_sizes, transpose_rhs=True, **kwargs),
            transposed_grouped_matmul(x, dy, group_sizes, **kwargs),
        )

    y, y_t, dw = kernels(x, w, w_t, dy, group_sizes)
    assert y.shape == y_t.shape == (num_rows, out_dim) and y.dtype == y_t.dtype == dtype
    assert dw.shape == (len(group_sizes), inner_dim, out_dim) and dw.dtype == dtype
    assert_close(y, reference_grouped_matmul(x, w, group_sizes), dtype)
    assert_close(y_t, reference_grouped_matmul(x, w_t, group_sizes, transpose_rhs=True), dtype)
    assert_close(dw, reference_transposed_grouped_matmul(x, dy, group_sizes), dtype)
    used = int(group_sizes.sum())
    assert np.all(np.asarray(y)[used:] == 0) and np.all(np.asarray(y_t)[used:] == 0)
    assert np.all(np.asarray(dw)[group_sizes == 0] == 0)


@pytest.mark.parametrize(
    "group_sizes, num_rows, inner_dim, out_dim, blocks",
    [
        # E = 1, exactly N rows, N a multiple of the tile: no padding group at all.
        ([64], 64, 32, 32, dict(block_rows=32, block_cols=32, block_inner=32)),
        # E = 1 with padding rows; N = 100 not a multiple of 64 (x padded to 128 rows).
        ([71], 100, 32, 64, {}),
        # E = 3: an empty group, a group spanning five 32-row tiles, padding rows after.
        ([0, 150, 20], 190, 64, 96, dict(block_rows=32)),
        # E = 8: every group smaller than the one 64-row tile, zeros among them, padding.
        ([3, 0, 5, 1, 0, 9, 2, 7], 64, 96, 32, {}),
        # E = 8, random sizes with zeros, N = 200 > sum; K = 96 uses 32-wide inner tiles.
        ("random", 200, 96, 64, dict(block_rows=16, block_cols=32)),
    ],
    ids=["one-group-exact", "one-group-padded", "three-groups", "eight-small", "eight-random"],
)
def test_matches_reference(group_sizes, num_rows, inner_dim, out_dim, blocks):
    if group_sizes == "random":
        rng = np.random.default_rng(1)
        group_sizes = rng.integers(0, 40, 8) * (rng.random(8) < 0.7)  # About 30% empty.
        assert 0 in group_sizes and group_sizes.sum() < num_rows
    run_and_compare(group_sizes, num_rows, inner_dim, out_dim, **blocks)


def test_bfloat16():
    """bf16 inputs and outputs, float32 accumulation; several groups, shared and spanned tiles."""
    run_and_compare([10, 0, 45, 30], 100, 64, 96, dtype=jnp.bfloat16, block_rows=32)


def test_all_groups_empty():
    """No rows at all in any group: y is all zeros, dw all zeros (only padding work)."""
    run_and_compare([0, 0, 0], 40, 32, 32, block_rows=16)


def test_work_follows_the_rows(monkeypatch):
    """Counts the tile products the kernels perform (a host callback wrapped around the module's
    tile matmul, which interpret mode calls only in branches taken): grouped_matmul does one per
    K tile per F tile per real (group, row tile) pair, transposed_grouped_matmul one per
    (K tile, F tile) per row tile of each group; neither does E * (row tiles) of them."""
    group_sizes = np.array([0, 40, 3, 0, 0, 70, 0, 5], np.int32)  # E = 8, N = 150 > sum = 118.
    num_rows, inner_dim, out_dim, block_rows = 150, 64, 64, 32
    k_tiles, f_tiles = 2, 2  # 32-wide K and F tiles.
    products = []
    tile_matmul = gmm.matmul

    def counting_matmul(a, b, **kwargs):
        jax.debug.callback(lambda: products.append(1))
        return tile_matmul(a, b, **kwargs)

    monkeypatch.setattr(gmm, "matmul", counting_matmul)
    rng = np.random.default_rng(2)
    x, w, _, dy = random_problem(rng, group_sizes, num_rows, inner_dim, out_dim, jnp.float32)
    kwargs = dict(block_rows=block_rows, block_cols=32, block_inner=32, interpret=True)  # Callbacks.

    # Real (group, row tile) pairs, counted independently: tiles [0, 40) -> 0, 1; [40, 43) -> 1;
    # [43, 113) -> 1, 2, 3; [113, 118) -> 3: seven pairs, against E * 5 = 40 (group, tile) cells.
    pairs = sum(
        len(range(rows.start // block_rows, -(-rows.stop // block_rows)))
        for rows in group_slices(group_sizes) if rows.stop > rows.start
    )
    assert pairs == 7

    y = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, **kwargs))(x, w, group_sizes)
    jax.effects_barrier()
    assert len(products) == pairs * f_tiles * k_tiles
    assert_close(y, reference_grouped_matmul(x, w, group_sizes), jnp.float32)

    products.clear()
    dw = jax.jit(lambda x, dy, s: transposed_grouped_matmul(x, dy, s, **kwargs))(x, dy, group_sizes)
    jax.effects_barrier()
    assert len(products) == pairs * f_tiles * k_tiles
    assert_close(dw, reference_transposed_grouped_matmul(x, dy, group_sizes), jnp.float32)


def _arguments(**overrides):
    """Valid small arguments for both functions, with some replaced."""
    args = dict(
        x=jnp.ones((40, 32)), w=jnp.ones((3, 32, 48)), dy=jnp.ones((40, 48)),
        group_sizes=jnp.zeros((3,), jnp.int32),
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x=jnp.ones((2, 40, 32))), "x must be"),
        (dict(w=jnp.ones((32, 48))), "w must be"),
        (dict(w=jnp.ones((3, 40, 48))), r"w must be \[E, K, F\] with K = x.shape\[1\] = 32"),
        (dict(w=jnp.ones((3, 32, 48), jnp.bfloat16)), "w must have x's dtype"),
        (dict(x=jnp.ones((40, 32), jnp.float16), w=jnp.ones((3, 32, 48), jnp.float16)),
         "float32 or bfloat16, got float16"),
        (dict(w=jnp.ones((3, 32, 40))), "output dim F must be a positive multiple of 16, got 40"),
        (dict(x=jnp.ones((40, 24)), w=jnp.ones((3, 24, 48))), "inner dim K .* got 24"),
        (dict(group_sizes=jnp.zeros((3,), jnp.float32)), "group_sizes must be int32"),
        (dict(group_sizes=jnp.zeros((3, 1), jnp.int32)), "group_sizes must be int32"),
        (dict(group_sizes=jnp.zeros((4,), jnp.int32)), r"one entry per group of w \(E = 3\)"),
        (dict(block_rows=24), "block_rows must be a power of two >= 16, got 24"),
        (dict(block_cols=8), "block_cols must be a power of two >= 16, got 8"),
        (dict(block_inner=0), "block_inner must be a power of two >= 16, got 0"),
    ],
)
def test_grouped_matmul_rejects_bad_arguments(overrides, message):
    args = _arguments(**overrides)
    args.pop("dy")
    with pytest.raises(ValueError, match=message):
        grouped_matmul(
            args.pop("x"), args.pop("w"), args.pop("group_sizes"), **args, interpret=GPU_INTERPRET
        )


def test_transpose_rhs_checks_the_transposed_layout():
    """With transpose_rhs, w is [E, F, K]: accepted (traced only) and the [E, K, F] layout
    rejected."""
    x, sizes = jnp.ones((40, 32)), jnp.zeros((3,), jnp.int32)
    y = jax.eval_shape(
        lambda x, w: grouped_matmul(x, w, sizes, transpose_rhs=True, interpret=GPU_INTERPRET),
        x, jnp.ones((3, 48, 32)),
    )
    assert y.shape == (40, 48)
    with pytest.raises(ValueError, match=r"w must be \[E, F, K\] with K = x.shape\[1\] = 32"):
        grouped_matmul(x, jnp.ones((3, 32, 48)), sizes, transpose_rhs=True, interpret=GPU_INTERPRET)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x=jnp.ones((40,))), "x must be"),
        (dict(dy=jnp.ones((40, 48, 1))), "dy must be"),
        (dict(dy=jnp.ones((39, 48))), r"dy must be \[N, F\] with N = x.shape\[0\] = 40"),
        (dict(dy=jnp.ones((40, 48), jnp.bfloat16)), "dy must have x's dtype"),
        (dict(dy=jnp.ones((40, 20))), "output dim F .* got 20"),
        (dict(group_sizes=jnp.zeros((0,), jnp.int32)), "E >= 1"),
        (dict(group_sizes=jnp.zeros((3,), jnp.int16)), "group_sizes must be int32"),
        (dict(block_rows=48), "block_rows must be a power of two"),
    ],
)
def test_transposed_grouped_matmul_rejects_bad_arguments(overrides, message):
    args = _arguments(**overrides)
    args.pop("w")
    with pytest.raises(ValueError, match=message):
        transposed_grouped_matmul(
            args.pop("x"), args.pop("dy"), args.pop("group_sizes"), **args, interpret=GPU_INTERPRET
        )


def test_check_support():
    check_support(4096, 14336, jnp.bfloat16)
    check_support(96, 16, jnp.float32)
    with pytest.raises(ValueError, match="inner dim K must be a positive multiple of 16, got 100"):
        check_support(100, 64, jnp.float32)
    with pytest.raises(ValueError, match="output dim F must be a positive multiple of 16, got 8"):
        check_support(64, 8, jnp.float32)
    with pytest.raises(ValueError, match="got float16"):
        check_support(64, 64, jnp.float16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lowers_to_triton_without_a_gpu(dtype):
    """Lowering for CUDA runs the Pallas Triton lowering on CPU (masked stores, a weight picked by
    a run-time group id, loops with data-dependent bounds, tl.dot shapes). N = 100 is padded to
    128 rows; K = 96 takes 32-wide inner tiles; E = 3 is not a power of two."""
    num_rows, inner_dim, out_dim, num_groups = 100, 96, 64, 3
    x = jnp.zeros((num_rows, inner_dim), dtype)
    w = jnp.zeros((num_groups, inner_dim, out_dim), dtype)
    dy = jnp.zeros((num_rows, out_dim), dtype)
    group_sizes = jnp.zeros((num_groups,), jnp.int32)

    def kernels(x, w, dy, group_sizes):
        kwargs = dict(block_rows=32, num_warps=4, num_stages=2)
        return (
            grouped_matmul(x, w, group_sizes, **kwargs),
            grouped_matmul(dy, w, group_sizes, transpose_rhs=True, **kwargs),
            transposed_grouped_matmul(x, dy, group_sizes, **kwargs),
        )

    with compat.triton_lowering_without_gpu():
        text = jax.jit(kernels).trace(x, w, dy, group_sizes).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
    assert GROUPED_MATMUL_NAME in text and TRANSPOSED_GROUPED_MATMUL_NAME in text
    element = "f32" if dtype == jnp.float32 else "bf16"
    results = sorted(line.rsplit("-> ", 1)[1] for line in text.splitlines() if "gpu.triton" in line)
    assert results == sorted([
        f"tensor<128x{out_dim}x{element}>",  # y, padded rows (sliced to N outside the kernel).
        f"tensor<128x{inner_dim}x{element}>",  # dx = dy @ w[e].T.
        f"tensor<{num_groups}x{inner_dim}x{out_dim}x{element}>",  # dw.
    ])
