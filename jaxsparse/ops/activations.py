"""Sparsifying activations: CATS thresholding and its calibration, ReLU², shifted ReLU.

Also the table of gate activations that the sparse FFN op and layers accept by name.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def relu2(x):
    """Squared ReLU, ``max(x, 0) ** 2`` (Primer, So et al. 2021; ReLU² wins, Zhang et al. 2024)."""
    return jnp.square(jax.nn.relu(x))


def shifted_relu(x, shift):
    """``max(x - shift, 0)``: ReLU with a (scalar or broadcastable) threshold ``shift`` (ProSparse)."""
    return jax.nn.relu(x - shift)


def cats(activations, threshold):
    """CATS: zero the activations whose magnitude is below ``threshold``.

    ``where(|a| >= threshold, a, 0)`` applied to the gate activations ``a = SiLU(x W_gate)`` of a gated
    FFN (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity"); the FFN output is then
    ``W_down^T (cats(a, t) * (x W_up))``. Gradients flow to the kept entries.

    Args:
      activations: any shape.
      threshold: a scalar or an array broadcastable to ``activations`` (e.g. one per neuron), usually
        from :func:`calibrate_cats_threshold`.
    """
    activations = jnp.asarray(activations)
    return jnp.where(jnp.abs(activations) >= threshold, activations, jnp.zeros((), activations.dtype))


def calibrate_cats_threshold(activations, sparsity: float, *, axis=None):
    """The CATS threshold that zeroes a ``sparsity`` share of ``activations``: a quantile of ``|a|``.

    Args:
      activations: gate activations collected on calibration data, e.g. ``[N, F]``.
      sparsity: target share of zeros, in ``[0, 1)``.
      axis: None for one threshold per layer (as CATS does); an axis (or axes) to reduce over for
        finer thresholds, e.g. ``axis=0`` gives one per neuron.

    Returns:
      float32 threshold(s): a scalar for ``axis=None``.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    magnitudes = jnp.abs(jnp.asarray(activations, jnp.float32))
    return jnp.quantile(magnitudes, sparsity, axis=axis)


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x):
    """GELU, erf form."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": gelu_tanh,
    "gelu_exact": gelu_exact,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "relu2": relu2,
}


def get_activation(activation: str | Callable) -> Callable:
    """The elementwise function for an activation name in :data:`ACTIVATIONS`, or a callable as is.

    Raises:
      ValueError: an unknown name.
    """
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be a callable or one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]
