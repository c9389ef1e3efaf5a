"""Logical sharding rules on 8 fake CPU devices: specs per logical name, make_mesh, the shardings of a
small jaxsparse.nn model's state, a sharded jitted training step equal to the unsharded one, and
with_logical_constraint."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsparse import masks, nn
from jaxsparse.nn.parameters import logical_axes
from jaxsparse.parallel.sharding import (DEFAULT_RULES, MESH_AXES, logical_to_spec, make_mesh, shard_state,
                                         state_shardings, with_logical_constraint)
from jaxsparse.testing import assert_allclose

VOCAB, M, SEQ, BATCH = 51, 16, 16, 4  # 51: the vocabulary dim does not divide over tensor=2


@pytest.mark.parametrize("names, spec", [
    (("batch", "sequence", "embed"), P(("data", "fsdp"), "sequence", None)),  # fsdp taken by batch
    (("batch", "sequence", "heads", "head_dim"), P(("data", "fsdp"), "sequence", "tensor", None)),
    (("embed", "heads", "head_dim"), P("fsdp", "tensor", None)),
    (("embed", "kv_heads", "head_dim"), P("fsdp", "tensor", None)),
    (("heads", "head_dim", "embed"), P("tensor", None, "fsdp")),
    (("mlp", "embed"), P("tensor", "fsdp")),
    (("experts", "embed", "mlp"), P("expert", "fsdp", "tensor")),
    (("embed", "experts"), P("fsdp", "expert")),
    (("vocab", "embed"), P("tensor", "fsdp")),
    (("norm",), P(None)),
    (("batch", None), P(("data", "fsdp"), None)),
    ((), P()),
])
def test_default_rules(names, spec):
    assert logical_to_spec(names) == spec


def test_every_name_the_layers_use_has_a_rule():
    builders = [lambda rngs: nn.Attention(M, 4, num_kv_heads=2, rngs=rngs), lambda rngs: nn.SparkFFN(M, 32, rngs=rngs),
                lambda rngs: nn.SparseGatedFFN(M, 32, rule="none", rngs=rngs), lambda rngs: nn.MoE(M, 8, 4, rngs=rngs),
                lambda rngs: nn.BlockFFN(M, 8, 4, rngs=rngs)]
    used = set()
    for build in builders:
        layer = nnx.eval_shape(lambda: build(nnx.Rngs(0)))  # shapes and metadata only
        for variable in jax.tree.leaves(nnx.state(layer), is_leaf=lambda x: isinstance(x, nnx.Variable)):
            used.update(variable.get_metadata().get("out_sharding") or ())
    assert used == {"embed", "heads", "kv_heads", "head_dim", "mlp", "experts"}
    assert used < {name for name, _ in DEFAULT_RULES}
    targets = [(axes,) if isinstance(axes, str) else axes or () for _, axes in DEFAULT_RULES]
    assert {axis for axes in targets for axis in axes} <= set(MESH_AXES)


def test_logical_to_spec_options_and_errors():
    rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp", "tensor")), ("mlp", "tensor"))
    # A tuple rule keeps its unused axes; the second use of an axis is dropped.
    assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), "tensor")
    assert logical_to_spec(("mlp", "embed"), rules) == P("tensor", "fsdp")
    # Axes the mesh lacks are dropped; size-1 axes are kept.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(4, 1), ("data", "tensor"))
    assert logical_to_spec(("batch", "mlp"), rules, mesh) == P("data", "tensor")
    with pytest.raises(ValueError, match="logical axis 'layers' has no rule"):
        logical_to_spec(("layers", "embed"))
    with pytest.raises(ValueError, match="rules name the logical axis 'embed' twice"):
        logical_to_spec(("embed",), (("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ValueError, match="must map to a mesh axis name"):
        logical_to_spec(("embed",), (("embed", 3),))
    with pytest.raises(ValueError, match="pairs"):
        logical_to_spec(("embed",), ("embed",))
    with pytest.raises(TypeError, match="names must be a sequence"):
        logical_to_spec("embed")


def test_make_mesh():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(data=2, fsdp=2, sequence=1, tensor=2, expert=1)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert list(mesh.devices.flat) == jax.devices()
    assert dict(make_mesh(data=-1, tensor=2).shape)["data"] == 4
    assert dict(make_mesh(expert=-1).shape)["expert"] == 8
    assert dict(make_mesh(sequence=-1, devices=jax.devices()[:2]).shape)["sequence"] == 2


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"fsdp=2, sequence=1, tensor=1, expert=1 multiply to 4, but there are 8"):
        make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1, got data=-1 and tensor=-1"):
        make_mesh(data=-1, tensor=-1)
    with pytest.raises(ValueError, match="data=-1 cannot take the rest: the other axes multiply to 3"):
        make_mesh(data=-1, tensor=3)
    with pytest.raises(ValueError, match="fsdp must be a positive int or -1, got 0"):
        make_mesh(fsdp=0)
    with pytest.raises(ValueError, match="tensor must be a positive int or -1, got 2.0"):
        make_mesh(data=4, tensor=2.0)


class TinyLM(nnx.Module):
    """Embedding, RMS-normed causal attention and a Spark FFN, logits through the tied embedding."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, M, embedding_metadata=logical_axes(("vocab", "embed")), rngs=rngs)
        self.norm = nnx.Param(jnp.ones(M), **logical_axes(("norm",)))
        self.attention = nn.Attention(M, 4, num_kv_heads=2, mask=masks.causal(), rngs=rngs)
        self.ffn = nn.SparkFFN(M, 32, sparsity=0.5, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.full((), 0.5))  # no logical names: replicated

    def __call__(self, tokens):
        x = with_logical_constraint(self.embed(tokens), ("batch", "sequence", "embed"))
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.norm
        x = x + self.attention(normed)
        x = with_logical_constraint(x + self.ffn(x), ("batch", "sequence", "embed"))
        return self.embed.attend(x) * self.logit_scale


