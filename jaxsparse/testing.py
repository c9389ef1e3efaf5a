"""Tolerances and comparison helpers shared by the test suite (and by users testing their own ops).

One table, by dtype and by forward/gradient. Every loosening has a reason next to it. Also the
wall-clock helper the benchmark scripts share (speed is measured in benchmarks, never asserted).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tolerance:
    """Absolute and relative tolerance for ``np.testing.assert_allclose``."""

    atol: float
    rtol: float


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # float32: blockwise online softmax vs one dense softmax differ by reassociation only.
    ("float32", "forward"): Tolerance(atol=2e-5, rtol=2e-5),
    # Gradients sum over many more terms (whole rows and columns) in a different order.
    ("float32", "gradient"): Tolerance(atol=2e-4, rtol=2e-4),
    # bfloat16 inputs: 8 mantissa bits; the kernels round probabilities to bf16 before P @ V,
    # as flash attention does, while the reference keeps them in float32.
    ("bfloat16", "forward"): Tolerance(atol=2e-2, rtol=2e-2),
    # bf16 gradients also round dS before the two matmuls that produce dQ and dK.
    ("bfloat16", "gradient"): Tolerance(atol=6e-2, rtol=6e-2),
    # float16 behaves like bf16 with more mantissa and less range.
    ("float16", "forward"): Tolerance(atol=5e-3, rtol=5e-3),
    ("float16", "gradient"): Tolerance(atol=2e-2, rtol=2e-2),
}


def tolerance(dtype, kind: str = "forward") -> Tolerance:
    """The tolerance for comparing outputs computed from inputs of ``dtype``.

    Args:
      dtype: the dtype of the inputs of the op under test.
      kind: ``"forward"`` or ``"gradient"``.

    Raises:
      ValueError: for a dtype or kind the table does not cover.
    """
    key = (jnp.dtype(dtype).name, kind)
    if key not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype={key[0]!r}, kind={kind!r}; known: {sorted(TOLERANCES)}")
    return TOLERANCES[key]


def assert_allclose(actual, expected, *, dtype=None, kind: str = "forward", err_msg: str = "") -> None:
    """Compares two arrays (or pytrees of arrays) in float32 with the table's tolerance.

    Non-finite entries must match exactly (``-inf`` where the reference has ``-inf``); NaN is never
    accepted, even where both sides have it.

    Args:
      actual: the value under test.
      expected: the reference value (same tree structure and shapes).
      dtype: the input dtype that selects the tolerance; defaults to ``expected``'s dtype.
      kind: ``"forward"`` or ``"gradient"``.
      err_msg: appended to the failure message.
    """
    actual_leaves, actual_tree = jax.tree.flatten(actual)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    if actual_tree != expected_tree:
        raise AssertionError(f"tree structure differs: {actual_tree} vs {expected_tree}. {err_msg}")
    for index, (a, e) in enumerate(zip(actual_leaves, expected_leaves)):
        tol = tolerance(dtype if dtype is not None else e.dtype, kind)
        a32 = np.asarray(jnp.asarray(a, jnp.float32))
        e32 = np.asarray(jnp.asarray(e, jnp.float32))
        if a32.shape != e32.shape:
            raise AssertionError(f"leaf {index}: shape {a32.shape} != {e32.shape}. {err_msg}")
        if np.isnan(a32).any() or np.isnan(e32).any():
            raise AssertionError(f"leaf {index}: NaN in {'actual' if np.isnan(a32).any() else 'expected'}. {err_msg}")
        np.testing.assert_array_equal(np.isfinite(a32), np.isfinite(e32), err_msg=f"leaf {index}: finite pattern. {err_msg}")
        finite = np.isfinite(e32)
        np.testing.assert_array_equal(a32[~finite], e32[~finite], err_msg=f"leaf {index}: infinities. {err_msg}")
        np.testing.assert_allclose(a32[finite], e32[finite], atol=tol.atol, rtol=tol.rtol, err_msg=f"leaf {index}. {err_msg}")


def random_normal(key, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    """Standard normal test data (never zeros), cast to ``dtype``."""
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def median_time(fn, *args, repeats: int = 3) -> float:
    """Median wall time in seconds of ``fn(*args)`` after one warm-up (compilation) call."""
    return interleaved_median_times({"fn": fn}, [args], repeats)["fn"]


def interleaved_median_times(fns: dict, inputs, rounds: int, *, before=None) -> dict:
    """Median wall time in seconds of each ``fns[name](*inputs[i])``, measured in interleaved rounds.

    After one warm-up (compilation) call each, every round runs each function once on the round's
    input (``inputs`` in turn), so the drift of a shared machine and the input's effect on
    data-dependent code touch every function alike: their ratios are side by side. ``before()``,
    if given, runs untimed before every timed call (e.g. to evict the caches).
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*inputs[0]))
    times = {name: [] for name in fns}
    for turn in range(rounds):
        args = inputs[turn % len(inputs)]
        for name, fn in fns.items():
            if before is not None:
                jax.block_until_ready(before())
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
