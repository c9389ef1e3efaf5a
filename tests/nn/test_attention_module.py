"""jaxsparse.nn.Attention and apply_rotary against a plain-jnp re-implementation written here.

The reference below shares nothing with the library but the layer's parameters: einsum projections,
RoPE as a complex rotation, masks as elementwise predicates, one dense softmax.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from jaxsparse import BlockSizes, make_block_mask, masks
from jaxsparse.kv import EvictedKVCache, KVCache, heavy_hitter_append, streaming_llm_append
from jaxsparse.kv.selection import top_k_keys
from jaxsparse.nn import Attention, apply_rotary
from jaxsparse.testing import assert_allclose, random_normal

BATCH, LENGTH, MODEL_DIM, HEADS, HEAD_DIM = 2, 24, 32, 4, 8
WINDOW = 5
# Three blocks per axis, so the window skips whole blocks in the xla implementation.
BLOCKS = BlockSizes(block_q=8, block_kv=8)

# Each pair: the library mask and the same rule as a predicate on broadcast (b, t, s) indices.
MASKS = {
    "causal": (masks.causal(), lambda b, t, s: s <= t),
    "causal_window": (masks.causal() & masks.sliding_window(WINDOW), lambda b, t, s: (s <= t) & (t - s <= WINDOW)),
}
SEGMENTS = jnp.array([[0] * 7 + [1] * 12 + [2] * 5, [0] * 15 + [1] * 9], jnp.int32)


def _rotate(x, positions, theta):
    """RoPE as multiplication by ``exp(i * position * freq)`` of ``x[..., j] + i * x[..., j + D/2]``."""
    half = x.shape[-1] // 2
    freq = 1.0 / theta ** (np.arange(half) / half)
    angle = jnp.asarray(positions, jnp.float32)[..., None, None] * jnp.asarray(freq, jnp.float32)
    z = (x[..., :half] + 1j * x[..., half:]) * jnp.exp(1j * angle)
    return jnp.concatenate([z.real, z.imag], -1).astype(x.dtype)


def _reference_layer(layer, x, visible, *, positions=None, theta=None, scale=None, softcap=None):
    """The layer's function from its parameters; ``visible(b, t, s)`` is the mask predicate."""

    def project(linear, equation, inputs):
        y = jnp.einsum(equation, inputs, linear.kernel[...])
        return y if linear.bias is None else y + linear.bias[...]

    q = project(layer.query, "btm,mhd->bthd", x)
    k = project(layer.key, "btm,mkd->btkd", x)
    v = project(layer.value, "btm,mkd->btkd", x)
    if theta is not None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]) if positions is None else positions, x.shape[:2])
        q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    b, t, s = np.ix_(np.arange(x.shape[0]), np.arange(x.shape[1]), np.arange(x.shape[1]))
    logits = jnp.where(visible(b, t, s)[:, None], logits, -jnp.inf)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
    return project(layer.out, "bthd,hdm->btm", out)


def _value_and_input_grad(fn, x, cotangent):
    """``fn(x)`` and the gradient of ``sum(fn(x) * cotangent)`` with respect to ``x``, jitted."""

    def loss(x):
        y = fn(x)
        return jnp.sum(y * cotangent), y

    (_, y), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
    return y, dx


@nnx.jit
def _apply(layer, x, positions=None, mask=None):
    """``layer(x, ...)`` in one compiled call (op-by-op dispatch is slower on CPU)."""
    return layer(x, positions=positions, mask=mask)


def _inputs(seed=0):
    kx, kc = jax.random.split(jax.random.key(seed))
    return random_normal(kx, (BATCH, LENGTH, MODEL_DIM)), random_normal(kc, (BATCH, LENGTH, MODEL_DIM))


# Positions with gaps of 1 to 3, different in each row.
GAPPED_POSITIONS = jnp.cumsum(jax.random.randint(jax.random.key(9), (BATCH, LENGTH), 1, 4), axis=1)


