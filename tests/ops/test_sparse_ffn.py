"""sparse_ffn: every implementation against reference, the reference against a float64 loop,
active-neuron selection against brute force, and the overflow policies of sparse_ffn_decode."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxsparse.ops.activations import gelu_tanh
from jaxsparse.ops.sparse_ffn import ActiveNeurons, select_active_neurons, sparse_ffn, sparse_ffn_decode
from jaxsparse.testing import assert_allclose, random_normal
from tests.backend import needs_tpu_or_cpu


def _weights(seed, neurons, width, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [random_normal(key, (neurons, width), dtype, scale=width**-0.5) for key in keys]


def _random_active(seed, groups, neurons, k_max, counts):
    """Distinct random neurons per group; padding entries are random valid indices too."""
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(neurons)[:k_max] for _ in range(groups)]).astype(np.int32)
    counts = np.asarray(counts, np.int32)
    return ActiveNeurons(indices=jnp.asarray(indices), counts=jnp.asarray(counts), selected=jnp.asarray(counts))


def _loop_sparse_ffn(x, w_up, w_down, active, *, w_gate=None, gate=None, activation=None):
    """float64 per-token loop over the token's listed neurons (independent of the library)."""
    x, w_up, w_down = (np.asarray(a, np.float64) for a in (x, w_up, w_down))
    groups = active.indices.shape[0]
    length = x.shape[0] // groups
    y = np.zeros_like(x)
    for n in range(x.shape[0]):
        g = n // length
        for j in range(int(active.counts[g])):
            neuron = int(active.indices[g, j])
            if w_gate is not None:
                a = float(activation(jnp.float32(x[n] @ np.asarray(w_gate, np.float64)[neuron])))
            else:
                a = float(gate[n, j])
            y[n] += a * (x[n] @ w_up[neuron]) * w_down[neuron]
    return y


class SparseFFNContract:
    """What every implementation must do; subclasses set ``implementation`` and the sizes."""

    implementation = "xla"
    width = 64  # M
    neurons = 96  # F

    def _run(self, x, w_up, w_down, active, **kwargs):
        return sparse_ffn(x, w_up, w_down, active, implementation=self.implementation, **kwargs)

    @pytest.mark.parametrize("activation", ["gelu", "silu"])
    @pytest.mark.parametrize("chunk", [1, 4])
    def test_gate_weight_form_matches_reference(self, activation, chunk):
        groups, k_max = 3, 40
        w_gate, w_up, w_down = _weights(0, self.neurons, self.width)
        x = random_normal(jax.random.key(1), (groups * chunk, self.width))
        active = _random_active(2, groups, self.neurons, k_max, [25, 0, k_max])
        run = jax.jit(lambda *a: (self._run(*a, w_gate=w_gate, activation=activation),
                                  sparse_ffn(*a, w_gate=w_gate, activation=activation, implementation="reference")))
        actual, expected = run(x, w_up, w_down, active)
        assert_allclose(actual, expected)
        assert np.all(np.asarray(actual)[chunk : 2 * chunk] == 0)  # count 0: exactly zero

    @pytest.mark.parametrize("chunk", [1, 3])
    def test_gate_value_form_matches_reference(self, chunk):
        groups, k_max = 2, 33
        _, w_up, w_down = _weights(3, self.neurons, self.width)
        x = random_normal(jax.random.key(4), (groups, chunk, self.width))
        gate = random_normal(jax.random.key(5), (groups, chunk, k_max))
        active = _random_active(6, groups, self.neurons, k_max, [17, 33])
        run = jax.jit(lambda *a: (self._run(*a, gate=gate), sparse_ffn(*a, gate=gate, implementation="reference")))
        actual, expected = run(x, w_up, w_down, active)
        assert actual.shape == x.shape
        assert_allclose(actual, expected)

    def test_bfloat16(self):
        w_gate, w_up, w_down = _weights(7, self.neurons, self.width, jnp.bfloat16)
        x = random_normal(jax.random.key(8), (2, self.width), jnp.bfloat16)
        active = _random_active(9, 2, self.neurons, 24, [24, 11])
        run = jax.jit(lambda *a: (self._run(*a, w_gate=w_gate), sparse_ffn(*a, w_gate=w_gate, implementation="reference")))
        actual, expected = run(x, w_up, w_down, active)
        assert actual.dtype == jnp.bfloat16
        assert_allclose(actual, expected, dtype=jnp.bfloat16)

    def test_gradients_match_reference(self):
        w_gate, w_up, w_down = _weights(10, self.neurons, self.width)
        x = random_normal(jax.random.key(11), (4, self.width))
        gate = random_normal(jax.random.key(12), (4, 20))
        active = _random_active(13, 2, self.neurons, 20, [13, 20])
        upstream = random_normal(jax.random.key(14), (4, self.width))

        def loss(implementation, x, w_up, w_down, w_gate, gate):
            with_weight = sparse_ffn(x, w_up, w_down, active, w_gate=w_gate, implementation=implementation)
            with_values = sparse_ffn(x, w_up, w_down, active, gate=gate, implementation=implementation)
            return jnp.sum(upstream * (with_weight + with_values))

        grads = jax.jit(lambda *a: (jax.grad(lambda *b: loss(self.implementation, *b), argnums=range(5))(*a),
                                    jax.grad(lambda *b: loss("reference", *b), argnums=range(5))(*a)))
        actual, expected = grads(x, w_up, w_down, w_gate, gate)
        assert_allclose(actual, expected, kind="gradient")

    def test_everything_active_equals_dense_ffn(self):
        w_gate, w_up, w_down = _weights(15, self.neurons, self.width)
        x = random_normal(jax.random.key(16), (3, self.width))
        gate = gelu_tanh(x @ w_gate.T)  # dense: every neuron is active
        run = jax.jit(lambda x: sparse_ffn_decode(x, gate, w_up, w_down, k_max=self.neurons, implementation=self.implementation))
        y, active = run(x)
        assert np.all(np.asarray(active.counts) == self.neurons)
        assert_allclose(y, (gate * (x @ w_up.T)) @ w_down)


