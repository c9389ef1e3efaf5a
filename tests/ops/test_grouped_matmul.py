"""grouped_matmul: every implementation against reference and lax.ragged_dot, forward, dx and dw."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.ops.grouped_matmul import group_tiles, grouped_matmul
from jaxsparse.testing import assert_allclose, random_normal
from tests.backend import needs_tpu_or_cpu

# (group sizes, N): zeros, groups smaller than a tile, one spanning tiles, padding rows past the sum.
GROUPINGS = {
    "mixed": ([7, 0, 40, 3, 0, 18], 80),
    "one_group": ([50], 50),
    "padding_rows": ([10, 20, 5], 64),
    "empty": ([0, 0, 0], 16),
}


def _inputs(seed, sizes, num_rows, inner, outer, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    x = random_normal(keys[0], (num_rows, inner), dtype)
    w = random_normal(keys[1], (len(sizes), inner, outer), dtype, scale=inner**-0.5)
    return x, w, jnp.asarray(sizes, jnp.int32), random_normal(keys[2], (num_rows, outer))


def _loop_reference(x, w, sizes):
    """float64 per-group loop."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y, start = np.zeros((x.shape[0], w.shape[2])), 0
    for e, size in enumerate(sizes):
        y[start : start + size] = x[start : start + size] @ w[e]
        start += size
    return y


class GroupedMatmulContract:
    implementation = "xla"
    inner, outer = 32, 48

    @pytest.mark.parametrize("grouping", sorted(GROUPINGS))
    def test_forward_and_gradients_match_reference(self, grouping):
        sizes, num_rows = GROUPINGS[grouping]
        x, w, group_sizes, upstream = _inputs(0, sizes, num_rows, self.inner, self.outer)

        def value_and_grads(implementation):
            loss = lambda x, w: jnp.sum(upstream * grouped_matmul(x, w, group_sizes, implementation=implementation))  # noqa: E731
            return grouped_matmul(x, w, group_sizes, implementation=implementation), jax.grad(loss, argnums=(0, 1))(x, w)

        run = jax.jit(lambda: (value_and_grads(self.implementation), value_and_grads("reference")))
        (y, grads), (y_ref, grads_ref) = run()
        assert_allclose(y, y_ref)
        assert_allclose(y, _loop_reference(x, w, sizes), dtype=jnp.float32)
        assert np.all(np.asarray(y)[sum(sizes):] == 0)  # padding rows
        assert_allclose(grads, grads_ref, kind="gradient")

    def test_matches_ragged_dot(self):
        sizes, num_rows = GROUPINGS["mixed"]
        x, w, group_sizes, _ = _inputs(1, sizes, num_rows, self.inner, self.outer)
        y = jax.jit(lambda: grouped_matmul(x, w, group_sizes, implementation=self.implementation))()
        assert_allclose(y, jax.lax.ragged_dot(x, w, group_sizes))

    def test_bfloat16(self):
        sizes, num_rows = GROUPINGS["mixed"]
        x, w, group_sizes, _ = _inputs(2, sizes, num_rows, self.inner, self.outer, jnp.bfloat16)
        y = jax.jit(lambda: grouped_matmul(x, w, group_sizes, implementation=self.implementation))()
        assert y.dtype == jnp.bfloat16
        assert_allclose(y, _loop_reference(x, w, sizes), dtype=jnp.bfloat16)

    def test_traced_random_group_sizes(self):
        x, w, _, _ = _inputs(3, [0] * 5, 96, self.inner, self.outer)

        @jax.jit
        def run(key):
            cuts = jnp.sort(jax.random.randint(key, (4,), 0, 90))
            sizes = jnp.diff(jnp.concatenate([jnp.zeros(1, jnp.int32), cuts, jnp.full(1, 90, jnp.int32)]))
            return sizes, grouped_matmul(x, w, sizes, implementation=self.implementation)

        for seed in range(2):
            sizes, y = run(jax.random.key(seed))
            assert_allclose(y, _loop_reference(x, w, np.asarray(sizes).tolist()), dtype=jnp.float32)


class TestXla(GroupedMatmulContract):
    implementation = "xla"


class TestPallasGpu(GroupedMatmulContract):
    implementation = "pallas_gpu"


@needs_tpu_or_cpu
class TestPallasTpu(GroupedMatmulContract):
    implementation = "pallas_tpu"
    inner, outer = 128, 128


def test_xla_work_follows_rows_not_groups():
    """The xla loop visits ceil-per-group row tiles, never E x tiles (what makes it one matmul's cost)."""
    sizes = jnp.asarray([100, 0, 0, 300, 12, 100] + [0] * 58, jnp.int32)  # E = 64, N = 512
    tiles = group_tiles(sizes, 512, 128)
    starts = np.cumsum([0] + np.asarray(sizes).tolist())[:-1]
    expected = sum(((s + n - 1) // 128 - s // 128 + 1) for s, n in zip(starts, np.asarray(sizes)) if n > 0)
    assert int(tiles.num_pairs) == expected == 7
    assert tiles.group.shape == (512 // 128 + 64,)


@pytest.mark.parametrize(
    "x_shape, w_shape, sizes, error, message",
    [
        ((8,), (2, 8, 4), [4, 4], ValueError, "x must be"),
        ((8, 4), (2, 5, 4), [4, 4], ValueError, "w must be"),
        ((8, 4), (2, 4, 4), [4, 4, 0], ValueError, "group_sizes must be integer"),
        ((8, 4), (2, 4, 4), [6, 4], ValueError, "sum to at most N"),
        ((8, 4), (2, 4, 4), [-1, 4], ValueError, "group_sizes must be >= 0"),
    ],
)
def test_bad_input(x_shape, w_shape, sizes, error, message):
    with pytest.raises(error, match=message):
        grouped_matmul(jnp.ones(x_shape), jnp.ones(w_shape), jnp.asarray(sizes, jnp.int32))


def test_bad_dtype_and_implementation():
    with pytest.raises(TypeError, match="w must have x's dtype"):
        grouped_matmul(jnp.ones((8, 4)), jnp.ones((2, 4, 4), jnp.bfloat16), jnp.asarray([4, 4]))
    with pytest.raises(ValueError, match="implementation must be"):
        grouped_matmul(jnp.ones((8, 4)), jnp.ones((2, 4, 4)), jnp.asarray([4, 4]), implementation="megablox")
