"""Ring attention and token ring on 8 and 4 fake CPU devices: equal to single-device attention in
natural order (forward and gradients) for every layout and mask; the schedule computes only the
visible pairs and stops the ring early; load balance of the layouts; a ring of one device equals the
local op; argument errors."""

from __future__ import annotations

import collections
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxsparse import BlockSizes, attention, masks
from jaxsparse.ops.attention import xla as xla_attention
from jaxsparse.parallel.layouts import KINDS, SequenceLayout
from jaxsparse.parallel.pair_attention import merge_partials
from jaxsparse.parallel.ring_attention import ring_attention, ring_plan
from jaxsparse.parallel.token_ring import token_ring_attention
from jaxsparse.testing import assert_allclose, random_normal

B, H, K, D = 2, 4, 2, 16
BLOCKS = BlockSizes(block_q=16, block_kv=16)
WINDOW = 24
# Ring size -> sequence length. T = 256 on 8 devices: 32 tokens per shard, whole blocks (natural-grid
# classification for contiguous and zigzag). T = 96 on 4 devices: 24 tokens per shard, padded to 32,
# blocks straddling zigzag chunks (element-wise classification).
SEQ_LEN = {8: 256, 4: 96}


def _segment_ids(seq_len):
    """Packed documents, different per batch entry (block metadata per batch: Bm = 2)."""
    rows = [np.repeat(np.arange(64), [37, 90, 10] + [45] * 61)[:seq_len], np.repeat(np.arange(64), [70] + [23] * 63)[:seq_len]]
    return jnp.asarray(np.stack(rows), jnp.int32)


MASKS = {
    "causal": lambda t: masks.causal(),
    "causal_window": lambda t: masks.causal() & masks.sliding_window(WINDOW),
    "causal_document": lambda t: masks.causal() & masks.document(_segment_ids(t)),
    "causal_sinks_or_window": lambda t: masks.causal() & (masks.sinks(2) | masks.sliding_window(WINDOW)),
}
# Head h uses the h-th mask above (H = 4): one ring call checks all four masks (one compilation
# instead of four), with block metadata per batch entry and head.
MASKS["every_mask_per_head"] = lambda t: masks.per_head([MASKS[name](t) for name in list(MASKS)[:H]])
# Queries before position 20 see nothing: output 0 and zero gradients, never NaN.
MASKS["empty_rows"] = lambda t: masks.from_fn(lambda b, h, q, k: (q >= 20) & (k <= q))


def _mesh(size):
    return jax.sharding.Mesh(np.array(jax.devices()[:size]), ("ring",))