class TestReference:
    def test_reference_matches_float64_loop(self):
        w_gate, w_up, w_down = _weights(20, 48, 16)
        x = random_normal(jax.random.key(21), (6, 16))
        gate = random_normal(jax.random.key(22), (6, 12))
        active = _random_active(23, 3, 48, 12, [12, 0, 5])
        for kwargs in ({"w_gate": w_gate, "activation": gelu_tanh}, {"gate": gate}):
            actual = sparse_ffn(x, w_up, w_down, active, implementation="reference", **kwargs)
            expected = _loop_sparse_ffn(np.asarray(x), w_up, w_down, active, gate=np.asarray(gate) if "gate" in kwargs else None,
                                        w_gate=kwargs.get("w_gate"), activation=kwargs.get("activation"))
            assert_allclose(actual, expected, dtype=jnp.float32)


class TestXla(SparseFFNContract):
    implementation = "xla"


class TestPallasGpu(SparseFFNContract):
    implementation = "pallas_gpu"


@needs_tpu_or_cpu
class TestPallasTpu(SparseFFNContract):
    implementation = "pallas_tpu"
    width = 128  # Mosaic tiles M by 128 lanes


# --------------------------------------------------------------------------- selection


def _brute_force_selection(activations, k_max, chunk):
    """Per group: the active neurons (nonzero in any token), keeping the k_max largest max |a|."""
    magnitude = np.abs(np.asarray(activations, np.float64)).reshape(-1, chunk, activations.shape[-1]).max(1)
    result = []
    for row in magnitude:
        active = np.flatnonzero(row > 0)
        kept = active[np.argsort(-row[active], kind="stable")[:k_max]]
        result.append((sorted(kept.tolist()), len(active)))
    return result


