"""jaxsparse.attention: every implementation against the dense reference, forward and gradients.

``AttentionContract`` holds the cases every implementation must pass; a short subclass per
implementation chooses the sizes its speed allows (Pallas kernels run in interpret mode on CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsparse import BlockMask, BlockSizes, attention, make_block_mask, masks
from jaxsparse.testing import assert_allclose, random_normal
from tests.backend import needs_tpu_or_cpu


def _segments(batch, length):
    """Packed documents of different lengths per batch entry."""
    rows = [np.repeat(np.arange(100), [17, 40, 3] + [60] * 97)[:length], np.repeat(np.arange(100), [70] + [25] * 99)[:length]]
    return jnp.asarray(np.stack([rows[i % 2] for i in range(batch)]), jnp.int32)


# name -> (batch, q_len, kv_len) -> mask. Sizes are those of the test call.
MASKS = {
    "full": lambda b, t, s: masks.full(),
    "causal": lambda b, t, s: masks.causal(),
    "causal_bottom_right": lambda b, t, s: masks.causal(offset=s - t),
    "sliding_window": lambda b, t, s: masks.sliding_window(24),
    "sinks_or_window": lambda b, t, s: masks.causal() & (masks.sinks(4) | masks.sliding_window(20)),
    "chunked": lambda b, t, s: masks.chunked(40),
    "document_causal": lambda b, t, s: masks.causal() & masks.document(_segments(b, t), _segments(b, s)),
    "prefix_lm": lambda b, t, s: masks.prefix_lm(jnp.array([30, 70][:b])),
    "global_and_window": lambda b, t, s: masks.global_tokens([0, 50]) | masks.sliding_window(8, 8),
    "dilated_window": lambda b, t, s: masks.dilated(3) & masks.sliding_window(60),
    "power_of_two": lambda b, t, s: masks.power_of_two(),
    "from_fn": lambda b, t, s: masks.from_fn(lambda bi, h, q, k: ((q + 2 * k + h) % 7 < 4) & (k <= q + bi)),
    "per_head_windows": lambda b, t, s: masks.causal() & masks.per_head([masks.sliding_window(w) for w in (4, 16, 40, 300)]),
    # Queries before position 20 see nothing: output 0, lse -inf, zero gradients.
    "empty_rows": lambda b, t, s: masks.from_fn(lambda bi, h, q, k: (q >= 20) & (k <= q)),
}


def _inputs(key, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    kq, kk, kv, kd, kl = jax.random.split(key, 5)
    q = random_normal(kq, (batch, q_len, heads, head_dim), dtype)
    k = random_normal(kk, (batch, kv_len, kv_heads, head_dim), dtype)
    v = random_normal(kv, (batch, kv_len, kv_heads, head_dim), dtype)
    d_out = random_normal(kd, q.shape, dtype)
    d_lse = random_normal(kl, (batch, heads, q_len), jnp.float32)
    return q, k, v, d_out, d_lse


def _outputs_and_gradients(implementation, q, k, v, d_out, d_lse, mask, **kwargs):
    """(out, lse) and (dq, dk, dv) for random cotangents of both outputs (lse's are zeroed at -inf).

    One jit per call (compiling op by op dominates the test time otherwise); the mask is closed
    over, so concrete masks take the same path as in a user's jitted model.
    """

    def run(q, k, v):
        return attention(q, k, v, mask, return_lse=True, implementation=implementation, **kwargs)

    @jax.jit
    def outputs_and_gradients(q, k, v, d_out, d_lse):
        (out, lse), vjp = jax.vjp(run, q, k, v)
        d_lse = jnp.where(jnp.isfinite(lse), d_lse, 0.0)
        return (out, lse), vjp((d_out, d_lse))

    return outputs_and_gradients(q, k, v, d_out, d_lse)


def check_against_reference(implementation, *, mask_name="causal", batch=2, q_len=96, kv_len=96, heads=4, kv_heads=2,
                            head_dim=32, dtype=jnp.float32, block_sizes=None, seed=0, **kwargs):
    q, k, v, d_out, d_lse = _inputs(jax.random.key(seed), batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    mask = MASKS[mask_name](batch, q_len, kv_len)
    expected, expected_grads = _outputs_and_gradients("reference", q, k, v, d_out, d_lse, mask, **kwargs)
    actual, actual_grads = _outputs_and_gradients(implementation, q, k, v, d_out, d_lse, mask, block_sizes=block_sizes, **kwargs)
    assert actual[0].dtype == dtype and actual[1].dtype == jnp.float32
    assert_allclose(actual, expected, dtype=dtype, kind="forward", err_msg=f"{implementation} {mask_name} forward")
    assert_allclose(actual_grads, expected_grads, dtype=dtype, kind="gradient", err_msg=f"{implementation} {mask_name} grads")
    return actual, actual_grads


class AttentionContract:
    """Cases every implementation passes; subclasses set ``implementation`` and sizes."""

    implementation: str
    block_sizes = BlockSizes(block_q=32, block_kv=32)
    length = 96  # not a multiple of every block size below: exercises padding
    masks_to_test = sorted(MASKS)

    def check(self, **kwargs):
        kwargs.setdefault("block_sizes", self.block_sizes)
        kwargs.setdefault("q_len", self.length)
        kwargs.setdefault("kv_len", self.length)
        return check_against_reference(self.implementation, **kwargs)

    def test_every_mask(self, subtests=None):
        for name in self.masks_to_test:
            self.check(mask_name=name)

    def test_lengths_not_multiples_of_the_block(self):
        self.check(mask_name="sinks_or_window", q_len=self.length - 13, kv_len=self.length + 7)

    def test_fewer_queries_than_keys_bottom_right_causal(self):
        self.check(mask_name="causal_bottom_right", q_len=self.length // 3, kv_len=self.length)

    @pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 1), (6, 2)])
    def test_grouped_query_attention(self, heads, kv_heads):
        self.check(mask_name="causal", heads=heads, kv_heads=kv_heads)

    def test_softcap(self):
        self.check(mask_name="document_causal", softcap=3.0, scale=0.5)

    def test_bfloat16(self):
        self.check(mask_name="sinks_or_window", dtype=jnp.bfloat16)

    def test_empty_rows_give_zero_output_minus_inf_lse_and_zero_gradients(self):
        (out, lse), (dq, _, _) = self.check(mask_name="empty_rows")
        assert np.all(np.asarray(out[:, :20]) == 0)
        assert np.all(np.asarray(lse[:, :, :20]) == -np.inf)
        assert np.all(np.asarray(dq[:, :20]) == 0)

    @settings(max_examples=5, suppress_health_check=[HealthCheck.differing_executors])
    @given(
        mask_name=st.sampled_from(sorted(MASKS)),
        q_extra=st.integers(-40, 40),
        kv_extra=st.integers(-40, 40),
        heads_and_kv_heads=st.sampled_from([(2, 1), (4, 2), (4, 4)]),
        dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
        softcap=st.sampled_from([None, 4.0]),
    )
    def test_hypothesis_cases(self, mask_name, q_extra, kv_extra, heads_and_kv_heads, dtype, softcap):
        if mask_name == "per_head_windows":
            heads_and_kv_heads = (4, 2)
        heads, kv_heads = heads_and_kv_heads
        self.check(mask_name=mask_name, q_len=self.length + q_extra, kv_len=self.length + kv_extra, heads=heads,
                   kv_heads=kv_heads, dtype=dtype, softcap=softcap, head_dim=16)

    def test_block_mask_from_indices(self):
        """Run-time block choices (top-k over random scores) feed the same kernels."""
        block_q, block_kv = self.block_sizes.block_q, self.block_sizes.block_kv
        scores = jax.random.normal(jax.random.key(3), (2, -(-self.length // block_q), -(-self.length // block_kv)))
        chosen = jax.lax.top_k(scores, 2)[1]
        block_mask = BlockMask.from_indices(
            chosen, jnp.full(chosen.shape[:-1], 2), q_len=self.length, kv_len=self.length,
            block_q=block_q, block_kv=block_kv, mask=masks.causal() | masks.sinks(3),
        )
        q, k, v, d_out, d_lse = _inputs(jax.random.key(4), 1, self.length, self.length, 2, 1, 32, jnp.float32)
        expected = _outputs_and_gradients("reference", q, k, v, d_out, d_lse, block_mask)
        actual = _outputs_and_gradients(self.implementation, q, k, v, d_out, d_lse, block_mask)
        assert_allclose(actual, expected, kind="gradient")


class TestXla(AttentionContract):
    implementation = "xla"

    @given(
        mask_name=st.sampled_from(sorted(MASKS)),
        batch=st.integers(1, 2),
        q_len=st.integers(1, 140),
        kv_len=st.integers(1, 140),
        heads_and_kv_heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
        head_dim=st.sampled_from([8, 16]),
        block_q=st.sampled_from([16, 32, 64]),
        block_kv=st.sampled_from([16, 32, 128]),
        dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
        softcap=st.sampled_from([None, 4.0]),
    )
    def test_hypothesis_shapes_masks_and_tilings(self, mask_name, batch, q_len, kv_len, heads_and_kv_heads, head_dim,
                                                 block_q, block_kv, dtype, softcap):
        if mask_name == "per_head_windows":
            heads_and_kv_heads = (4, 2)
        heads, kv_heads = heads_and_kv_heads
        check_against_reference(
            "xla", mask_name=mask_name, batch=batch, q_len=q_len, kv_len=kv_len, heads=heads, kv_heads=kv_heads,
            head_dim=head_dim, dtype=dtype, softcap=softcap, block_sizes=BlockSizes(block_q=block_q, block_kv=block_kv),
        )

    @pytest.mark.parametrize("bias_shape", [(1, 4, 80, 72), (2, 1, 1, 72), (2, 4, 80, 1)])
    def test_bias_and_its_gradient(self, bias_shape):
        q, k, v, d_out, _ = _inputs(jax.random.key(5), 2, 80, 72, 4, 2, 16, jnp.float32)
        bias = random_normal(jax.random.key(6), bias_shape)
        mask = masks.sliding_window(30, 5)

        def loss(implementation, q, k, v, bias):
            out = attention(q, k, v, mask, bias=bias, implementation=implementation, block_sizes=BlockSizes(block_q=16, block_kv=32))
            return jnp.sum(out * d_out)

        expected = jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2, 3))(q, k, v, bias)
        actual = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3))(q, k, v, bias)
        assert_allclose(actual, expected, kind="gradient")

    def test_under_jit_with_traced_segment_ids(self):
        q, k, v, d_out, _ = _inputs(jax.random.key(7), 2, 128, 128, 2, 1, 16, jnp.float32)
        segment_ids = _segments(2, 128)

        @jax.jit
        def run(q, k, v, segment_ids):
            mask = masks.causal() & masks.document(segment_ids)
            return attention(q, k, v, mask, implementation="xla", block_sizes=BlockSizes(block_q=32, block_kv=32))

        expected = attention(q, k, v, masks.causal() & masks.document(segment_ids), implementation="reference")
        assert_allclose(run(q, k, v, segment_ids), expected)
        assert_allclose(run(q, k, v, jnp.zeros_like(segment_ids)), attention(q, k, v, masks.causal(), implementation="reference"))

    def test_default_implementation_is_xla_and_block_sizes_adapt(self):
        q, k, v, _, _ = _inputs(jax.random.key(8), 1, 10, 10, 2, 2, 8, jnp.float32)
        assert_allclose(attention(q, k, v, masks.causal()), attention(q, k, v, masks.causal(), implementation="reference"))


@pytest.mark.parametrize("implementation", ["reference", "xla"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_full_and_causal_equal_jax_dot_product_attention(implementation, is_causal):
    q, k, v, _, _ = _inputs(jax.random.key(9), 2, 70, 70, 4, 2, 16, jnp.float32)
    mask = masks.causal() if is_causal else None
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
    assert_allclose(attention(q, k, v, mask, implementation=implementation), expected)
    grads = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, mask, implementation=implementation) ** 2), argnums=(0, 1, 2))
    expected_grads = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, is_causal=is_causal) ** 2), argnums=(0, 1, 2))
    assert_allclose(grads(q, k, v), expected_grads(q, k, v), kind="gradient")


def _scanned_pairs(jaxpr):
    """Tiles processed by the scans of a jaxpr: steps x pairs per step, for each scan found."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn.params["length"] * eqn.invars[-1].aval.shape[-1])
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                found += _scanned_pairs(inner)
    return found


@pytest.mark.parametrize("mask", [masks.sliding_window(64), masks.causal(), masks.causal() & masks.chunked(256)])
def test_xla_cost_follows_visited_blocks(mask):
    """The xla implementation processes only visited tiles (padded to whole chunks), never T x S."""
    q = jnp.ones((1, 1024, 2, 32))
    sizes = BlockSizes(block_q=64, block_kv=64)
    block_mask = make_block_mask(mask, q_len=1024, kv_len=1024, block_q=64, block_kv=64)
    visited = int(block_mask.num_visited_blocks.max())
    for implementation_pass in (
        lambda q: attention(q, q, q, mask, block_sizes=sizes),
        jax.grad(lambda q: jnp.sum(attention(q, q, q, mask, block_sizes=sizes))),
    ):
        processed = _scanned_pairs(jax.make_jaxpr(implementation_pass)(q).jaxpr)
        assert processed and all(visited <= pairs <= visited + 2 for pairs in processed), (processed, visited)
    assert visited < 0.6 * 16 * 16


BAD_INPUTS = [
    ("rank", dict(q=(2, 8, 4)), ValueError, "rank 4"),
    ("heads", dict(k=(1, 8, 3, 8), v=(1, 8, 3, 8)), ValueError, "divisible"),
    ("kv_shapes", dict(v=(1, 8, 2, 4)), ValueError, "same shape"),
    ("head_dim", dict(k=(1, 8, 2, 4), v=(1, 8, 2, 4)), ValueError, "D=8"),
    ("dtype_mismatch", dict(dtype_k=jnp.bfloat16), TypeError, "share a dtype"),
    ("integer", dict(dtype_all=jnp.int32), TypeError, "floating"),
    ("implementation", dict(implementation="cuda"), ValueError, "implementation"),
    ("scale", dict(scale=0.0), ValueError, "scale"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
    ("bias_shape", dict(bias=(1, 4, 8, 3)), ValueError, "bias"),
    ("mask_type", dict(mask="causal"), TypeError, "mask"),
    ("block_mask_lengths", dict(mask=make_block_mask(masks.causal(), q_len=16, kv_len=8)), ValueError, "q_len=16"),
    ("block_sizes_mismatch", dict(mask=make_block_mask(masks.causal(), q_len=8, kv_len=8, block_q=8, block_kv=8),
                                  block_sizes=BlockSizes(block_q=16, block_kv=16)), ValueError, "block_sizes"),
    ("per_head_count", dict(mask=masks.per_head([masks.causal()] * 3)), ValueError, "per head"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(name, change, error, message):
    q_shape, k_shape, v_shape = change.get("q", (1, 8, 4, 8)), change.get("k", (1, 8, 2, 8)), change.get("v", (1, 8, 2, 8))
    dtype = change.get("dtype_all", jnp.float32)
    q = jnp.ones(q_shape, dtype)
    k = jnp.ones(k_shape, change.get("dtype_k", dtype))
    v = jnp.ones(v_shape, dtype)
    kwargs = {key: change[key] for key in ("implementation", "scale", "softcap", "block_sizes") if key in change}
    if "bias" in change:
        kwargs["bias"] = jnp.ones(change["bias"])
    with pytest.raises(error, match=message):
        attention(q, k, v, change.get("mask"), **kwargs)


def test_block_sizes_must_be_positive():
    with pytest.raises(ValueError, match="block_q"):
        BlockSizes(block_q=0)


class TestPallasGpu(AttentionContract):
    """The Triton kernels in interpret mode (CPU)."""

    implementation = "pallas_gpu"
    block_sizes = BlockSizes(block_q=16, block_kv=32)
    length = 72


@pytest.mark.parametrize(
    "implementation, kwargs, error, message",
    [
        ("pallas_gpu", dict(block_sizes=BlockSizes(block_q=24, block_kv=32)), ValueError, "block_q"),
        ("pallas_gpu", dict(bias=jnp.zeros((1, 1, 32, 32))), NotImplementedError, "bias"),
        pytest.param("pallas_tpu", dict(block_sizes=BlockSizes(block_q=12, block_kv=128)), ValueError, "block_q",
                     marks=needs_tpu_or_cpu),
        pytest.param("pallas_tpu", dict(block_sizes=BlockSizes(block_q=16, block_kv=64)), ValueError, "block_kv",
                     marks=needs_tpu_or_cpu),
        pytest.param("pallas_tpu", dict(bias=jnp.zeros((1, 1, 32, 32))), NotImplementedError, "bias",
                     marks=needs_tpu_or_cpu),
    ],
)
def test_pallas_rejects_what_it_cannot_tile(implementation, kwargs, error, message):
    q = jnp.ones((1, 32, 2, 16))
    with pytest.raises(error, match=message):
        attention(q, q, q, masks.causal(), implementation=implementation, **kwargs)


@needs_tpu_or_cpu
class TestPallasTpu(AttentionContract):
    """The Mosaic kernels in the TPU interpreter (CPU): fewer masks, the interpreter is slow."""

    implementation = "pallas_tpu"
    block_sizes = BlockSizes(block_q=32, block_kv=128)
    length = 200
    masks_to_test = ["causal", "sinks_or_window", "document_causal", "per_head_windows", "empty_rows", "prefix_lm",
                     "global_and_window"]


LOWERING_MASKS = ["causal", "sinks_or_window", "document_causal", "prefix_lm", "global_and_window", "per_head_windows"]


@pytest.mark.parametrize("mask_name", LOWERING_MASKS)
@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_public_op_lowers_to_the_compiled_kernels(monkeypatch, implementation, mask_name):
    """Forward and backward through ``attention`` lower for real hardware (Triton / Mosaic), not
    just interpret: masks with arrays reach the kernels as tile operands, nothing gathers."""
    import importlib

    from pallas_kernels.common import compat

    adapter = importlib.import_module(f"jaxsparse.ops.attention.{implementation}")
    monkeypatch.setattr(adapter, "interpret_on", lambda platform, name: False)  # as on the accelerator
    sizes = BlockSizes(block_q=64, block_kv=64) if implementation == "pallas_gpu" else BlockSizes(block_q=64, block_kv=128)
    q, k, v, _, _ = _inputs(jax.random.key(11), 2, 256, 256, 4, 2, 64, jnp.bfloat16)
    mask = MASKS[mask_name](2, 256, 256)

    def forward_and_backward(q, k, v):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask, implementation=implementation, block_sizes=sizes).astype(jnp.float32))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    if implementation == "pallas_gpu":
        with compat.triton_lowering_without_gpu():
            text = jax.jit(forward_and_backward).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla.gpu.triton") == 3, "expected the fwd, dq and dkv Triton kernels"
    else:
        with compat.tpu_lowering_without_tpu():
            exported = jax.export.export(jax.jit(forward_and_backward), platforms=["tpu"])(q, k, v)
        text = exported.mlir_module()
        for name in ("fwd", "bwd_dq", "bwd_dkv"):
            assert f"jaxsparse_block_sparse_attention_{name}" in text