# Every pair of (mask, heads, rope) settings appears once; MHA also covers the biases.
@pytest.mark.parametrize(
    "mask_name, kv_heads, use_bias, rope_theta, extra",
    [
        ("causal", 2, False, 10000.0, {}),
        ("causal", 4, True, None, {}),
        ("causal_window", 2, False, None, dict(scale=0.2, softcap=3.0)),
        ("causal_window", 4, True, 10000.0, dict(positions=GAPPED_POSITIONS)),
    ],
    ids=["causal-gqa-rope", "causal-mha_bias-no_rope", "window-gqa-no_rope-softcap", "window-mha_bias-rope-positions"],
)
def test_matches_plain_jnp(mask_name, kv_heads, use_bias, rope_theta, extra):
    mask, visible = MASKS[mask_name]
    positions = extra.get("positions")
    layer = Attention(
        MODEL_DIM,
        HEADS,
        num_kv_heads=kv_heads,
        head_dim=HEAD_DIM,
        mask=mask,
        rope_theta=rope_theta,
        scale=extra.get("scale"),
        softcap=extra.get("softcap"),
        block_sizes=BLOCKS,
        use_bias=use_bias,
        bias_init=nnx.initializers.normal(0.5),
        rngs=nnx.Rngs(0),
    )
    x, cotangent = _inputs()
    y, dx = _value_and_input_grad(lambda x: layer(x, positions=positions), x, cotangent)
    y_ref, dx_ref = _value_and_input_grad(lambda x: _reference_layer(layer, x, visible, theta=rope_theta, **extra), x, cotangent)
    assert y.shape == (BATCH, LENGTH, MODEL_DIM)
    assert_allclose(y, y_ref)
    assert_allclose(dx, dx_ref, kind="gradient")


def test_rotary_matches_complex_rotation_and_per_token_positions():
    x = random_normal(jax.random.key(1), (BATCH, LENGTH, 3, HEAD_DIM))
    positions = jnp.asarray(np.concatenate([np.arange(10), np.arange(14)])[None] + np.array([[0], [5]]), jnp.int32)
    rotated = apply_rotary(x, positions, theta=500.0)
    assert_allclose(rotated, _rotate(x, positions, 500.0))
    # [B, T] positions act row by row like [T] positions.
    for row in range(BATCH):
        assert_allclose(rotated[row], apply_rotary(x[row : row + 1], positions[row], theta=500.0)[0])
    # Position 0 is the identity; rotations keep norms.
    assert_allclose(apply_rotary(x, jnp.zeros(LENGTH, jnp.int32)), x)
    assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1))


@jax.jit
def _rotated_dots(q, k, q_positions, k_positions):
    """``rot(q, q_positions[i]) . rot(k, k_positions[i])`` for each ``i``; ``q``, ``k`` ``[D]``."""
    shape = (1, q_positions.shape[0], 1, q.shape[0])
    rq = apply_rotary(jnp.broadcast_to(q, shape), q_positions)
    rk = apply_rotary(jnp.broadcast_to(k, shape), k_positions)
    return jnp.sum(rq * rk, axis=-1)[0, :, 0]


@given(m=st.integers(200, 700), n=st.integers(200, 700), shift=st.integers(-200, 200), seed=st.integers(0, 2**16))
def test_rotary_dot_product_depends_on_offset_only(m, n, shift, seed):
    q, k = random_normal(jax.random.key(seed), (2, 16))
    q, k = q / jnp.linalg.norm(q), k / jnp.linalg.norm(k)
    q_positions = jnp.array([m, m + shift] + [m + j for j in range(8)])
    k_positions = jnp.array([n, n + shift] + [n] * 8)
    dots = np.asarray(_rotated_dots(q, k, q_positions, k_positions))
    # float32 angles of positions up to ~900 carry errors of ~1e-4 radians.
    np.testing.assert_allclose(dots[1], dots[0], atol=1e-3)
    # Not trivially constant: the product changes with the offset.
    assert np.ptp(dots[2:]) > 1e-2


def test_call_mask_override_with_packed_documents():
    layer = Attention(MODEL_DIM, HEADS, num_kv_heads=2, mask=masks.causal(), block_sizes=BLOCKS, rngs=nnx.Rngs(2))
    x, cotangent = _inputs(seed=3)
    # Positions restart at 0 in each document (inside a document this is a shift, which RoPE ignores).
    starts = jnp.concatenate([jnp.zeros((BATCH, 1), bool), SEGMENTS[:, 1:] != SEGMENTS[:, :-1]], axis=1)
    index = jnp.arange(LENGTH)
    positions = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    document_mask = masks.causal() & masks.document(SEGMENTS)

    def same_document_causal(b, t, s):
        return (s <= t) & (SEGMENTS[b, t] == SEGMENTS[b, s])

    y, dx = _value_and_input_grad(lambda x: layer(x, positions=positions, mask=document_mask), x, cotangent)
    y_ref, dx_ref = _value_and_input_grad(
        lambda x: _reference_layer(layer, x, same_document_causal, positions=positions, theta=10000.0), x, cotangent
    )
    assert_allclose(y, y_ref)
    assert_allclose(dx, dx_ref, kind="gradient")
    # The override matters: the layer's own causal mask gives another answer.
    assert not np.allclose(_apply(layer, x, positions), y, atol=1e-3)
    # A BlockMask compiled once (to share across layers) gives the same result.
    block_mask = make_block_mask(document_mask, q_len=LENGTH, kv_len=LENGTH, block_q=8, block_kv=8, batch=BATCH, heads=HEADS)
    assert_allclose(_apply(layer, x, positions, block_mask), y)


