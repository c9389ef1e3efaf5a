"""The jitted training and evaluation steps over a pure train state.

The train state is a dict of arrays (what :mod:`train.checkpoint` saves):

- ``params``: the model's ``nnx.Param`` values (an ``nnx.State`` of arrays),
- ``rest``: every other model variable (RNG state, router biases, ...), updated by the forward,
- ``opt_state``: the optax state,
- ``step``: int32, optimizer steps taken.

The objective is the mean next-token cross entropy plus the model's (already weighted) auxiliary
loss; the reported ``loss`` is the cross entropy alone, so sparse and dense runs compare directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def forward(graphdef, params, rest, tokens):
    """``(cross entropy, aux_loss, model metrics, updated rest)`` on int ``[B, T + 1]`` windows."""
    model = nnx.merge(graphdef, params, rest)
    out = model(tokens[:, :-1])
    logits = out.logits.astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    _, new_rest = nnx.state(model, nnx.Param, ...)
    return cross_entropy, jnp.asarray(out.aux_loss, jnp.float32), dict(out.metrics), nnx.as_pure(new_rest)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, state_shardings=None,
                    batch_sharding=None):
    """A jitted ``step(state, tokens) -> (state, metrics)`` that takes one AdamW step.

    Args:
      graphdef: the model's ``nnx.GraphDef``.
      tx: the optimizer (:func:`train.optimizer.make_optimizer`).
      schedule: the learning-rate schedule, for the ``lr`` metric.
      state_shardings: the train state's shardings (None: wherever the inputs are).
      batch_sharding: the token batch's sharding.

    Returns:
      The jitted step; the input state is donated. ``metrics`` holds float32 scalars ``loss``
      (cross entropy), ``aux_loss``, ``grad_norm``, ``lr`` and the model's metrics.
    """

    def step(state, tokens):
        def objective(params):
            cross_entropy, aux_loss, metrics, rest = forward(graphdef, params, state["rest"], tokens)
            return cross_entropy + aux_loss, (cross_entropy, aux_loss, metrics, rest)

        (_, (cross_entropy, aux_loss, metrics, rest)), grads = jax.value_and_grad(objective, has_aux=True)(
            state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}
        out = {"loss": cross_entropy, "aux_loss": aux_loss, "grad_norm": optax.tree.norm(grads),
               "lr": jnp.asarray(schedule(state["step"]), jnp.float32)}
        out.update({name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()})
        return new_state, out

    if state_shardings is None:
        return jax.jit(step, donate_argnums=0)
    return _under_mesh(jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                               out_shardings=(state_shardings, None), donate_argnums=0), batch_sharding.mesh)


def make_eval_step(graphdef, *, state_shardings=None, batch_sharding=None):
    """A jitted ``eval_step(state, tokens) -> metrics`` (``loss`` = cross entropy, plus model metrics)."""

    def eval_step(state, tokens):
        cross_entropy, aux_loss, metrics, _ = forward(graphdef, state["params"], state["rest"], tokens)
        out = {"loss": cross_entropy, "aux_loss": aux_loss}
        out.update({name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()})
        return out

    if state_shardings is None:
        return jax.jit(eval_step)
    return _under_mesh(jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding)), batch_sharding.mesh)


def _under_mesh(step, mesh):
    """``step`` traced and run with ``mesh`` active (``jax.set_mesh``), so that the model's activation
    constraints and sequence-parallel attention see it."""

    def run(*args):
        with jax.set_mesh(mesh):
            return step(*args)

    return run
