"""SparseGatedFFN and SparkFFN: training path against numpy formulas, decode path against training
path, sparsity 0 against the dense FFN, activity collection, and bad settings."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn import SparkFFN, SparseGatedFFN, collect_activity, sparsity_report
from jaxsparse.testing import assert_allclose, random_normal


def _np_gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _np_silu(z):
    return z / (1 + np.exp(-z))


def _np_stat_topk(z, sparsity, mode):
    theta = z.mean(-1, keepdims=True) + z.std(-1, keepdims=True) * statistics.NormalDist().inv_cdf(sparsity)
    return np.maximum(z - theta, 0) if mode == "soft" else np.where(z > theta, z, 0)


def _params(layer):
    return {name: np.asarray(value, np.float64) for name, value in nnx.to_pure_dict(nnx.state(layer, nnx.Param)).items()}


def _np_spark(x, p, r, sparsity, mode):
    x = np.asarray(x, np.float64)
    z1 = x[..., :r] @ p["w_in"][:, :r].T
    a = _np_gelu(_np_stat_topk(z1, sparsity, mode)) if sparsity > 0 else _np_gelu(z1)
    return (a * (x[..., r:] @ p["w_in"][:, r:].T)) @ p["w_out"]


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("sparsity", [0.9, 0.0])
def test_spark_ffn_matches_numpy_formula(mode, sparsity):
    layer = SparkFFN(32, 128, predictor_dim=8, sparsity=sparsity, mode=mode, rngs=nnx.Rngs(0))
    x = random_normal(jax.random.key(1), (2, 5, 32))
    y, activity = nnx.jit(lambda m, x: m(x, return_activity=True))(layer, x)
    expected = _np_spark(x, _params(layer), 8, sparsity, mode)
    assert_allclose(y, expected, dtype=jnp.float32)
    if sparsity == 0:  # the dense FFN: every neuron active
        assert bool(jnp.all(activity))
    else:
        assert abs(float(jnp.mean(activity)) - 0.1) < 0.04


def test_spark_ffn_gradients_match_formula():
    layer = SparkFFN(32, 128, predictor_dim=8, sparsity=0.9, rngs=nnx.Rngs(2))
    x = random_normal(jax.random.key(3), (6, 32))
    upstream = random_normal(jax.random.key(4), (6, 32))

    def formula(params, x):  # the same math written independently in jnp
        w_in, w_out = params["w_in"], params["w_out"]
        z1 = x[:, :8] @ w_in[:, :8].T
        theta = z1.mean(-1, keepdims=True) + z1.std(-1, keepdims=True) * statistics.NormalDist().inv_cdf(0.9)
        return (jax.nn.gelu(jax.nn.relu(z1 - theta)) * (x[:, 8:] @ w_in[:, 8:].T)) @ w_out

    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    expected = jax.grad(lambda p, x: jnp.sum(upstream * formula(p, x)), argnums=(0, 1))(params, x)
    graph, state = nnx.split(layer)
    actual = jax.grad(lambda s, x: jnp.sum(upstream * nnx.merge(graph, s)(x)), argnums=(0, 1))(state, x)
    assert_allclose((nnx.to_pure_dict(actual[0]), actual[1]), expected, kind="gradient")


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("layer_type", ["spark", "gated"])
def test_decode_path_equals_training_path(layer_type, chunk):
    if layer_type == "spark":
        layer = SparkFFN(32, 192, predictor_dim=8, sparsity=0.92, rngs=nnx.Rngs(5))
    else:
        layer = SparseGatedFFN(32, 192, rule="statistical_topk", sparsity=0.9, rngs=nnx.Rngs(5))
    x = random_normal(jax.random.key(6), (8, 32))
    run = nnx.jit(lambda m, x: (m(x), m.decode(x, k_max=96, chunk=chunk)))
    y_train, (y_decode, active) = run(layer, x)
    assert int(active.dropped.sum()) == 0
    assert int(active.counts.max()) < 96  # the decode path really gathered a subset
    assert_allclose(y_decode, y_train)


def test_decode_through_a_pallas_kernel_in_interpret_mode():
    layer = SparkFFN(32, 192, predictor_dim=8, sparsity=0.9, rngs=nnx.Rngs(7))
    x = random_normal(jax.random.key(8), (2, 32))
    run = nnx.jit(lambda m, x: (m(x), m.decode(x, k_max=48, implementation="pallas_gpu")[0]))
    y_train, y_decode = run(layer, x)
    assert_allclose(y_decode, y_train)


@pytest.mark.parametrize(
    "rule, activation, kwargs",
    [
        ("none", "gelu", {}),
        ("none", "relu2", {}),
        ("topk", "gelu", {"sparsity": 0.75}),
        ("statistical_topk", "gelu", {"sparsity": 0.9}),
        ("statistical_topk", "gelu", {"sparsity": 0.0}),
        ("cats", "silu", {"threshold": 0.3}),
    ],
)
def test_sparse_gated_ffn_matches_numpy_formula(rule, activation, kwargs):
    layer = SparseGatedFFN(16, 64, rule=rule, activation=activation, rngs=nnx.Rngs(9), **kwargs)
    x = random_normal(jax.random.key(10), (3, 4, 16))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    p = _params(layer)
    xn = np.asarray(x, np.float64)
    z = xn @ p["w_gate"].T
    if rule == "topk":
        k = 16  # (1 - 0.75) * 64
        z = np.where(z >= -np.sort(-z, axis=-1)[..., k - 1 : k], z, 0)
    elif rule == "statistical_topk" and kwargs["sparsity"] > 0:
        z = _np_stat_topk(z, kwargs["sparsity"], "soft")
    a = {"gelu": _np_gelu, "silu": _np_silu, "relu2": lambda z: np.maximum(z, 0) ** 2}[activation](z)
    if rule == "cats":
        a = np.where(np.abs(a) >= 0.3, a, 0)
    assert_allclose(y, (a * (xn @ p["w_up"].T)) @ p["w_down"], dtype=jnp.float32)


def test_cats_calibration_reaches_target():
    layer = SparseGatedFFN(32, 256, rule="cats", activation="silu", rngs=nnx.Rngs(11))
    threshold = layer.calibrate_threshold(random_normal(jax.random.key(12), (256, 32)), 0.7)
    assert threshold == layer.threshold > 0
    _, activity = layer(random_normal(jax.random.key(13), (256, 32)), return_activity=True)
    assert abs(float(jnp.mean(activity)) - 0.3) < 0.02


def test_bfloat16_computation():
    layer = SparkFFN(32, 128, predictor_dim=8, sparsity=0.9, dtype=jnp.bfloat16, rngs=nnx.Rngs(14))
    x = random_normal(jax.random.key(15), (4, 32))
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    assert_allclose(y, layer.decode(x, k_max=64)[0], dtype=jnp.bfloat16)


def test_collect_activity_and_report():
    class TwoLayers(nnx.Module):
        def __init__(self):
            self.spark = SparkFFN(16, 64, predictor_dim=4, sparsity=0.9, rngs=nnx.Rngs(16))
            self.gated = SparseGatedFFN(16, 64, rule="statistical_topk", sparsity=0.8, rngs=nnx.Rngs(17))

        def __call__(self, x):
            return self.gated(x + self.spark(x))

    model = TwoLayers()
    x = random_normal(jax.random.key(18), (2, 32, 16))
    output, activity = nnx.jit(collect_activity)(model, x)
    assert_allclose(output, model(x))
    assert set(activity) == {"spark", "gated"} and not model.spark.record_activity
    assert not nnx.state(model, nnx.Intermediate)  # nothing left behind
    _, spark_activity = model.spark(x, return_activity=True)
    np.testing.assert_array_equal(np.asarray(activity["spark"]), np.asarray(spark_activity))
    report = sparsity_report(activity, chunk_sizes=(4,))
    assert set(report["gated"]) == {"activation_ratio", "tls", "cls_4"}
    assert report["spark"]["tls"] == pytest.approx(1 - report["spark"]["activation_ratio"])
    assert report["spark"]["tls"] > report["spark"]["cls_4"]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SparkFFN(32, 64, predictor_dim=0, rngs=nnx.Rngs(0)), r"predictor_dim \(r\) must be"),
        (lambda: SparkFFN(32, 64, predictor_dim=32, rngs=nnx.Rngs(0)), r"predictor_dim \(r\) must be"),
        (lambda: SparkFFN(32, 64, sparsity=1.0, rngs=nnx.Rngs(0)), "sparsity must be"),
        (lambda: SparkFFN(32, 64, mode="linear", rngs=nnx.Rngs(0)), "mode must be"),
        (lambda: SparkFFN(0, 64, rngs=nnx.Rngs(0)), "model_dim must be"),
        (lambda: SparseGatedFFN(32, 64, rule="topk", rngs=nnx.Rngs(0)), "needs sparsity"),
        (lambda: SparseGatedFFN(32, 64, rule="statistical_topk", sparsity=-0.1, rngs=nnx.Rngs(0)), "sparsity must be"),
        (lambda: SparseGatedFFN(32, 64, rule="dropout", rngs=nnx.Rngs(0)), "rule must be"),
        (lambda: SparseGatedFFN(32, 64, rule="none", threshold=0.1, rngs=nnx.Rngs(0)), "threshold is used"),
        (lambda: SparseGatedFFN(32, 64, rule="none", activation="tanhh", rngs=nnx.Rngs(0)), "activation must be"),
        (lambda: SparseGatedFFN(32, 64, rule="cats", rngs=nnx.Rngs(0))(jnp.ones((1, 32))), "needs a threshold"),
        (lambda: SparkFFN(32, 64, rngs=nnx.Rngs(0)).decode(jnp.ones((2, 32)), k_max=0), "k_max must be"),
    ],
)
def test_bad_settings(build, message):
    with pytest.raises(ValueError, match=message):
        build()
