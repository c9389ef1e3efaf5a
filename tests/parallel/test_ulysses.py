"""Ulysses sequence parallelism on 8 fake CPU devices: equal to single-device reference attention on the
global arrays (forward and gradients) for 1-D and 2-D meshes, structured, per-sequence and per-head
masks, grouped-query heads with fewer kv heads than devices; and the argument errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse import BlockSizes, attention, make_block_mask, masks
from jaxsparse.parallel.ulysses import ulysses_attention
from jaxsparse.testing import assert_allclose, random_normal

B, T, H, D = 2, 64, 8, 16

# name -> (mesh shape, mesh axis names, batch_axis_name)
MESHES = {
    "1d-8": ((8,), ("sequence",), None),
    "1d-4": ((4,), ("sequence",), None),
    "1d-2": ((2,), ("sequence",), None),
    "2d-2x4": ((2, 4), ("data", "sequence"), "data"),
}
# Two documents per sequence, split at different places in the two batch entries.
SEGMENT_IDS = np.stack([np.repeat([0, 1], [20, T - 20]), np.repeat([0, 1, 2], [9, 40, T - 49])])
MASKS = {
    "causal": lambda: masks.causal(),
    "causal_window": lambda: masks.causal() & masks.sliding_window(16),
    "causal_document": lambda: masks.causal() & masks.document(jnp.asarray(SEGMENT_IDS)),
    "per_head_windows": lambda: masks.causal() & masks.per_head([masks.sliding_window(4 * (h + 1)) for h in range(H)]),
    "from_fn_batch_head": lambda: masks.from_fn(lambda b, h, q, k: (q >= k) & ((q - k) % (b + h + 2) == 0)),
}


def _mesh(name):
    shape, names, batch_axis = MESHES[name]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names), batch_axis


def _qkv(seed, kv_heads=H, q_len=T, kv_len=T):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (random_normal(keys[0], (B, q_len, H, D)), random_normal(keys[1], (B, kv_len, kv_heads, D)),
            random_normal(keys[2], (B, kv_len, kv_heads, D)))


def _ulysses(mesh_name, mask, **kwargs):
    mesh, batch_axis = _mesh(mesh_name)
    return lambda q, k, v: ulysses_attention(q, k, v, mask, mesh=mesh, axis_name="sequence",
                                             batch_axis_name=batch_axis, **kwargs)


def _reference(mask, **kwargs):
    return lambda q, k, v: attention(q, k, v, mask, implementation="reference", **kwargs)


def _shard(mesh_name, *arrays):
    """Places the global arrays sequence-sharded (and batch-sharded on the 2-D mesh), as a caller would."""
    mesh, batch_axis = _mesh(mesh_name)
    sharding = NamedSharding(mesh, P(batch_axis, "sequence"))
    return [jax.device_put(x, sharding) for x in arrays]


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("mesh_name", ["1d-8", "2d-2x4"])
def test_forward_equals_reference(mesh_name, mask_name):
    q, k, v = _qkv(0)
    mask = MASKS[mask_name]()
    out = jax.jit(_ulysses(mesh_name, mask))(*_shard(mesh_name, q, k, v))
    assert_allclose(out, _reference(mask)(q, k, v), dtype=jnp.float32)
    mesh, batch_axis = _mesh(mesh_name)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(batch_axis, "sequence")), out.ndim)


@pytest.mark.parametrize("mesh_name, mask_name", [
    ("1d-8", "causal"), ("1d-4", "causal_window"), ("1d-2", "causal_document"), ("2d-2x4", "causal_document"),
    ("2d-2x4", "per_head_windows"),
])
def test_gradients_equal_reference(mesh_name, mask_name):
    q, k, v = _qkv(1)
    mask = MASKS[mask_name]()

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    grads = jax.jit(jax.grad(loss(_ulysses(mesh_name, mask)), argnums=(0, 1, 2)))(q, k, v)
    grads_ref = jax.grad(loss(_reference(mask)), argnums=(0, 1, 2))(q, k, v)
    assert_allclose(grads, grads_ref, kind="gradient")


@pytest.mark.parametrize("mesh_name, kv_heads", [
    ("1d-8", 1),  # multi-query: the one kv head is repeated 8 times
    ("1d-8", 2),  # K < n: each kv head repeated 4 times
    ("1d-4", 2),  # K < n
    ("1d-2", 4),  # K > n: two kv heads per device
    ("2d-2x4", 2),
])
def test_grouped_query_heads(mesh_name, kv_heads):
    q, k, v = _qkv(2, kv_heads=kv_heads)
    mask = masks.causal() & masks.sliding_window(24)

    def run(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))), argnums=(0, 1, 2))(q, k, v)

    (value, grads), (value_ref, grads_ref) = jax.jit(lambda: run(_ulysses(mesh_name, mask)))(), run(_reference(mask))
    assert_allclose(value, value_ref, dtype=jnp.float32)
    assert_allclose(grads, grads_ref, kind="gradient")


def test_cross_attention_lengths_block_mask_and_options():
    """S != T, a precompiled BlockMask, softcap and scale, the reference local op."""
    q, k, v = _qkv(3, q_len=32, kv_len=64)
    block_mask = make_block_mask(masks.sliding_window(8, 40), q_len=32, kv_len=64, block_q=16, block_kv=16)
    kwargs = dict(softcap=5.0, scale=0.3)
    ref = _reference(block_mask, **kwargs)(q, k, v)
    for implementation in ("xla", "reference"):
        out = jax.jit(_ulysses("1d-8", block_mask, implementation=implementation, **kwargs))(q, k, v)
        assert_allclose(out, ref, dtype=jnp.float32)
    out = jax.jit(_ulysses("2d-2x4", masks.causal(), block_sizes=BlockSizes(block_q=16, block_kv=32)))(q, k, v)
    assert_allclose(out, _reference(masks.causal())(q, k, v), dtype=jnp.float32)


def test_traced_segment_ids():
    """A document mask built inside jit from traced segment ids (metadata compiled in the trace)."""
    q, k, v = _qkv(4)

    @jax.jit
    def run(q, k, v, segment_ids):
        mask = masks.causal() & masks.document(segment_ids)
        return ulysses_attention(q, k, v, mask, mesh=_mesh("2d-2x4")[0], axis_name="sequence", batch_axis_name="data")

    out = run(q, k, v, jnp.asarray(SEGMENT_IDS))
    assert_allclose(out, _reference(MASKS["causal_document"]())(q, k, v), dtype=jnp.float32)


def test_exchanges_with_all_to_all():
    q, k, v = _qkv(5)
    hlo = jax.jit(_ulysses("1d-8", masks.causal())).lower(q, k, v).compile().as_text()
    assert hlo.count("all-to-all(") >= 4  # q, k, v there and the output back


def _call(q_shape=(B, T, H, D), kv_shape=(B, T, H, D), mesh_name="1d-8", axis_name="sequence",
          batch_axis_name=None, mask=None):
    """Calls the op on zero host arrays of the given shapes: the checks read shapes only."""
    mesh, _ = _mesh(mesh_name)
    q, kv = np.zeros(q_shape, np.float32), np.zeros(kv_shape, np.float32)
    return ulysses_attention(q, kv, kv, mask, mesh=mesh, axis_name=axis_name, batch_axis_name=batch_axis_name)


def test_argument_errors():
    with pytest.raises(ValueError, match="axis_name 'seq' is not an axis"):
        _call(axis_name="seq")
    with pytest.raises(ValueError, match="batch_axis_name 'model' must name mesh axes"):
        _call(mesh_name="2d-2x4", batch_axis_name="model")
    with pytest.raises(ValueError, match="batch_axis_name 'sequence' must name mesh axes other than"):
        _call(mesh_name="2d-2x4", batch_axis_name="sequence")
    with pytest.raises(ValueError, match=r"query heads H = 4 \(q.shape\[2\]\) must be divisible by the size 8 of"):
        _call(q_shape=(B, T, 4, D), kv_shape=(B, T, 4, D))
    with pytest.raises(ValueError, match=r"kv heads K = 3 \(k.shape\[2\]\) must be divisible by the size 2"):
        _call(q_shape=(B, T, 6, D), kv_shape=(B, T, 3, D), mesh_name="1d-2")
    with pytest.raises(ValueError, match=r"query length T = 60 \(q.shape\[1\]\) must be divisible by the size 8"):
        _call(q_shape=(B, 60, H, D))
    with pytest.raises(ValueError, match=r"key length S = 34 \(k.shape\[1\]\) must be divisible by the size 4"):
        _call(kv_shape=(B, 34, H, D), mesh_name="1d-4")
    with pytest.raises(ValueError, match=r"batch B = 3 \(q.shape\[0\]\) must be divisible by the 2 shards"):
        _call(q_shape=(3, T, H, D), kv_shape=(3, T, H, D), mesh_name="2d-2x4", batch_axis_name="data")
    with pytest.raises(ValueError, match="q must have rank 4"):
        _call(q_shape=(T, H, D))
    with pytest.raises(ValueError, match="divisible by the kv heads K=3"):
        _call(kv_shape=(B, T, 3, D))
    with pytest.raises(ValueError, match="mask: BlockMask built for q_len=32"):
        _call(mask=make_block_mask(masks.causal(), q_len=32, kv_len=T))
    with pytest.raises(TypeError, match="mask must be a Mask"):
        _call(mask="causal")


def test_pallas_gpu_kernel_sees_global_batch_and_heads():
    """The Triton-backend kernel (interpret mode) evaluates the element mask from tile operands cut to
    the device's batch shard and per-sequence scalars carrying the batch and head offsets."""
    q, k, v = _qkv(6, kv_heads=2)
    # Per-sequence segment ids (rows) and prefix lengths (scalars), a two-sided window per head.
    mask = (masks.document(jnp.asarray(SEGMENT_IDS)) & masks.prefix_lm(jnp.array([5, 30]))
            & masks.per_head([masks.sliding_window(4 * (h + 1), 4 * (h + 1)) for h in range(H)]))
    kwargs = dict(implementation="pallas_gpu", block_sizes=BlockSizes(block_q=16, block_kv=16))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    value, grads = jax.jit(jax.value_and_grad(loss(_ulysses("2d-2x4", mask, **kwargs)), argnums=(0, 1, 2)))(q, k, v)
    value_ref, grads_ref = jax.value_and_grad(loss(_reference(mask)), argnums=(0, 1, 2))(q, k, v)
    assert_allclose(value, value_ref, dtype=jnp.float32)
    assert_allclose(grads, grads_ref, kind="gradient")
