"""GPU (Triton-backend) sparse FFN kernel against a dense float32 reference,
in interpret mode (compiled when run on a GPU: `make test-gpu`).

The kernel has two paths: L < 16 tokens per group (padded to Lp in {1, 2, 4, 8}) computes both
products by broadcast-multiply-and-reduce, L >= 16 (Lp >= 16) with ``tl.dot``; the tests below
run both (the default L = 5 takes the first).

The reference is written from the kernel's contract, independently of ``jaxsparse``: the listed
active neurons become a dense [C, F] multiplicity weight (how many times neuron n appears among
the first counts[g] entries of indices[g]); a gate given per entry is scattered to [C, L, F].
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.common import compat
from tests.backend import GPU_INTERPRET, float32_tolerance
from pallas_kernels.gpu.sparse_ffn import FORWARD_NAME, check_support, sparse_ffn_forward

TOLERANCES = {
    jnp.float32: float32_tolerance(1e-5),
    # bf16: h is rounded to bf16 before the second matmul and y is rounded to bf16 (relative
    # error ~ 2^-9 per rounding, measured max |error| ~0.01 on |y| ~ 1); the reference sees the
    # same bf16-rounded inputs.
    jnp.bfloat16: 2e-2,
}

pytestmark = pytest.mark.usefixtures("fast_cpu_compilation")


def active_weights(indices, counts, num_neurons, gate=None):
    """Dense form of the neuron lists (numpy).

    Returns:
      float32 [C, F] multiplicities of the active entries, or, with gate [C, L, k_max], the
      float32 [C, L, F] sums of the gate coefficients of the active entries of each neuron.
    """
    groups, k_max = indices.shape
    active = np.arange(k_max)[None, :] < counts[:, None]  # [C, k_max]
    if gate is None:
        dense = np.zeros((groups, num_neurons), np.float32)
        np.add.at(dense, (np.arange(groups)[:, None], indices), active.astype(np.float32))
        return dense
    dense = np.zeros((groups, gate.shape[1], num_neurons), np.float32)
    for g in range(groups):
        for j in np.flatnonzero(active[g]):
            dense[g, :, indices[g, j]] += gate[g, :, j]
    return dense


def reference_ffn(x, w_up, w_down, weights, *, w_gate=None, activation=None):
    """Dense float32 sparse FFN; weights from :func:`active_weights` ([C, F] with w_gate, the
    scattered gate [C, L, F] without)."""
    x, w_up, w_down = (a.astype(jnp.float32) for a in (x, w_up, w_down))
    dot = lambda a, b: jnp.einsum("glm,fm->glf", a, b, precision="highest")
    up = dot(x, w_up)
    if w_gate is not None:
        h = activation(dot(x, w_gate.astype(jnp.float32))) * up * weights[:, None, :]
    else:
        h = weights * up
    return jnp.einsum("glf,fm->glm", h, w_down, precision="highest")


def random_problem(rng, groups, length, model_dim, num_neurons, k_max, padding="random"):
    """Random normal inputs; each group lists k_max distinct neurons (padding entries filled
    with random valid indices or with 0). Returns (x, w_gate, w_up, w_down, indices, gate)."""
    x = rng.standard_normal((groups, length, model_dim), np.float32)
    w_gate, w_up, w_down = rng.standard_normal((3, num_neurons, model_dim), np.float32)
    w_gate, w_up, w_down = (w / np.sqrt(model_dim) for w in (w_gate, w_up, w_down))
    indices = np.stack([rng.permutation(num_neurons)[:k_max] for _ in range(groups)])
    gate = rng.standard_normal((groups, length, k_max), np.float32)
    return x, w_gate, w_up, w_down, indices.astype(np.int32), gate


def pad_entries(indices, counts, fill):
    """indices with the entries at or past counts replaced by ``fill`` ([C, k_max] or scalar)."""
    past = np.arange(indices.shape[1])[None, :] >= counts[:, None]
    return np.where(past, fill, indices).astype(np.int32)


def run_and_compare(
    counts, *, form="w_gate", activation=jax.nn.gelu, length=5, model_dim=64, num_neurons=160,
    k_max=70, block_neurons=32, dtype=jnp.float32, seed=0,
):
    """Runs the kernel on random inputs, checks it against the reference and returns y (numpy
    float32). counts has one entry per group."""
    counts = np.asarray(counts, np.int32)
    rng = np.random.default_rng(seed)
    x, w_gate, w_up, w_down, indices, gate = random_problem(
        rng, len(counts), length, model_dim, num_neurons, k_max
    )
    indices = pad_entries(indices, counts, rng.integers(0, num_neurons, indices.shape))
    if form == "w_gate":
        weights, kwargs = active_weights(indices, counts, num_neurons), dict(activation=activation)
    else:
        weights, kwargs = active_weights(indices, counts, num_neurons, gate), {}

    @jax.jit  # One compilation for kernel and reference: interpret-mode cost is compile time.
    def kernel_and_reference(x, w_gate, w_up, w_down, indices, counts, gate, weights):
        x, w_gate, w_up, w_down = (a.astype(dtype) for a in (x, w_gate, w_up, w_down))
        operand = dict(w_gate=w_gate) if form == "w_gate" else dict(gate=gate)
        y = sparse_ffn_forward(
            x, w_up, w_down, indices, counts, **operand, **kwargs, block_neurons=block_neurons,
            interpret=GPU_INTERPRET,
        )
        reference = reference_ffn(
            x, w_up, w_down, weights, w_gate=w_gate if form == "w_gate" else None, **kwargs
        )
        return y, reference

    y, reference = kernel_and_reference(x, w_gate, w_up, w_down, indices, counts, gate, weights)
    assert y.shape == x.shape and y.dtype == dtype
    y = np.asarray(y, np.float32)
    assert np.isfinite(y).all()
    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(y, reference, atol=tol, rtol=tol)
    assert np.all(y[counts == 0] == 0.0)
    return y


@pytest.mark.parametrize("activation", [jax.nn.gelu, jax.nn.silu], ids=["gelu", "silu"])
def test_w_gate_form(activation):
    """Three blocks of 32 (the last one partial); counts empty, mid-block and full."""
    run_and_compare([45, 0, 70], activation=activation)


def test_w_gate_form_with_tl_dot():
    """L = 17 (Lp = 32, tl.dot path); M = 192 takes three M tiles of 64."""
    run_and_compare([45, 0, 70], length=17, model_dim=192)


def test_gate_form():
    """L = 16: the smallest tl.dot case (no L padding)."""
    run_and_compare(
        [40, 17], form="gate", length=16, model_dim=128, num_neurons=256, k_max=40,
        block_neurons=16,
    )


@pytest.mark.parametrize("form", ["w_gate", "gate"])
@pytest.mark.parametrize("length, block_neurons", [(1, 32), (3, 32), (8, 64)])
def test_few_tokens_broadcast_reduce(length, block_neurons, form):
    """L = 1, 3 and 8 (Lp = 1, 4, 8: no tl.dot); blocks of 32 (three) or 64 (two), the last one
    partial, with counts empty, mid-block and full. M = 192 takes three M tiles of 64, or six of
    32 where the intermediate's cap bites (Lp * bn * bm = 8 * 64 * 32)."""
    run_and_compare(
        [45, 0, 70], form=form, length=length, model_dim=192, block_neurons=block_neurons,
        seed=length,
    )