@pytest.mark.parametrize("chunk, k_max", [(1, 30), (4, 30), (4, 12), (1, 5)])
def test_select_active_neurons_matches_brute_force(chunk, k_max):
    activations = jax.nn.relu(random_normal(jax.random.key(30), (8, 64)) - 1.0)  # ~16% active
    active = jax.jit(select_active_neurons, static_argnums=1, static_argnames="chunk")(activations, k_max, chunk=chunk)
    for g, (kept, selected) in enumerate(_brute_force_selection(activations, k_max, chunk)):
        count = int(active.counts[g])
        assert count == len(kept) and int(active.selected[g]) == selected
        assert np.asarray(active.indices[g, :count]).tolist() == kept
        assert np.all(np.asarray(active.indices[g, count:]) == 0)
        assert int(active.dropped[g]) == selected - len(kept)
        expected_dense = np.zeros(64, bool)
        expected_dense[kept] = True
        np.testing.assert_array_equal(np.asarray(active.dense(64))[g], expected_dense)


def test_decode_overflow_policies():
    w_gate, w_up, w_down = _weights(31, 96, 32)
    x = random_normal(jax.random.key(32), (8, 32))
    gate = jax.nn.relu(x @ w_gate.T - 0.2)  # about a third active: overflows k_max = 16
    dense = (gate * (x @ w_up.T)) @ w_down
    run = jax.jit(sparse_ffn_decode, static_argnames=("k_max", "chunk", "overflow"))
    y_dense, active = run(x, gate, w_up, w_down, k_max=16, chunk=2, overflow="dense")
    assert int(active.dropped.sum()) > 0
    assert_allclose(y_dense, dense)
    y_capped, active = run(x, gate, w_up, w_down, k_max=16, chunk=2, overflow="keep_largest")
    kept = np.asarray(jnp.repeat(active.dense(96), 2, axis=0))
    assert_allclose(y_capped, (np.where(kept, gate, 0.0) * (x @ w_up.T)) @ w_down)
    y_roomy, active = run(x, gate, w_up, w_down, k_max=96, chunk=2, overflow="keep_largest")
    assert int(active.dropped.sum()) == 0
    assert_allclose(y_roomy, dense)


def test_decode_chunk_union_equals_per_token():
    w_gate, w_up, w_down = _weights(33, 96, 32)
    x = random_normal(jax.random.key(34), (8, 32))
    gate = jax.nn.relu(x @ w_gate.T - 0.5)
    per_token, _ = sparse_ffn_decode(x, gate, w_up, w_down, k_max=96)
    union, active = sparse_ffn_decode(x, gate, w_up, w_down, k_max=96, chunk=8)
    assert active.num_groups == 1
    assert_allclose(union, per_token)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, w, a: sparse_ffn(x, w, w, a), ValueError, "exactly one of w_gate"),
        (lambda x, w, a: sparse_ffn(x, w, w, a, w_gate=w, gate=jnp.ones((4, 8))), ValueError, "exactly one of w_gate"),
        (lambda x, w, a: sparse_ffn(x, w[:, :8], w, a, w_gate=w), ValueError, "w_up must be"),
        (lambda x, w, a: sparse_ffn(x, w, w.astype(jnp.bfloat16), a, w_gate=w), TypeError, "w_down must have"),
        (lambda x, w, a: sparse_ffn(x[:3], w, w, a, w_gate=w), ValueError, "not a multiple of the 2 groups"),
        (lambda x, w, a: sparse_ffn(x, w, w, a, gate=jnp.ones((4, 7))), ValueError, "gate must be"),
        (lambda x, w, a: sparse_ffn(x, w, w, a, w_gate=w, implementation="cuda"), ValueError, "implementation must be"),
        (lambda x, w, a: select_active_neurons(jnp.ones((4, 32)), 0), ValueError, "k_max must be"),
        (lambda x, w, a: select_active_neurons(jnp.ones((4, 32)), 33), ValueError, "k_max must be"),
        (lambda x, w, a: select_active_neurons(jnp.ones((4, 32)), 8, chunk=3), ValueError, "chunk must be"),
        (lambda x, w, a: sparse_ffn_decode(x, jnp.ones((4, 32)), w, w, k_max=4, overflow="drop"), ValueError, "overflow must be"),
        (lambda x, w, a: sparse_ffn_decode(x, jnp.ones((4, 31)), w, w, k_max=4), ValueError, "gate_activations"),
    ],
)
def test_bad_input(call, error, message):
    x, w = jnp.ones((4, 16)), jnp.ones((32, 16))
    active = _random_active(0, 2, 32, 8, [8, 3])
    with pytest.raises(error, match=message):
        call(x, w, active)
