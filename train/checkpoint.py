"""Orbax checkpoints of the train state, each carrying the model and train configs as JSON.

Layout under the run directory::

    checkpoints/<step>/state    params, other model variables, optimizer state, step
    checkpoints/<step>/config   {"model": ModelConfig.to_dict(), "train": TrainConfig.to_dict()}

Typed PRNG keys (in the model's RNG state) are saved as their raw ``uint32`` key data and wrapped
again on restore. Restoring places every array on the sharding of the target layout.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _to_saved(state):
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, state)


def _abstract_saved(abstract, shardings):
    """The restore target: saved shapes and dtypes, each with the sharding it will live on."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = shardings if shardings is not None else jax.tree.map(lambda _: default, abstract)

    def target(leaf, sharding):
        if _is_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree.map(target, abstract, shardings)


def _from_saved(saved, abstract):
    def restore(leaf, like):
        if _is_key(like):
            # The key dtype knows its implementation (threefry, rbg, ...); abstract leaves have no
            # public accessor for it, hence the dtype's attribute (None falls back to the default).
            return jax.random.wrap_key_data(leaf, impl=getattr(like.dtype, "_impl", None))
        return leaf

    return jax.tree.map(restore, saved, abstract)


class Checkpointer:
    """Saves and restores train states under ``<run_dir>/checkpoints`` (orbax ``CheckpointManager``).

    Args:
      run_dir: the run directory.
      keep: how many recent checkpoints to keep.
    """

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3):
        self.directory = os.path.abspath(os.path.join(os.fspath(run_dir), CHECKPOINT_DIR))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict, configs: dict) -> None:
        """Saves ``state`` (and ``configs``, JSON) as checkpoint ``step``; waits until it is on disk."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_to_saved(state)),
                                                         config=ocp.args.JsonSave(configs)), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract: dict, shardings: dict | None = None) -> dict:
        """The state saved at ``step``, laid out like ``abstract`` on ``shardings`` (None: one device)."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_saved(abstract, shardings))))
        return _from_saved(restored.state, abstract)

    def configs(self, step: int) -> dict:
        """The ``{"model": ..., "train": ...}`` JSON saved with checkpoint ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def latest_checkpoint_step(run_dir: str | os.PathLike) -> int | None:
    """The newest complete checkpoint step under ``run_dir``, read without creating anything."""
    directory = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    steps = [int(name) for name in os.listdir(directory)
             if name.isdigit() and os.path.isfile(os.path.join(directory, name, "_CHECKPOINT_METADATA"))]
    return max(steps, default=None)