@pytest.mark.parametrize("form", ["w_gate", "gate"])
def test_single_token_with_k_max_below_one_block(form):
    """L = 1 (Lp = 1) and k_max = 8 < block_neurons: one partial block per group."""
    run_and_compare([8, 3, 0, 5], form=form, length=1, num_neurons=96, k_max=8)


@pytest.mark.parametrize("length", [1, 16], ids=["broadcast", "dot"])
@pytest.mark.parametrize("form", ["w_gate", "gate"])
def test_bfloat16(form, length):
    """Broadcast-reduce (L = 1) and tl.dot (L = 16) paths in bfloat16."""
    run_and_compare(
        [45, 0, 70], form=form, activation=jax.nn.silu, length=length, dtype=jnp.bfloat16
    )


def test_padding_entries_do_not_matter():
    """Random valid padding entries (some repeating listed neurons) give exactly the result of
    padding with 0."""
    rng = np.random.default_rng(4)
    counts = np.array([30, 0, 9], np.int32)
    x, w_gate, w_up, w_down, indices, _ = random_problem(rng, 3, 5, 64, 128, 40)
    random_fill = rng.integers(0, 128, indices.shape)

    @jax.jit
    def both(x, w_gate, w_up, w_down, random_padding, zero_padding, counts):
        run = lambda idx: sparse_ffn_forward(
            x, w_up, w_down, idx, counts, w_gate=w_gate, block_neurons=16, interpret=GPU_INTERPRET
        )
        return run(random_padding), run(zero_padding)

    y_random, y_zero = both(
        x, w_gate, w_up, w_down, pad_entries(indices, counts, random_fill),
        pad_entries(indices, counts, 0), counts,
    )
    np.testing.assert_array_equal(np.asarray(y_random), np.asarray(y_zero))


