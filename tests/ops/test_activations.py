"""CATS thresholding and calibration, ReLU², shifted ReLU, the activation table."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.ops.activations import ACTIVATIONS, calibrate_cats_threshold, cats, get_activation, relu2, shifted_relu
from jaxsparse.testing import random_normal


def test_cats_zeroes_small_magnitudes_and_passes_gradients_to_the_rest():
    a = random_normal(jax.random.key(0), (8, 64))
    upstream = random_normal(jax.random.key(1), (8, 64))
    out, grad = jax.value_and_grad(lambda a: jnp.sum(upstream * cats(a, 0.7)))(a)
    kept = np.abs(np.asarray(a)) >= 0.7
    np.testing.assert_allclose(float(out), float(np.sum(np.where(kept, np.asarray(upstream * a), 0.0))), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(grad), np.where(kept, np.asarray(upstream), 0.0))


def test_cats_per_neuron_threshold_broadcasts():
    a = random_normal(jax.random.key(2), (4, 3))
    threshold = jnp.asarray([0.1, 1.0, 10.0])
    np.testing.assert_array_equal(np.asarray(cats(a, threshold)), np.where(np.abs(np.asarray(a)) >= np.asarray(threshold), np.asarray(a), 0.0))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_calibrated_threshold_reaches_the_target_sparsity(sparsity):
    calibration = jax.nn.silu(random_normal(jax.random.key(3), (512, 256)))
    threshold = calibrate_cats_threshold(calibration, sparsity)
    np.testing.assert_allclose(float(threshold), np.quantile(np.abs(np.asarray(calibration)), sparsity), rtol=1e-5)
    held_out = jax.nn.silu(random_normal(jax.random.key(4), (512, 256)))
    zeros = float(jnp.mean(cats(held_out, threshold) == 0))
    assert abs(zeros - sparsity) < 0.01, zeros


def test_calibrate_per_neuron_and_bad_sparsity():
    calibration = random_normal(jax.random.key(5), (100, 4))
    assert calibrate_cats_threshold(calibration, 0.5, axis=0).shape == (4,)
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="sparsity must be in"):
            calibrate_cats_threshold(calibration, bad)


def test_relu_family():
    x = random_normal(jax.random.key(6), (64,))
    xn = np.asarray(x)
    np.testing.assert_allclose(np.asarray(relu2(x)), np.maximum(xn, 0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(shifted_relu(x, 0.3)), np.maximum(xn - 0.3, 0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda x: jnp.sum(relu2(x)))(x)), 2 * np.maximum(xn, 0), rtol=1e-6)


def test_activation_table():
    for name, fn in ACTIVATIONS.items():
        assert float(fn(jnp.zeros(()))) == 0.0, name  # sparse gates rely on activation(0) == 0
    assert get_activation(jnp.tanh) is jnp.tanh
    with pytest.raises(ValueError, match="activation must be"):
        get_activation("swish2")