def test_reference_and_xla_implementations_agree():
    mask = masks.causal() & masks.sliding_window(WINDOW)
    layers = {
        name: Attention(MODEL_DIM, HEADS, num_kv_heads=2, mask=mask, implementation=name, block_sizes=BLOCKS, rngs=nnx.Rngs(4))
        for name in ("reference", "xla")
    }
    x, cotangent = _inputs(seed=5)

    def run(layer):
        def loss(x):
            y, lse = layer(x, return_lse=True)
            return jnp.sum(y * cotangent) + jnp.sum(lse), (y, lse)

        (_, outputs), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
        return outputs, dx

    (y_ref, lse_ref), dx_ref = run(layers["reference"])
    (y, lse), dx = run(layers["xla"])
    assert lse.shape == (BATCH, HEADS, LENGTH)
    assert_allclose((y, lse), (y_ref, lse_ref))
    assert_allclose(dx, dx_ref, kind="gradient")


def test_jitted_train_step_gives_finite_gradients():
    layer = Attention(MODEL_DIM, HEADS, num_kv_heads=1, mask=masks.causal(), softcap=20.0, use_bias=True, rngs=nnx.Rngs(6))
    x, target = _inputs(seed=7)

    @nnx.jit
    def train_step(layer, x, target):
        def loss_fn(layer):
            return jnp.mean((layer(x) - target) ** 2)

        return nnx.value_and_grad(loss_fn)(layer)

    loss, grads = train_step(layer, x, target)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 8  # four kernels, four biases
    for leaf in leaves:
        assert np.isfinite(np.asarray(leaf)).all()
        assert np.abs(np.asarray(leaf)).max() > 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_sequence_axis_of_the_active_mesh_runs_ulysses_with_the_same_result():
    from jaxsparse.parallel import make_mesh

    layer = Attention(32, 4, num_kv_heads=2, mask=masks.causal() & masks.sliding_window(5), rngs=nnx.Rngs(0))
    x = random_normal(jax.random.key(1), (2, 16, 32))
    weights = random_normal(jax.random.key(2), (2, 16, 32))

    @nnx.jit
    def loss_and_grad(layer, x):
        return nnx.value_and_grad(lambda layer, x: jnp.sum(layer(x) * weights), argnums=(0, 1))(layer, x)

    local_loss, (local_layer_grad, local_x_grad) = loss_and_grad(layer, x)
    mesh = make_mesh(data=2, sequence=4)
    with jax.set_mesh(mesh):
        loss, (layer_grad, x_grad) = loss_and_grad(layer, x)
        hlo = nnx.jit(lambda layer, x: layer(x)).lower(layer, x).as_text()
    assert "all_to_all" in hlo or "all-to-all" in hlo, "attention did not run as Ulysses under the mesh"
    assert_allclose(loss, local_loss, dtype=jnp.float32)
    assert_allclose(x_grad, local_x_grad, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(layer_grad)), jax.tree.leaves(nnx.state(local_layer_grad))):
        assert_allclose(a, b, dtype=jnp.float32, kind="gradient")
    with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="return_lse"):
        layer(x, return_lse=True)


