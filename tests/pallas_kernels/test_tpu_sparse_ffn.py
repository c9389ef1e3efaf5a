"""Sparse FFN TPU kernel, run in the TPU interpreter on CPU.

The reference is dense float64 numpy math written from the op's definition, independent of
``jaxsparse``: a [C, F] 0/1 matrix of active neurons selects h, every neuron is computed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import compat
from pallas_kernels.tpu.sparse_ffn import FORWARD_NAME, check_support, sparse_ffn_forward

# atol = rtol by dtype. In bfloat16 the inputs are rounded in both the kernel and the reference,
# but the kernel also rounds h to bfloat16 before the w_down matmul and rounds y (8 mantissa
# bits each), so it is compared at about 2**-6.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Case:
    counts: tuple[int, ...]  # one per group: C = len(counts)
    form: str = "w_gate"  # "w_gate" (activation of x . w_gate) or "gate" (given coefficients)
    activation: Callable = jax.nn.gelu
    length: int = 5
    model_dim: int = 128
    num_neurons: int = 64
    k_max: int = 24
    block_neurons: int = 8
    dtype: type = jnp.float32
    # Padding entries (j >= count): "random" valid neurons, "zero", "out_of_range" (F + 1000: the
    # interpreter raises on a DMA of such a row), or "poison": they name rows that are NaN in every
    # weight (and the gate past the count is NaN); active neurons never do.
    padding: str = "random"
    seed: int = 0


def make_inputs(case: Case):
    """(clean inputs, kernel inputs) as dicts of numpy arrays; they differ only under "poison"."""
    rng = np.random.default_rng(case.seed)
    groups, model_dim, num_neurons = len(case.counts), case.model_dim, case.num_neurons
    x = rng.normal(size=(groups, case.length, model_dim))
    weights = {
        name: rng.normal(size=(num_neurons, model_dim)) * model_dim**-0.5
        for name in ("w_up", "w_down", "w_gate")
    }
    counts = np.array(case.counts, np.int32)
    clean_pool = num_neurons // 2 if case.padding == "poison" else num_neurons
    indices = np.stack([rng.permutation(clean_pool)[: case.k_max] for _ in range(groups)])
    gate = rng.normal(size=(groups, case.length, case.k_max))
    for g, count in enumerate(counts):
        pad = indices[g, count:]
        if case.padding == "zero":
            pad[:] = 0
        elif case.padding == "random":
            pad[:] = rng.integers(0, num_neurons, pad.size)
        elif case.padding == "out_of_range":
            pad[:] = num_neurons + 1000
    clean = dict(x=x, indices=indices.astype(np.int32), counts=counts, gate=gate, **weights)
    clean = {k: _rounded(v, case.dtype) for k, v in clean.items()}
    kernel = dict(clean)
    if case.padding == "poison":
        for name in weights:
            kernel[name] = clean[name].copy()
            kernel[name][clean_pool:] = np.nan
        kernel["gate"], kernel["indices"] = clean["gate"].copy(), clean["indices"].copy()
        for g, count in enumerate(counts):
            kernel["indices"][g, count:] = rng.integers(clean_pool, num_neurons, case.k_max - count)
            kernel["gate"][g, :, count:] = np.nan
    return clean, kernel


def _rounded(x, dtype):
    """Floating inputs rounded to ``dtype`` (the gate stays float32), as float64 numpy."""
    if x.dtype.kind != "f":
        return x.copy()
    return np.asarray(jnp.asarray(x, dtype), np.float64)


def reference_ffn(inputs, form, activation):
    """Dense float64 sparse FFN: every neuron computed, inactive ones (a 0/1 mask) dropped."""
    x, indices, counts = inputs["x"], inputs["indices"], inputs["counts"]
    groups, num_neurons = x.shape[0], inputs["w_up"].shape[0]
    active = np.zeros((groups, num_neurons), bool)
    coefficients = np.zeros((groups, x.shape[1], num_neurons))
    for g, count in enumerate(counts):
        active[g, indices[g, :count]] = True
        coefficients[g][:, indices[g, :count]] = inputs["gate"][g, :, :count]
    if form == "w_gate":
        pre = jnp.asarray(x @ inputs["w_gate"].T, jnp.float32)
        coefficients = np.asarray(activation(pre), np.float64)
    h = np.where(active[:, None, :], coefficients * (x @ inputs["w_up"].T), 0.0)
    return h @ inputs["w_down"]


@functools.partial(jax.jit, static_argnames=("activation", "block_neurons", "interpret"))
def run_kernel(x, w_up, w_down, indices, counts, w_gate, gate, **settings):
    return sparse_ffn_forward(
        x, w_up, w_down, indices, counts, w_gate=w_gate, gate=gate, **settings
    )


def kernel_output(case: Case, inputs, interpret=True):
    floats = {k: jnp.asarray(inputs[k], case.dtype) for k in ("x", "w_up", "w_down", "w_gate")}
    y = run_kernel(
        floats["x"], floats["w_up"], floats["w_down"], jnp.asarray(inputs["indices"]),
        jnp.asarray(inputs["counts"]), floats["w_gate"] if case.form == "w_gate" else None,
        jnp.asarray(inputs["gate"], jnp.float32) if case.form == "gate" else None,
        activation=case.activation, block_neurons=case.block_neurons, interpret=interpret,
    )
    assert y.dtype == case.dtype and y.shape == inputs["x"].shape
    return np.asarray(y, np.float32)


def assert_matches_reference(case: Case, interpret=True):
    clean, kernel_inputs = make_inputs(case)
    y = kernel_output(case, kernel_inputs, interpret)
    expected = reference_ffn(clean, case.form, case.activation)
    tolerance = TOLERANCES[case.dtype]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, expected, atol=tolerance, rtol=tolerance)
    for g, count in enumerate(case.counts):
        if count == 0:
            assert (y[g] == 0).all(), "a group with no active neuron must give exactly 0"
    return y


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("activation", [jax.nn.gelu, jax.nn.silu], ids=["gelu", "silu"])
def test_w_gate_form(activation):
    """Full list, empty list, and a count ending mid-block (21 = 16 + 5, block 2 skipped); k_max
    40 is padded to 48."""
    assert_matches_reference(
        Case(counts=(40, 0, 21), activation=activation, num_neurons=128, k_max=40, block_neurons=16)
    )


def test_gate_form_single_token():
    assert_matches_reference(Case(counts=(13, 20, 0), form="gate", length=1, k_max=20))


@pytest.mark.parametrize("form", ["w_gate", "gate"])
def test_padding_entries_are_never_copied(form):
    """Padding gives bit-identical y whatever it names; out-of-range padding shows that no row of
    a padding entry is copied, neither in the partial block nor in the skipped one (counts 10 and
    17 of 24 with 8-neuron blocks)."""
    case = Case(counts=(10, 17), form=form)
    random_padding = assert_matches_reference(case)
    for padding in ("zero", "out_of_range"):
        other = assert_matches_reference(dataclasses.replace(case, padding=padding))
        np.testing.assert_array_equal(random_padding, other, err_msg=padding)


@pytest.mark.parametrize("form", ["w_gate", "gate"])
def test_nan_rows_named_only_by_padding_are_never_read(form):
    """Unused weight rows are NaN and padding entries name them: nothing of them may reach y."""
    assert_matches_reference(Case(counts=(0, 11, 24), form=form, padding="poison", seed=1))


@pytest.mark.parametrize("form", ["w_gate", "gate"])
def test_bfloat16(form):
    assert_matches_reference(Case(counts=(19, 8), form=form, dtype=jnp.bfloat16, seed=2))


def test_double_buffered_copies_have_no_races():
    race_checking = compat.tpu_interpret_params(detect_races=True)
    assert_matches_reference(Case(counts=(24, 9), seed=3), interpret=race_checking)
    assert compat.tpu_interpret_races_found() is False


def test_empty_neuron_list():
    """k_max = 0 still runs one (empty) block and gives exactly 0."""
    assert_matches_reference(Case(counts=(0, 0), k_max=0, length=1))


def test_lowers_to_mosaic_for_tpu():
    """Both forms lower to Mosaic with TPU-sized blocks (M = 256, bn = 128, k_max padded)."""
    groups, length, model_dim, num_neurons, k_max = 2, 5, 256, 512, 200
    x = jnp.ones((groups, length, model_dim), jnp.bfloat16)
    w = jnp.ones((num_neurons, model_dim), jnp.bfloat16)
    indices = jnp.zeros((groups, k_max), jnp.int32)
    counts = jnp.array([3, k_max], jnp.int32)
    gate = jnp.ones((groups, length, k_max), jnp.float32)

    def both_forms(x, w, indices, counts, gate):
        gated = sparse_ffn_forward(x, w, w, indices, counts, w_gate=w)
        given = sparse_ffn_forward(x, w, w, indices, counts, gate=gate)
        return gated, given

    with compat.tpu_lowering_without_tpu():
        exported = jax.export.export(jax.jit(both_forms), platforms=["tpu"])(
            x, w, indices, counts, gate
        )
    module = exported.mlir_module()
    assert FORWARD_NAME in module and module.count("tpu_custom_call") >= 2


def _bad(**changes):
    """Valid arguments (w_gate form) with some replaced."""
    arguments = dict(
        x=jnp.ones((2, 3, 128)), w_up=jnp.ones((16, 128)), w_down=jnp.ones((16, 128)),
        indices=jnp.zeros((2, 8), jnp.int32), counts=jnp.zeros((2,), jnp.int32),
        w_gate=jnp.ones((16, 128)), gate=None, block_neurons=8,
    )
    return {**arguments, **changes}


@pytest.mark.parametrize(
    "arguments, match",
    [
        (_bad(x=jnp.ones((3, 128))), "x must be"),
        (_bad(x=jnp.ones((2, 3, 96))), "multiple of 128"),
        (_bad(w_down=jnp.ones((17, 128))), "w_down"),
        (_bad(w_up=jnp.ones((16, 128), jnp.bfloat16)), "w_up must have x's dtype"),
        (_bad(indices=jnp.zeros((3, 8), jnp.int32)), "indices"),
        (_bad(indices=jnp.zeros((2, 8), jnp.float32)), "indices must be int32"),
        (_bad(counts=jnp.zeros((2, 1), jnp.int32)), "counts"),
        (_bad(gate=jnp.ones((2, 3, 8))), "exactly one"),
        (_bad(w_gate=None), "exactly one"),
        (_bad(w_gate=None, gate=jnp.ones((2, 3, 7))), "gate must be float32"),
        (_bad(block_neurons=12), "block_neurons"),
    ],
)
def test_rejects_bad_arguments(arguments, match):
    x, w_up, w_down, indices, counts = (
        arguments.pop(name) for name in ("x", "w_up", "w_down", "indices", "counts")
    )
    with pytest.raises(ValueError, match=match):
        sparse_ffn_forward(x, w_up, w_down, indices, counts, interpret=True, **arguments)


def test_check_support():
    check_support(256, jnp.bfloat16)
    check_support(128, np.float32)
    with pytest.raises(ValueError, match="got 200"):
        check_support(200, jnp.float32)
    with pytest.raises(ValueError, match="float16"):
        check_support(128, jnp.float16)
