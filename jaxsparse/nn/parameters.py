"""What the layers share when they build themselves: checked sizes and named parameters."""

from __future__ import annotations

import jax
from flax import nnx


def logical_axes(names: tuple[str, ...]) -> dict:
    """Variable metadata naming a parameter's logical axes without sharding it at creation."""
    return {"out_sharding": names, "eager_sharding": False}


def scaled_normal(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype, names: tuple[str, ...]) -> nnx.Param:
    """A parameter drawn from a normal with std ``fan_in ** -0.5``, named for sharding rules."""
    value = jax.random.normal(rngs.params(), shape, dtype) * fan_in**-0.5
    return nnx.Param(value, **logical_axes(names))


def check_positive_int(name: str, value) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a positive int (bool excluded)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_number(name: str, value) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a positive int or float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