def test_parameters_carry_logical_axis_names():
    layer = Attention(MODEL_DIM, HEADS, num_kv_heads=2, use_bias=True, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert tuple(specs["query"]["kernel"].get_value()) == ("embed", "heads", "head_dim")
    assert tuple(specs["key"]["kernel"].get_value()) == ("embed", "kv_heads", "head_dim")
    assert tuple(specs["value"]["bias"].get_value()) == ("kv_heads", "head_dim")
    assert tuple(specs["out"]["kernel"].get_value()) == ("heads", "head_dim", "embed")
    assert layer.key.kernel.shape == (MODEL_DIM, 2, MODEL_DIM // HEADS)


def test_computation_dtype():
    layer = Attention(MODEL_DIM, HEADS, mask=masks.causal(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = _apply(layer, _inputs()[0])
    assert y.dtype == jnp.bfloat16
    assert layer.query.kernel.dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(model_dim=0), "model_dim"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(num_kv_heads=0), "num_kv_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(model_dim=2, num_heads=4), "head_dim"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=0), "scale"),
        (dict(implementation="cuda"), "implementation"),
    ],
)
def test_bad_config_raises_value_error_naming_the_argument(kwargs, argument):
    kwargs = dict(dict(model_dim=MODEL_DIM, num_heads=HEADS), **kwargs)
    with pytest.raises(ValueError, match=argument):
        Attention(**kwargs, rngs=nnx.Rngs(0))


def test_odd_head_dim_is_fine_without_rope():
    layer = Attention(MODEL_DIM, HEADS, head_dim=7, rope_theta=None, rngs=nnx.Rngs(0))
    assert _apply(layer, _inputs()[0]).shape == (BATCH, LENGTH, MODEL_DIM)


def test_bad_call_arguments_raise():
    layer = Attention(MODEL_DIM, HEADS, rngs=nnx.Rngs(0))
    x = _inputs()[0]
    with pytest.raises(ValueError, match="x must have shape"):
        layer(x[..., :-1])
    with pytest.raises(ValueError, match="positions"):
        layer(x, positions=jnp.arange(LENGTH + 1))
    with pytest.raises(TypeError, match="positions"):
        layer(x, positions=jnp.arange(LENGTH, dtype=jnp.float32))
    with pytest.raises(ValueError, match="positions"):
        Attention(MODEL_DIM, HEADS, rope_theta=None, rngs=nnx.Rngs(0))(x, positions=jnp.arange(LENGTH))
    with pytest.raises(TypeError, match="mask"):
        Attention(MODEL_DIM, HEADS, mask="causal", rngs=nnx.Rngs(0))


class TestDecode:
    """Attention.decode with a KV cache equals the causal training forward."""

    def _layer_and_tokens(self):
        layer = Attention(32, 4, num_kv_heads=2, mask=masks.causal(), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, 7, 32))
        return layer, x

    @pytest.mark.parametrize("chunk", [1, 3])
    def test_token_by_token_equals_causal_forward(self, chunk):
        layer, x = self._layer_and_tokens()
        expected = layer(x)
        cache = KVCache.create(2, 16, 2, 8)
        outputs = []
        for start in range(0, 7, chunk):
            y, cache = layer.decode(x[:, start : start + chunk], cache)
            outputs.append(y)
        np.testing.assert_allclose(np.asarray(jnp.concatenate(outputs, axis=1)), np.asarray(expected), rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(np.asarray(cache.lengths), [7, 7])

    def test_decode_with_a_policy_that_selects_everything(self):
        layer, x = self._layer_and_tokens()
        cache = KVCache.create(2, 16, 2, 8)
        _, cache = layer.decode(x[:, :6], cache)
        dense, _ = layer.decode(x[:, 6:], cache)
        selected, _ = layer.decode(x[:, 6:], cache, select=functools.partial(top_k_keys, k=16))
        np.testing.assert_allclose(np.asarray(selected), np.asarray(dense), rtol=2e-5, atol=2e-5)
        with pytest.raises(ValueError, match="the cache has K=1"):
            layer.decode(x[:, :1], KVCache.create(2, 16, 1, 8))

    @pytest.mark.parametrize("policy", ["append", "attention_append"])
    def test_evicting_cache_that_evicts_nothing_equals_causal_forward(self, policy):
        """An evicted cache with room for every token (8 slots, 7 tokens), fed by StreamingLLM
        (append first) or H2O (attend first), decodes like the training forward."""
        layer, x = self._layer_and_tokens()
        evict = {"append": functools.partial(streaming_llm_append, sinks=1),
                 "attention_append": functools.partial(heavy_hitter_append, recent=2)}[policy]
        cache, outputs = EvictedKVCache.create(2, 8, 2, 8), []
        for t in range(7):
            y, cache = layer.decode(x[:, t : t + 1], cache, **{policy: evict})
            outputs.append(y)
        np.testing.assert_allclose(np.asarray(jnp.concatenate(outputs, axis=1)), np.asarray(layer(x)), rtol=2e-5,
                                   atol=2e-5)
        with pytest.raises(ValueError, match="exactly one of append= or attention_append="):
            layer.decode(x[:, :1], cache)
        with pytest.raises(ValueError, match="exactly one of append= or attention_append="):
            layer.decode(x[:, :1], cache, append=evict, attention_append=evict)
        with pytest.raises(ValueError, match="one token at a time"):
            layer.decode(x[:, :2], cache, **{policy: evict})
