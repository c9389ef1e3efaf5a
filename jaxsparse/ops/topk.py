"""Choosing the active entries of a row: exact top-k and statistical top-k (linear time, no sort).

Both keep the largest entries along an axis and fill the rest. ``topk_mask`` finds the k-th largest
value (``lax.top_k``, a partial sort; or ``lax.approx_max_k``, fast only on TPU);
``statistical_topk`` estimates it from the row's mean and standard deviation as if the row were
Gaussian (Spark Transformer, You et al. 2025; Gemma 3n's activation sparsity), which costs two
fused reductions instead of a sort. On rows that are not Gaussian the count of survivors is only
approximately k: heavier tails keep fewer (REFERENCES: 8% target kept 7.99% Gaussian, 6.9% Laplace,
4.7% Student-t(3)).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from jax import lax

_MODES = ("soft", "hard", "logits")


def _axis_size(x, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for an array of rank {x.ndim}")
    return x.shape[axis]


def resolve_k(size: int, *, k=None, sparsity=None) -> int:
    """The count of entries to keep out of ``size``, from exactly one of ``k`` and ``sparsity``.

    ``sparsity`` is the share of entries to zero: ``k = round((1 - sparsity) * size)``, at least 1.

    Raises:
      ValueError: both or neither given, ``k`` outside ``[1, size]``, ``sparsity`` outside ``[0, 1)``.
    """
    if (k is None) == (sparsity is None):
        raise ValueError(f"give exactly one of k and sparsity, got k={k!r}, sparsity={sparsity!r}")
    if sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        return max(1, round((1.0 - sparsity) * size))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise ValueError(f"k must be an integer in [1, {size}] (the axis size), got {k!r}")
    return k


def _normal_quantile(probability: float) -> float:
    """``ndtri(p)``, the standard normal quantile, in float64 on the host (``p`` is static)."""
    return statistics.NormalDist().inv_cdf(probability)


def _drop_fraction(size: int, *, k=None, sparsity=None) -> float:
    """``1 - k / size``, or ``sparsity`` itself (not rounded to a count), after validation."""
    k_resolved = resolve_k(size, k=k, sparsity=sparsity)
    return float(sparsity) if sparsity is not None else 1.0 - k_resolved / size


def topk_mask(x, k: int, *, axis: int = -1, approximate: bool = False, fill: float = 0.0,
              recall_target: float = 0.95):
    """Keeps the entries of ``x`` that are >= the k-th largest along ``axis``; the rest become ``fill``.

    ``out = where(x >= kth_largest(x, k, axis), x, fill)``. Ties with the k-th value are all kept,
    so a row may keep more than ``k`` entries. Gradients flow to the kept entries only.

    Args:
      x: any shape, floating dtype.
      k: entries to keep, in ``[1, x.shape[axis]]``.
      axis: the axis to select along.
      approximate: use ``lax.approx_max_k`` (fast on TPU; on CPU and GPU it is exact and as slow as
        ``lax.top_k``). It may return a smaller k-th value, so a row may keep more entries.
      fill: the value of the dropped entries: 0 for activations, ``-jnp.inf`` for logits.
      recall_target: ``approx_max_k``'s expected recall when ``approximate``.

    Returns:
      An array like ``x``.

    Raises:
      ValueError: ``k`` outside ``[1, x.shape[axis]]``, or ``axis`` out of range.
    """
    x = jnp.asarray(x)
    k = resolve_k(_axis_size(x, axis), k=k)
    rows = jnp.moveaxis(x, axis, -1)
    if approximate:
        values, _ = lax.approx_max_k(rows, k, recall_target=recall_target)
    else:
        values, _ = lax.top_k(rows, k)
    kth = lax.stop_gradient(jnp.min(values, axis=-1, keepdims=True))
    kept = jnp.where(rows >= kth, rows, jnp.asarray(fill, x.dtype))
    return jnp.moveaxis(kept, -1, axis)


def statistical_threshold(x, *, k=None, sparsity=None, axis: int = -1, stop_gradient: bool = False):
    """The statistical top-k threshold ``theta = mean + std * ndtri(1 - k/d)`` along ``axis``.

    ``std`` is the population standard deviation; both statistics are computed in float32. With
    ``sparsity`` the quantile is ``ndtri(sparsity)`` exactly (not rounded to a count). For ``k = d``
    (sparsity 0) theta is ``-inf``.

    Args:
      x: any shape; ``d = x.shape[axis]``.
      k, sparsity: exactly one: entries to keep (``[1, d]``) or share to drop (``[0, 1)``).
      axis: the axis of the rows.
      stop_gradient: block gradients through theta (by default they flow through mean and std).

    Returns:
      float32 theta with ``axis`` kept as size 1 (broadcasts against ``x``).
    """
    x = jnp.asarray(x)
    drop = _drop_fraction(_axis_size(x, axis), k=k, sparsity=sparsity)
    rows = x.astype(jnp.float32)
    mean = jnp.mean(rows, axis=axis, keepdims=True)
    variance = jnp.mean(jnp.square(rows - mean), axis=axis, keepdims=True)
    # max(var, tiny) keeps the gradient finite on constant rows (d sqrt / d var is infinite at 0);
    # it changes std by at most 1e-19.
    std = jnp.sqrt(jnp.maximum(variance, jnp.finfo(jnp.float32).tiny))
    theta = mean + std * _normal_quantile(drop) if drop > 0 else jnp.full_like(mean, -jnp.inf)
    return lax.stop_gradient(theta) if stop_gradient else theta


def statistical_topk(x, *, k=None, sparsity=None, axis: int = -1, mode: str = "soft",
                     stop_gradient: bool = False):
    """Statistical top-k: keeps about ``k`` of the ``d`` entries along ``axis`` in linear time.

    With ``theta`` from :func:`statistical_threshold` (``mean + std * ndtri(1 - k/d)``, exact for
    Gaussian rows in expectation):

    - ``mode="soft"``: ``max(x - theta, 0)``, shift then ReLU (Spark FFN, Gemma 3n);
    - ``mode="hard"``: ``where(x > theta, x, 0)``;
    - ``mode="logits"``: ``where(x > theta, x, -inf)`` (attention scores).

    ``k = d`` (``sparsity=0``) keeps every entry unchanged in every mode (theta is -inf, so the soft
    shift is dropped). Reference: Spark Transformer (You et al., 2025), statistical top-k.

    Args:
      x: any shape, floating dtype.
      k: entries to keep per row, an integer in ``[1, d]``.
      sparsity: share of entries to drop, in ``[0, 1)``; give exactly one of ``k`` and ``sparsity``.
      axis: the axis of the rows.
      mode: ``"soft"``, ``"hard"`` or ``"logits"``.
      stop_gradient: treat theta as a constant in the backward pass. Only the soft mode has a
        gradient through theta; the hard and logits modes pass gradients to the kept entries.

    Returns:
      An array like ``x``.

    Raises:
      ValueError: both or neither of ``k`` and ``sparsity``, either out of range, unknown ``mode``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    x = jnp.asarray(x)
    if _drop_fraction(_axis_size(x, axis), k=k, sparsity=sparsity) == 0:
        return x
    theta = statistical_threshold(x, k=k, sparsity=sparsity, axis=axis, stop_gradient=stop_gradient)
    shifted = x.astype(jnp.float32) - theta
    if mode == "soft":
        return jnp.maximum(shifted, 0.0).astype(x.dtype)
    fill = 0.0 if mode == "hard" else -jnp.inf
    return jnp.where(shifted > 0, x, jnp.asarray(fill, x.dtype))