@pytest.mark.parametrize("length", [5, 16], ids=["broadcast", "dot"])
def test_unlisted_rows_and_padding_gates_are_never_used(length):
    """Weight rows that no active entry lists are NaN, padding entries point at them (inside a
    partial block and in whole blocks past counts), and in the gate form padding coefficients
    are NaN: y stays finite and correct. Catches unmasked padding reads and masks applied by
    multiplication. An activation with a host callback counts the neuron blocks that did work:
    exactly those overlapping the active entries. L = 5 (broadcast-reduce) and L = 16 (tl.dot)."""
    rng = np.random.default_rng(5)
    counts, num_neurons, k_max, block_neurons = np.array([21, 0, 64], np.int32), 128, 64, 16
    x, w_gate, w_up, w_down, indices, gate = random_problem(rng, 3, length, 64, num_neurons, k_max)
    listed = np.zeros(num_neurons, bool)
    for g, count in enumerate(counts):
        listed[indices[g, :count]] = True
    unlisted = np.flatnonzero(~listed)
    indices = pad_entries(indices, counts, rng.choice(unlisted, indices.shape))
    nan_rows = lambda w: np.where(listed[:, None], w, np.nan).astype(np.float32)
    gate = np.where(np.arange(k_max) < counts[:, None, None], gate, np.nan).astype(np.float32)
    blocks_run = []

    def counting_silu(z):
        jax.debug.callback(lambda: blocks_run.append(1))
        return jax.nn.silu(z)

    @jax.jit
    def both_forms(x, w_gate, w_up, w_down, indices, counts, gate):
        kwargs = dict(block_neurons=block_neurons, interpret=True)  # Callbacks.
        return (
            sparse_ffn_forward(
                x, w_up, w_down, indices, counts, w_gate=w_gate, activation=counting_silu,
                **kwargs,
            ),
            sparse_ffn_forward(x, w_up, w_down, indices, counts, gate=gate, **kwargs),
        )

    y_gated, y_gate = both_forms(
        x, nan_rows(w_gate), nan_rows(w_up), nan_rows(w_down), indices, counts, gate
    )
    jax.effects_barrier()
    assert len(blocks_run) == sum(-(-count // block_neurons) for count in counts) == 6
    weights = active_weights(indices, counts, num_neurons)
    scattered_gate = active_weights(indices, counts, num_neurons, np.nan_to_num(gate))
    references = (
        reference_ffn(x, w_up, w_down, weights, w_gate=w_gate, activation=jax.nn.silu),
        reference_ffn(x, w_up, w_down, scattered_gate),
    )
    for y, reference in zip((y_gated, y_gate), references):
        assert np.isfinite(np.asarray(y)).all()
        # Interpreted under a GPU backend, the kernel's dots still run there (TF32).
        np.testing.assert_allclose(y, reference, atol=float32_tolerance(1e-5), rtol=float32_tolerance(1e-5))
        assert np.all(np.asarray(y)[1] == 0.0)


def _arguments(**overrides):
    """Valid small arguments (w_gate form), with some replaced."""
    args = dict(
        x=jnp.ones((2, 3, 32)), w_up=jnp.ones((48, 32)), w_down=jnp.ones((48, 32)),
        indices=jnp.zeros((2, 8), jnp.int32), counts=jnp.zeros((2,), jnp.int32),
        w_gate=jnp.ones((48, 32)), gate=None, block_neurons=16,
    )
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(x=jnp.ones((3, 32))), "x must be"),
        (dict(x=jnp.ones((2, 3, 32), jnp.float16)), "float32 or bfloat16"),
        (dict(x=jnp.ones((2, 3, 40)), w_up=jnp.ones((48, 40)), w_down=jnp.ones((48, 40)),
              w_gate=jnp.ones((48, 40))), "multiple of 16"),
        (dict(w_down=jnp.ones((40, 32))), "w_down must be"),
        (dict(w_up=jnp.ones((48, 32, 1))), "w_up must be"),
        (dict(w_gate=jnp.ones((48, 32), jnp.bfloat16)), "w_gate must have x's dtype"),
        (dict(gate=jnp.ones((2, 3, 8))), "exactly one of w_gate and gate"),
        (dict(w_gate=None), "exactly one of w_gate and gate"),
        (dict(w_gate=None, gate=jnp.ones((2, 3, 7))), "gate must be"),
        (dict(indices=jnp.zeros((2, 8), jnp.float32)), "indices must be"),
        (dict(indices=jnp.zeros((3, 8), jnp.int32)), "indices must be"),
        (dict(counts=jnp.zeros((2, 1), jnp.int32)), "counts must be"),
        (dict(block_neurons=24), "block_neurons must be a power of two"),
        (dict(block_neurons=8), "block_neurons must be a power of two >= 16"),
    ],
)
def test_rejects_bad_arguments(overrides, message):
    args = _arguments(**overrides)
    with pytest.raises(ValueError, match=message):
        sparse_ffn_forward(
            args.pop("x"), args.pop("w_up"), args.pop("w_down"), args.pop("indices"),
            args.pop("counts"), **args, interpret=GPU_INTERPRET,
        )