def _inputs(seq_len, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (random_normal(keys[0], (B, seq_len, H, D)), random_normal(keys[1], (B, seq_len, K, D)),
            random_normal(keys[2], (B, seq_len, K, D)), random_normal(keys[3], (B, seq_len, H, D)))


def _output_and_gradients(attend, q, k, v, weights):
    """``attend(q, k, v)`` and the gradients of ``sum(weights * out)``, in one jit."""

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(weights * out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@functools.lru_cache(maxsize=None)
def _expected(mask_name, seq_len, scale=None, softcap=None):
    """Single-device dense reference in natural order."""
    q, k, v, weights = _inputs(seq_len)
    mask = MASKS[mask_name](seq_len)
    return _output_and_gradients(
        lambda q, k, v: attention(q, k, v, mask, implementation="reference", scale=scale, softcap=softcap),
        q, k, v, weights)


def _ring_in_natural_order(ring, layout, mask, mesh, **kwargs):
    """Permutes the natural-order inputs, runs the ring, unpermutes the output (as a model would)."""

    def attend(q, k, v):
        q, k, v = (layout.permute(x, axis=1) for x in (q, k, v))
        out = ring(q, k, v, mask, mesh=mesh, axis_name="ring", layout=layout, block_sizes=BLOCKS, **kwargs)
        return layout.unpermute(out, axis=1)

    return attend


def _check(ring, ring_size, kind, mask_name, **kwargs):
    seq_len = SEQ_LEN[ring_size]
    layout = SequenceLayout(kind=kind, num_shards=ring_size)
    attend = _ring_in_natural_order(ring, layout, MASKS[mask_name](seq_len), _mesh(ring_size), **kwargs)
    out, grads = _output_and_gradients(attend, *_inputs(seq_len))
    expected, expected_grads = _expected(mask_name, seq_len, kwargs.get("scale"), kwargs.get("softcap"))
    assert_allclose(out, expected, dtype=jnp.float32)
    assert_allclose(grads, expected_grads, kind="gradient")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ring_size", [8, 4])
@pytest.mark.parametrize("ring", [ring_attention, token_ring_attention])
def test_equals_single_device_for_every_layout_and_mask(ring, ring_size, kind):
    """causal, causal & window, causal & document, causal & (sinks | window): one per head."""
    _check(ring, ring_size, kind, "every_mask_per_head")


@pytest.mark.parametrize(("ring", "ring_size", "kind", "mask_name"), [
    (ring_attention, 8, "contiguous", "causal_window"),  # the ring stops after step 1
    (ring_attention, 4, "contiguous", "causal"),  # half the pairs skipped, all steps run
    (ring_attention, 8, "zigzag", "causal_document"),
    (ring_attention, 4, "striped", "causal_sinks_or_window"),
    (token_ring_attention, 8, "contiguous", "causal_window"),
    (ring_attention, 4, "contiguous", "empty_rows"),
    (token_ring_attention, 4, "zigzag", "empty_rows"),
])
def test_equals_single_device_with_one_mask(ring, ring_size, kind, mask_name):
    """Single masks: plans that skip pairs and steps (a per-head union computes more)."""
    _check(ring, ring_size, kind, mask_name)


def test_reference_implementation_scale_and_softcap():
    _check(ring_attention, 4, "zigzag", "causal_sinks_or_window", implementation="reference", scale=0.3, softcap=5.0)


def test_traced_document_mask_runs_every_step_and_skips_empty_pairs(monkeypatch):
    """Segment ids computed inside jit: no static plan; all steps run and each device skips its
    empty pairs at run time, computing exactly the pairs the concrete plan lists."""
    seq_len, layout, mesh = SEQ_LEN[8], SequenceLayout(kind="zigzag", num_shards=8), _mesh(8)
    q, k, v, weights = _inputs(seq_len)
    segment_ids = _segment_ids(seq_len)

    def attend(q, k, v, segment_ids):
        mask = masks.causal() & masks.document(segment_ids)  # traced ids
        return _ring_in_natural_order(ring_attention, layout, mask, mesh)(q, k, v)

    def loss(q, k, v, segment_ids):
        out = attend(q, k, v, segment_ids)
        return jnp.sum(weights * out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, segment_ids)
    expected, expected_grads = _expected("causal_document", seq_len)
    assert_allclose(out, expected, dtype=jnp.float32)
    assert_allclose(grads, expected_grads, kind="gradient")

    calls = _count_pair_forwards(monkeypatch)
    forward = jax.jit(attend)
    jax.block_until_ready(forward(q, k, v, segment_ids))
    plans = []
    jax.jit(lambda ids: plans.append(ring_plan(masks.causal() & masks.document(ids), seq_len, layout, BLOCKS, batch=B)))(
        segment_ids)
    assert not plans[0].planned and plans[0].steps == 8 and plans[0].rotations == 7
    with pytest.raises(ValueError, match="not planned"):
        plans[0].device_blocks  # noqa: B018
    concrete = ring_plan(MASKS["causal_document"](seq_len), seq_len, layout, BLOCKS, batch=B, heads=H)
    assert concrete.planned and not concrete.computed.all()
    np.testing.assert_array_equal(_per_device(calls, 8), concrete.computed.sum(axis=1))
    assert _executed(jax.make_jaxpr(attend)(q, k, v, segment_ids), "ppermute") == 2 * 7  # k and v, n - 1 steps


def _count_pair_forwards(monkeypatch):
    """Wraps the xla pair forward with a callback that records the device of every executed pair."""
    calls = []
    original = xla_attention.xla_forward

    def counting_forward(*args, **kwargs):
        jax.debug.callback(lambda device: calls.append(int(device)), lax.axis_index("ring"))
        return original(*args, **kwargs)

    monkeypatch.setattr(xla_attention, "xla_forward", counting_forward)
    return calls


def _per_device(calls, ring_size):
    counts = collections.Counter(calls)
    return np.array([counts[device] for device in range(ring_size)])


def _executed(closed_jaxpr, primitive: str) -> int:
    """How many times ``primitive`` runs: scan bodies count ``length`` times, conds their costliest branch."""

    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == primitive:
                total += 1
            elif eqn.primitive.name == "scan":
                total += eqn.params["length"] * count(eqn.params["jaxpr"].jaxpr)
            elif eqn.primitive.name == "cond":
                total += max(count(branch.jaxpr) for branch in eqn.params["branches"])
            else:
                total += sum(count(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return total

    return count(closed_jaxpr.jaxpr)


def test_window_computes_visible_pairs_and_stops_after_one_rotation(monkeypatch):
    """causal & sliding_window(w <= T/n), contiguous: device i needs kv shards i and i - 1, so the ring
    runs steps 0 and 1 (one ppermute of k and v instead of n - 1) and computes 2n - 1 pairs."""
    seq_len, mesh = SEQ_LEN[8], _mesh(8)
    layout = SequenceLayout(kind="contiguous", num_shards=8)
    window = MASKS["causal_window"](seq_len)
    plan = ring_plan(window, seq_len, layout, BLOCKS, batch=B, heads=H)
    assert plan.planned and plan.steps == 2 and plan.rotations == 1
    np.testing.assert_array_equal(plan.computed.sum(axis=1), [1] + [2] * 7)
    dense = ring_plan(masks.full(), seq_len, layout, BLOCKS)
    assert dense.steps == 8 and dense.rotations == 7 and dense.computed.all()

    calls = _count_pair_forwards(monkeypatch)
    q, k, v, _ = _inputs(seq_len)
    attend = _ring_in_natural_order(ring_attention, layout, window, mesh)
    jax.block_until_ready(jax.jit(attend)(q, k, v))
    np.testing.assert_array_equal(_per_device(calls, 8), plan.computed.sum(axis=1))
    assert _executed(jax.make_jaxpr(attend)(q, k, v), "ppermute") == 2 * plan.rotations
    dense_attend = _ring_in_natural_order(ring_attention, layout, masks.full(), mesh)
    assert _executed(jax.make_jaxpr(dense_attend)(q, k, v), "ppermute") == 2 * dense.rotations
    # The backward ring: k, v, dK, dV per rotation, and dK, dV sent home once.
    backward = jax.grad(lambda q, k, v: attend(q, k, v).sum(), argnums=(0, 1, 2))
    assert _executed(jax.make_jaxpr(backward)(q, k, v), "ppermute") == 2 * plan.rotations + 4 * plan.rotations + 2

    kv_bytes = 2 * B * (seq_len // 8) * K * D * 4
    assert plan.bytes_sent_per_device(batch=B, heads=H, kv_heads=K, head_dim=D, dtype=jnp.float32) == kv_bytes
    assert dense.bytes_sent_per_device(batch=B, heads=H, kv_heads=K, head_dim=D, dtype=jnp.float32) == 7 * kv_bytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_name", ["causal", "causal_window", "causal_document"])
@pytest.mark.parametrize("block", [8, 16])
def test_plan_counts_equal_brute_force(kind, mask_name, block):
    """Visible tiles per (device, step) equal a count on the dense mask gathered in layout order."""
    ring_size, seq_len = 4, 96
    layout = SequenceLayout(kind=kind, num_shards=ring_size)
    mask = MASKS[mask_name](seq_len)
    plan = ring_plan(mask, seq_len, layout, BlockSizes(block_q=block, block_kv=block), batch=B, heads=H)
    natural = np.arange(seq_len)
    dense = np.broadcast_to(np.asarray(mask(np.arange(B)[:, None, None], 0, natural[None, :, None], natural[None, None, :])),
                            (B, seq_len, seq_len))
    positions = layout.positions(seq_len)
    shard_len = seq_len // ring_size
    blocks = -(-shard_len // block)
    for device in range(ring_size):
        for step in range(ring_size):
            q_shard, kv_shard = plan.shards(device, step)
            pair = np.zeros((B, blocks * block, blocks * block), bool)
            pair[:, :shard_len, :shard_len] = dense[:, positions[q_shard]][:, :, positions[kv_shard]]
            tiles = pair.reshape(B, blocks, block, blocks, block).any(axis=(2, 4)).sum() * H
            assert plan.visible_blocks[device, step] == tiles, (device, step)
    assert plan.steps == 1 + max(np.flatnonzero(plan.visible_blocks.sum(0)))


def test_nothing_visible_runs_no_step():
    seq_len, layout = SEQ_LEN[4], SequenceLayout(kind="zigzag", num_shards=4)
    plan = ring_plan(masks.sinks(0), seq_len, layout, BLOCKS)
    assert plan.steps == 0 and plan.rotations == 0 and not plan.computed.any()
    q, k, v, weights = _inputs(seq_len)
    out, grads = _output_and_gradients(_ring_in_natural_order(ring_attention, layout, masks.sinks(0), _mesh(4)),
                                       q, k, v, weights)
    assert not np.asarray(out).any()
    assert not any(np.asarray(g).any() for g in grads)


def test_merge_of_empty_partials_has_zero_gradients():
    out = jnp.ones((3, 2))
    lse = jnp.array([-jnp.inf, 0.5, -jnp.inf])
    other = jnp.array([-jnp.inf, -jnp.inf, 1.0])

    def merged(out, lse, other):
        out, lse = merge_partials(out, lse, 2 * out, other)
        return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (merged_out, merged_lse)), grads = jax.value_and_grad(merged, argnums=(0, 1, 2), has_aux=True)(out, lse, other)
    np.testing.assert_array_equal(merged_lse, [-jnp.inf, 0.5, 1.0])
    np.testing.assert_array_equal(merged_out, [[0, 0], [1, 1], [2, 2]])
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_array_equal(grads[1], [0.0, 1.0, 0.0])


def test_load_balance_under_causal():
    """Per-device visible tiles over the ring: zigzag and striped balance, contiguous does not."""
    ratios = {kind: ring_plan(masks.causal(), 2048, SequenceLayout(kind=kind, num_shards=8), BLOCKS).imbalance
              for kind in KINDS}
    assert ratios["zigzag"] <= 1.05
    assert ratios["striped"] <= 1.05
    assert ratios["contiguous"] >= 1.7


def test_ring_of_one_device_equals_local_op():
    seq_len = 72  # not a multiple of the block: padded tiles
    q, k, v, weights = _inputs(seq_len, seed=1)
    mask = MASKS["causal_sinks_or_window"](seq_len)
    ring = _ring_in_natural_order(ring_attention, SequenceLayout(kind="zigzag", num_shards=1), mask, _mesh(1))
    out, grads = _output_and_gradients(ring, q, k, v, weights)
    expected, expected_grads = _output_and_gradients(
        lambda q, k, v: attention(q, k, v, mask, implementation="xla", block_sizes=BLOCKS), q, k, v, weights)
    assert_allclose(out, expected, dtype=jnp.float32)
    assert_allclose(grads, expected_grads, kind="gradient")


def _call(ring=ring_attention, q_shape=(1, 64, 4, 16), kv_shape=(1, 64, 2, 16), ring_size=8, **kwargs):
    q = jnp.zeros(q_shape)
    kv = jnp.zeros(kv_shape)
    return ring(q, kv, kv, masks.causal(), **{"mesh": _mesh(ring_size), "axis_name": "ring", **kwargs})


@pytest.mark.parametrize("ring", [ring_attention, token_ring_attention])
def test_argument_errors(ring):
    with pytest.raises(ValueError, match=r"seq_len=72 .* 8 x 2 = 16 for the 'zigzag'"):
        _call(ring, q_shape=(1, 72, 4, 16), kv_shape=(1, 72, 2, 16))
    with pytest.raises(ValueError, match=r"seq_len=60 .* 8 x 1 = 8"):
        _call(ring, q_shape=(1, 60, 4, 16), kv_shape=(1, 60, 2, 16), layout="striped")
    with pytest.raises(ValueError, match="axis_name 'seq' is not an axis"):
        _call(ring, axis_name="seq")
    with pytest.raises(ValueError, match=r"S == T, got S=32 \(k.shape\[1\]\) and T=64"):
        _call(ring, kv_shape=(1, 32, 2, 16))
    with pytest.raises(ValueError, match="q must have rank 4"):
        _call(ring, q_shape=(64, 4, 16))
    with pytest.raises(ValueError, match="divisible by the kv heads K=3"):
        _call(ring, kv_shape=(1, 64, 3, 16))
    with pytest.raises(ValueError, match="layout must be one of"):
        _call(ring, layout="ring")
    with pytest.raises(ValueError, match="layout has num_shards=4, but mesh axis axis_name='ring' has size 8"):
        _call(ring, layout=SequenceLayout(kind="zigzag", num_shards=4))
    with pytest.raises(ValueError, match="implementation must be one of"):
        _call(ring, implementation="cuda")
    with pytest.raises(NotImplementedError, match="implementation='pallas_gpu'"):
        _call(ring, implementation="pallas_gpu")
    with pytest.raises(ValueError, match="softcap must be positive"):
        _call(ring, softcap=-1.0)
    with pytest.raises(TypeError, match="mask must be a jaxsparse Mask"):
        ring(jnp.zeros((1, 64, 4, 16)), jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 2, 16)),
             masks.make_block_mask(masks.causal(), q_len=64, kv_len=64), mesh=_mesh(8), axis_name="ring")
