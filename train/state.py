"""Building the train state (model, optimizer, step) directly in place: sharded over a mesh or on one device.

The model is first traced abstractly (``nnx.eval_shape``): its parameters' logical axis names give
their shardings through ``jaxsparse.parallel.sharding.state_shardings``, the optimizer moments take
the shardings of their parameters, everything else is replicated, and then one jitted initialiser
creates every array where it belongs (no full copy on one device first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec


@dataclasses.dataclass
class StateLayout:
    """What a train state looks like before it exists.

    Attributes:
      graphdef: the model's ``nnx.GraphDef`` (the static part).
      abstract: the train state's ``jax.ShapeDtypeStruct`` tree.
      shardings: the train state's sharding tree (None when there is no mesh).
      batch_sharding: the token batch's sharding (None when there is no mesh).
      init: ``init() -> state``, jitted, placing each array on its sharding.
      parameter_count: the model's parameter count.
    """

    graphdef: nnx.GraphDef
    abstract: dict
    shardings: dict | None
    batch_sharding: NamedSharding | None
    init: Callable[[], dict]
    parameter_count: int


def _pure_state(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def state_layout(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh=None) -> StateLayout:
    """The :class:`StateLayout` of ``make_model()`` trained with ``tx``, sharded over ``mesh``.

    Args:
      make_model: builds the model (called abstractly once, then inside the jitted initialiser).
      tx: the optimizer.
      mesh: a ``jax.sharding.Mesh`` with the ``make_mesh`` axis names, or None (one device).
    """
    abstract_model = nnx.eval_shape(make_model)
    graphdef, param_variables, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init():
        _, params, rest = _pure_state(make_model())
        return {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract = jax.eval_shape(init)
    parameter_count = sum(leaf.size for leaf in jax.tree.leaves(abstract["params"]))
    if mesh is None:
        return StateLayout(graphdef, abstract, None, None, jax.jit(init), parameter_count)
    shardings = _shardings(param_variables, abstract, tx, mesh)
    return StateLayout(graphdef, abstract, shardings, batch_sharding(mesh), jax.jit(init, out_shardings=shardings),
                       parameter_count)


def batch_sharding(mesh) -> NamedSharding:
    """Token batches ``[B, T]``: B split over the rules' ``batch`` axes (``data`` and ``fsdp``)."""
    from jaxsparse.parallel.sharding import DEFAULT_RULES, logical_to_spec  # noqa: PLC0415

    return NamedSharding(mesh, logical_to_spec(("batch", None), DEFAULT_RULES, mesh))


def _shardings(param_variables, abstract, tx, mesh) -> dict:
    from jaxsparse.parallel.sharding import DEFAULT_RULES, state_shardings  # noqa: PLC0415

    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = state_shardings(param_variables, mesh, DEFAULT_RULES)
    # Normalise to the structure of the pure params (leaves may come wrapped in Variables).
    param_shardings = jax.tree.unflatten(
        jax.tree.structure(abstract["params"]),
        jax.tree.leaves(param_shardings, is_leaf=lambda leaf: isinstance(leaf, jax.sharding.Sharding)))
    opt_shardings = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract["opt_state"], param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda leaf: isinstance(leaf, jax.sharding.Sharding))
    return {
        "params": param_shardings,
        "rest": jax.tree.map(lambda _: replicated, abstract["rest"]),
        "opt_state": opt_shardings,
        "step": replicated,
    }