def test_check_support():
    check_support(4096, jnp.bfloat16)
    check_support(48, jnp.float32)
    with pytest.raises(ValueError, match="got 100"):
        check_support(100, jnp.float32)
    with pytest.raises(ValueError, match="got float16"):
        check_support(64, jnp.float16)


def test_lowers_to_triton_without_a_gpu():
    """Lowering for CUDA runs the Pallas Triton lowering on CPU (no gathers beyond row loads,
    power-of-two loads, tl.dot shapes, 3-D broadcast-reduce shapes with size-1 dims). M = 192 and
    C = 3 are not powers of two; k_max = 70 is padded; gelu, silu and the gate form, in float32
    and bfloat16, each for L = 1 and 5 (broadcast-reduce, Lp = 1 and 8) and L = 20 (tl.dot,
    Lp = 32). The partial-output buffer [C, P, Lp, M] carries the small Lp."""
    groups, model_dim, num_neurons, k_max = 3, 192, 100, 70
    lengths = {1: 1, 5: 8, 20: 32}  # L -> Lp
    indices = jnp.zeros((groups, k_max), jnp.int32)
    counts = jnp.zeros((groups,), jnp.int32)
    gates = [jnp.zeros((groups, length, k_max), jnp.float32) for length in lengths]

    def kernels(indices, counts, gates):
        outputs = []
        for length, gate in zip(lengths, gates):
            for dtype, activation in ((jnp.float32, jax.nn.gelu), (jnp.bfloat16, jax.nn.silu)):
                x = jnp.zeros((groups, length, model_dim), dtype)
                w = jnp.zeros((num_neurons, model_dim), dtype)
                outputs.append(sparse_ffn_forward(
                    x, w, w, indices, counts, w_gate=w, activation=activation, block_neurons=32
                ))
            outputs.append(
                sparse_ffn_forward(x, w, w, indices, counts, gate=gate, block_neurons=64)
            )
        return outputs

    with compat.triton_lowering_without_gpu():
        text = jax.jit(kernels).trace(indices, counts, gates).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3 * len(lengths) and FORWARD_NAME in text
    # Result types of the Triton calls: partials [C, P, Lp, M], P = 3 (bn = 32) or 2 (bn = 64).
    results = sorted(line.rsplit("-> ", 1)[1] for line in text.splitlines() if "gpu.triton" in line)
    assert results == sorted(
        f"tensor<{groups}x{num_blocks}x{padded_len}x{model_dim}xf32>"
        for padded_len in lengths.values() for num_blocks in (3, 3, 2)
    )