EXPECTED_SPECS = {  # path -> spec on the (data=2, fsdp=2, tensor=2) mesh
    "embed.embedding": P(None, "fsdp"),  # vocab 51 does not divide over tensor=2: replicated
    "norm": P(None),
    "attention.query.kernel": P("fsdp", "tensor", None),
    "attention.key.kernel": P("fsdp", "tensor", None),
    "attention.value.kernel": P("fsdp", "tensor", None),
    "attention.out.kernel": P("tensor", None, "fsdp"),
    "ffn.w_in": P("tensor", "fsdp"),
    "ffn.w_out": P("tensor", "fsdp"),
    "logit_scale": P(),
}


def _path(key_path):
    """``attention.query.kernel`` for the leaf of an nnx.State (dict keys, not the Variable's ``.value``)."""
    return ".".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def _specs(tree):
    return {_path(path): leaf for path, leaf in jax.tree.leaves_with_path(tree)}


def test_state_shardings_follow_the_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    _, params = nnx.split(TinyLM(nnx.Rngs(0)), nnx.Param)
    shardings = _specs(state_shardings(params, mesh))
    assert set(shardings) == set(EXPECTED_SPECS)
    for path, spec in EXPECTED_SPECS.items():
        assert shardings[path] == NamedSharding(mesh, spec), path
    placed = _specs(shard_state(params, mesh))
    for path, spec in EXPECTED_SPECS.items():
        assert placed[path].sharding.is_equivalent_to(NamedSharding(mesh, spec), placed[path].ndim), path
    # Where every dim divides, the rules agree with Flax's own mechanism.
    with nnx.logical_axis_rules(DEFAULT_RULES):
        flax_specs = _specs(nnx.get_partition_spec(params))
    for path in EXPECTED_SPECS:
        if path != "embed.embedding":
            assert flax_specs[path] == EXPECTED_SPECS[path], path


def test_arrays_and_unnamed_variables_are_replicated():
    mesh = make_mesh(fsdp=8)
    tree = {"array": jnp.ones((8, 8)), "variable": nnx.Param(jnp.ones((8, 8))), "rng": nnx.Rngs(0)()}
    shardings = state_shardings(tree, mesh)
    assert shardings["array"] == NamedSharding(mesh, P())
    assert shardings["rng"] == NamedSharding(mesh, P())
    assert jax.tree.leaves(shardings["variable"]) == [NamedSharding(mesh, P())]
    with pytest.raises(ValueError, match=r"one logical axis per dimension of shape \(8, 8\)"):
        state_shardings({"w": nnx.Param(jnp.ones((8, 8)), **logical_axes(("embed",)))}, mesh)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def _train_step(graphdef, params, tokens, learning_rate=0.5):
    loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), tokens))(params)
    return loss, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)


def test_sharded_training_step_equals_unsharded():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, params = nnx.split(TinyLM(nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ + 1), 0, VOCAB)

    loss_ref, params_ref = jax.jit(functools.partial(_train_step, graphdef))(params, tokens)

    shardings = state_shardings(params, mesh)
    tokens_sharding = NamedSharding(mesh, logical_to_spec(("batch", "sequence"), mesh=mesh))
    step = jax.jit(functools.partial(_train_step, graphdef), in_shardings=(shardings, tokens_sharding),
                   out_shardings=(NamedSharding(mesh, P()), shardings))
    with jax.set_mesh(mesh):
        loss, new_params = step(shard_state(params, mesh), jax.device_put(tokens, tokens_sharding))
        hlo = step.lower(params, tokens).compile().as_text()

    assert_allclose(loss, loss_ref, dtype=jnp.float32)
    assert_allclose(new_params, params_ref, kind="gradient")
    query, query_before = new_params["attention"]["query"]["kernel"][...], params["attention"]["query"]["kernel"][...]
    assert float(jnp.abs(query - query_before).max()) > 0
    for path, array in _specs(new_params).items():
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, EXPECTED_SPECS[path]), array.ndim), path
    assert "all-reduce" in hlo or "reduce-scatter" in hlo  # gradients are reduced across the data shards


def test_with_logical_constraint():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    x = jnp.arange(4 * 6 * 8, dtype=jnp.float32).reshape(4, 6, 8)
    names = ("batch", "sequence", "mlp")
    assert with_logical_constraint(x, names) is x  # no active mesh: unchanged
    with jax.set_mesh(mesh):
        assert with_logical_constraint(x, None) is x
        y = jax.jit(lambda x: with_logical_constraint(x * 2, names))(x)
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
        # 6 rows do not divide over data * fsdp = 4: that dim stays replicated.
        z = jax.jit(lambda x: with_logical_constraint(x, names))(x.transpose(1, 0, 2))
        assert z.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tensor")), 3)
        with pytest.raises(ValueError, match="one logical axis per dimension"):
            with_logical_constraint(x, ("batch", "mlp"))
