"""Expert parallelism on 8 fake CPU devices: equal to the single-device capacity dispatch run on each
token shard (forward, stats, gradients), equal to the dropless layer when capacity is ample, and the
argument errors."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsparse.moe import Routing, blockffn_router, capacity, moe_ffn, top_k_router
from jaxsparse.parallel import expert_parallel_moe_ffn
from jaxsparse.testing import assert_allclose, random_normal

N, M, F, E = 64, 16, 32, 8

# (mesh shape, mesh axis names, the expert axis)
MESHES = {
    "1d-8": ((8,), ("expert",), "expert"),
    "1d-2": ((2,), ("expert",), "expert"),
    "2d-2x4": ((2, 4), ("data", "expert"), "expert"),
}
# Capacity factors that make both routers drop slots on every mesh above.
DROPPING = {"top2": 1.0, "blockffn": 0.25}


def _mesh(name):
    shape, names, axis = MESHES[name]
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names), axis


def _params(seed, experts=E, tokens=N):
    keys = jax.random.split(jax.random.key(seed), 5)
    return dict(
        w_gate=random_normal(keys[0], (experts, M, F), scale=M**-0.5),
        w_up=random_normal(keys[1], (experts, M, F), scale=M**-0.5),
        w_down=random_normal(keys[2], (experts, F, M), scale=F**-0.5),
        router=random_normal(keys[3], (M, experts)),
        x=random_normal(keys[4], (tokens, M)),
    )


def _route(router, x, w_router):
    logits = x @ w_router
    return top_k_router(logits, 2) if router == "top2" else blockffn_router(logits)


def _per_shard(x, routing, p, shards, capacity_factor, activation="silu"):
    """The single-device capacity dispatch on each of ``shards`` token shards separately (vmapped)."""
    split = lambda a: a.reshape(shards, a.shape[0] // shards, *a.shape[1:])  # noqa: E731

    def one(x, routing):
        return moe_ffn(x, routing, p["w_up"], p["w_down"], w_gate=p["w_gate"], activation=activation,
                       capacity_factor=capacity_factor)

    y, stats = jax.vmap(one)(split(x), jax.tree.map(split, routing))
    return y.reshape(x.shape), jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)


def _expert_parallel(x, routing, p, mesh, axis, capacity_factor, activation="silu"):
    return expert_parallel_moe_ffn(x, routing, p["w_up"], p["w_down"], w_gate=p["w_gate"], activation=activation,
                                   capacity_factor=capacity_factor, mesh=mesh, axis_name=axis)


@pytest.mark.parametrize("router", ["top2", "blockffn"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_forward_equals_per_shard_capacity_dispatch(mesh_name, router):
    mesh, axis = _mesh(mesh_name)
    shards = mesh.shape[axis]
    p = _params(0)
    capacity_factor = DROPPING[router]

    @jax.jit
    def both(p):
        routing = _route(router, p["x"], p["router"])
        return (_expert_parallel(p["x"], routing, p, mesh, axis, capacity_factor),
                _per_shard(p["x"], routing, p, shards, capacity_factor), routing.active())

    (y, stats), (y_ref, stats_ref), active = both(p)
    assert_allclose(y, y_ref, dtype=jnp.float32)
    assert int(stats.dropped) > 0, "the case must drop slots"
    assert int(stats.dropped) == int(stats_ref.dropped)
    assert int(stats.routed) == int(stats_ref.routed) == int(np.asarray(active).sum())
    np.testing.assert_array_equal(np.asarray(stats.expert_load), np.asarray(stats_ref.expert_load))
    np.testing.assert_array_equal(np.asarray(stats.expert_load), np.asarray(active).sum(0))
    assert y.sharding.spec == P(axis)


@pytest.mark.parametrize("router", ["top2", "blockffn"])
@pytest.mark.parametrize("mesh_name", ["1d-8", "2d-2x4"])
def test_gradients_equal_per_shard_capacity_dispatch(mesh_name, router):
    """With drops, and the routing computed from x @ W_r inside the differentiated function."""
    mesh, axis = _mesh(mesh_name)
    shards = mesh.shape[axis]
    p = _params(1)
    capacity_factor = DROPPING[router]

    def loss(p, parallel):
        routing = _route(router, p["x"], p["router"])
        if parallel:
            y, _ = _expert_parallel(p["x"], routing, p, mesh, axis, capacity_factor)
        else:
            y, _ = _per_shard(p["x"], routing, p, shards, capacity_factor)
        return jnp.sum(jnp.sin(y))

    grads, grads_ref = jax.jit(lambda p: (jax.grad(loss)(p, True), jax.grad(loss)(p, False)))(p)
    assert_allclose(grads, grads_ref, kind="gradient")
    assert float(jnp.abs(grads["router"]).max()) > 0


@pytest.mark.parametrize("router", ["top2", "blockffn"])
@pytest.mark.parametrize("mesh_name", ["1d-8", "2d-2x4"])
def test_ample_capacity_equals_dropless_layer(mesh_name, router):
    """``capacity_factor = E / k`` gives ``C = N / d``: no slot can drop; forward and gradients equal the
    dropless single-device layer over all N tokens."""
    mesh, axis = _mesh(mesh_name)
    p = _params(2)
    k = 2 if router == "top2" else E
    capacity_factor = E / k
    assert capacity(N // mesh.shape[axis], k, E, capacity_factor) == N // mesh.shape[axis]

    def layer(p, parallel):
        routing = _route(router, p["x"], p["router"])
        if parallel:
            return _expert_parallel(p["x"], routing, p, mesh, axis, capacity_factor)
        return moe_ffn(p["x"], routing, p["w_up"], p["w_down"], w_gate=p["w_gate"], capacity_factor=0.0)

    def loss(p, parallel):
        out = layer(p, parallel)
        return jnp.sum(jnp.sin(out[0])), out

    run = jax.value_and_grad(loss, has_aux=True)
    ((_, (y, stats)), grads), ((_, (y_ref, stats_ref)), grads_ref) = jax.jit(lambda p: (run(p, True), run(p, False)))(p)
    assert_allclose(y, y_ref, dtype=jnp.float32)
    assert int(stats.dropped) == 0
    np.testing.assert_array_equal(np.asarray(stats.expert_load), np.asarray(stats_ref.expert_load))
    assert_allclose(grads, grads_ref, kind="gradient")


def test_ungated_experts():
    mesh, axis = _mesh("1d-8")
    p = dict(_params(3), w_gate=None)

    @jax.jit
    def both(p):
        routing = _route("top2", p["x"], p["router"])
        return (_expert_parallel(p["x"], routing, p, mesh, axis, 1.5, activation="gelu"),
                _per_shard(p["x"], routing, p, 8, 1.5, activation="gelu"))

    (y, stats), (y_ref, stats_ref) = both(p)
    assert_allclose(y, y_ref, dtype=jnp.float32)
    assert int(stats.dropped) == int(stats_ref.dropped)


def test_exchanges_with_all_to_all():
    mesh, axis = _mesh("1d-8")
    p = _params(4)
    layer = jax.jit(lambda p: _expert_parallel(p["x"], _route("top2", p["x"], p["router"]), p, mesh, axis, 1.0))
    hlo = layer.lower(p).compile().as_text()
    assert hlo.count("all-to-all(") >= 2  # dispatch and return (XLA:CPU runs them as real collectives)


def _call(tokens=N, experts=E, capacity_factor=1.0, mesh_name="2d-2x4", axis_name=None, **shapes):
    """Calls the layer on zero host arrays of the given shapes: the checks read shapes only."""
    mesh, axis = _mesh(mesh_name)
    shapes = dict(w_up=(experts, M, F), w_gate=(experts, M, F), w_down=(experts, F, M)) | shapes
    w = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    routing = Routing(expert_index=np.zeros((tokens, 2), np.int32), expert_weight=np.ones((tokens, 2), np.float32),
                      router_probs=np.zeros((tokens, experts), np.float32),
                      router_logits=np.zeros((tokens, experts), np.float32))
    return expert_parallel_moe_ffn(np.zeros((tokens, M), np.float32), routing, w["w_up"], w["w_down"],
                                   w_gate=w["w_gate"], capacity_factor=capacity_factor, mesh=mesh,
                                   axis_name=axis if axis_name is None else axis_name)


def test_argument_errors():
    with pytest.raises(ValueError, match="axis_name 'experts' is not an axis"):
        _call(axis_name="experts")
    with pytest.raises(ValueError, match="w_down must be"):
        _call(w_down=(E, F, M - 1))
    with pytest.raises(ValueError, match="w_gate must be"):
        _call(w_gate=(E, M, F - 1))
    with pytest.raises(ValueError, match="w_up must be"):
        _call(w_up=(E // 2, M, F))
    with pytest.raises(ValueError, match=r"number of experts E = 6 .* size 4 of mesh axis axis_name='expert'"):
        _call(experts=6)
    with pytest.raises(ValueError, match=r"number of tokens N = 60 .* size 8 of mesh axis"):
        _call(tokens=60, mesh_name="1d-8")


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0])
def test_dropless_is_not_implemented(capacity_factor):
    with pytest.raises(NotImplementedError, match="ragged_all_to_all"):
        _call(capacity_factor=capacity_factor)
