"""Logical axis names and the rules that map them to mesh axes, for jit (GSPMD) training on any mesh.

Layers name the axes of their parameters with *logical* names (``jaxsparse.nn`` stores them in each
``nnx.Variable``'s ``out_sharding`` metadata); models name activation axes the same way. Rules map
each logical name to mesh axes, so one model runs unchanged on a laptop, a GPU node or a pod slice.

Logical names:

============  ==========================================================  ==================
name          what it indexes                                             default mesh axes
============  ==========================================================  ==================
batch         sequences of a batch (activations)                          ``("data", "fsdp")``
sequence      token positions (activations)                               ``"sequence"``
embed         the model width ``M`` (weights and activations)             ``"fsdp"``
heads         query heads ``H``                                           ``"tensor"``
kv_heads      key/value heads ``K``                                       ``"tensor"``
head_dim      the head width ``D``                                        replicated
mlp           FFN neurons ``F`` (dense, sparse and expert FFNs)           ``"tensor"``
vocab         the vocabulary (embedding and output tables)                ``"tensor"``
experts       MoE experts ``E``                                           ``"expert"``
norm          normalisation scales and biases                             replicated
============  ==========================================================  ==================

Why these defaults: the weights' ``embed`` dim is sharded over ``fsdp`` (ZeRO-3 / FSDP: each weight
is stored in ``1 / fsdp`` pieces and all-gathered just before use), while activations are split by
batch over both ``data`` and ``fsdp`` (both axes are data parallel for activations; ``data`` alone
replicates the weights). Heads, kv heads, FFN neurons and the vocabulary are Megatron-style tensor
parallel over ``tensor``; experts live on ``expert`` (see :func:`expert_parallel_moe_ffn`); the
``sequence`` axis splits token positions (Ulysses or ring attention inside the layer).

Resolution of one array's names (:func:`logical_to_spec`): each name maps to its rule's mesh axes, in
order; a mesh axis that an earlier dimension already uses is dropped from later ones (so the ``embed``
of an activation ``("batch", "sequence", "embed")`` stays replicated: ``batch`` took ``fsdp``), as
Flax linen's logical partitioning does. :func:`state_shardings` and :func:`with_logical_constraint`
then replicate any dimension whose size is not divisible by the product of its mesh axes.

The rules format is Flax's (``(logical name, mesh axes)`` pairs), so ``DEFAULT_RULES`` can also be
given to ``nnx.logical_axis_rules``; this module does not import Flax (the layering keeps Flax in
``jaxsparse.nn``) and treats ``nnx.Variable`` by duck typing (``get_metadata()`` and ``replace()``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "logical_to_spec",
    "make_mesh",
    "shard_state",
    "state_shardings",
    "with_logical_constraint",
]

MESH_AXES = ("data", "fsdp", "sequence", "tensor", "expert")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("sequence", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("experts", "expert"),
    ("norm", None),
)


def make_mesh(*, data: int = 1, fsdp: int = 1, sequence: int = 1, tensor: int = 1, expert: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A mesh with the five axes of :data:`MESH_AXES`, all of ``Auto`` type (sharding by GSPMD).

    Devices are laid out in the order given (``jax.devices()``: grouped by process), ``data``
    outermost and ``expert`` innermost, so on several hosts the outer axes are the ones that cross
    host boundaries (data parallelism needs the least bandwidth); keep ``tensor`` within a host.

    Args:
      data, fsdp, sequence, tensor, expert: the axis sizes, positive ints; at most one may be -1 to
        take all the devices the others leave.
      devices: the devices to use; default ``jax.devices()`` (every device of every process).

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``(data, fsdp, sequence, tensor, expert)``.

    Raises:
      ValueError: a size that is neither a positive int nor -1 (named), more than one -1, or sizes
        whose product is not the number of devices.

    Example::

        mesh = make_mesh(fsdp=-1, tensor=2)   # on 8 devices: data=1, fsdp=4, tensor=2
    """
    sizes = dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor, expert=expert)
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size <= 0 and size != -1):
            raise ValueError(f"{name} must be a positive int or -1, got {size!r}")
    devices = jax.devices() if devices is None else list(devices)
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {' and '.join(f'{name}=-1' for name in inferred)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if len(devices) % known:
            raise ValueError(f"{inferred[0]}=-1 cannot take the rest: the other axes multiply to {known}, "
                             f"which does not divide the {len(devices)} devices")
        sizes[inferred[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        given = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"mesh axes {given} multiply to {math.prod(sizes.values())}, but there are "
                         f"{len(devices)} devices; pass -1 for one axis to use them all")
    grid = np.array(devices, dtype=object).reshape(tuple(sizes.values()))
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], rules: Rules = DEFAULT_RULES, mesh=None) -> P:
    """The :class:`~jax.sharding.PartitionSpec` that ``rules`` give an array with these logical axes.

    A mesh axis used by an earlier dimension is dropped from later ones (the first dimension keeps
    it); a name that maps to several mesh axes keeps the unused ones, in the rule's order.

    Args:
      names: one logical name (or None: replicated) per array dimension.
      rules: ``(logical name, mesh axis | tuple of mesh axes | None)`` pairs, each name at most once.
      mesh: optional :class:`~jax.sharding.Mesh` (or ``AbstractMesh``): mesh axes it lacks are
        dropped, so rules written for :data:`MESH_AXES` fit smaller meshes. Axes of size 1 are kept.

    Returns:
      A PartitionSpec with one entry per name: None, a mesh axis name, or a tuple of them.

    Raises:
      ValueError: a name without a rule (add ``(name, None)`` to replicate it), malformed rules.
      TypeError: ``names`` is not a sequence of str or None.

    Example::

        logical_to_spec(("batch", "sequence", "embed"))   # P(("data", "fsdp"), "sequence", None)
    """
    table = _rule_table(rules)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a sequence of logical axis names (str or None), got {names!r}")
    available = None if mesh is None else set(mesh.axis_names)
    used: set[str] = set()
    entries = []
    for name in names:
        if name is None:
            entries.append(None)
            continue
        if not isinstance(name, str):
            raise TypeError(f"names must hold str or None, got {name!r} in {names!r}")
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules name {sorted(table)}; "
                             f"add ({name!r}, None) to replicate it")
        axes = tuple(axis for axis in table[name] if axis not in used and (available is None or axis in available))
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """A :class:`~jax.sharding.NamedSharding` per array of ``state``, from its logical axis names.

    Variables whose metadata has ``out_sharding`` (the logical names ``jaxsparse.nn`` gives its
    parameters) get the spec of :func:`logical_to_spec`; other variables and bare arrays are
    replicated. A dimension whose size is not divisible by the product of its mesh axes falls back
    to replicated (for that dimension only), so odd sizes (a vocabulary of 50257) still shard the
    other dimensions.

    Args:
      state: an ``nnx.State`` (from ``nnx.split`` or ``nnx.state``) or any pytree of
        ``nnx.Variable`` objects and arrays.
      mesh: the mesh to shard over.
      rules: as :func:`logical_to_spec`.

    Returns:
      A pytree of the same structure (variables are kept, each holding its sharding in place of its
      value, as ``nnx.get_named_sharding`` returns), usable as ``in_shardings`` / ``out_shardings``
      of :func:`jax.jit`, with :func:`jax.device_put`, or leaf by leaf with ``jax.tree.map``.

    Raises:
      ValueError: a variable whose number of logical names differs from its rank, a name without a
        rule.
    """

    def sharding(leaf):
        if _is_variable(leaf):
            (value,) = jax.tree.leaves(leaf)
            names = leaf.get_metadata().get("out_sharding")
            spec = P() if not names else _spec_for_shape(names, np.shape(value), rules, mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def shard_state(state, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """``state`` placed on ``mesh`` with the shardings of :func:`state_shardings` (``jax.device_put``).

    Every process must call it with the same (replicated) values; for states too large for one host,
    create them sharded instead: ``jax.jit(init, out_shardings=state_shardings(abstract, mesh))``
    with ``abstract = nnx.eval_shape(...)``.
    """
    return jax.device_put(state, state_shardings(state, mesh, rules))


def with_logical_constraint(x, names: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES):
    """``jax.lax.with_sharding_constraint`` of ``x`` by logical names, under the active mesh.

    The mesh is the one set with ``jax.set_mesh(mesh)`` (inside or around :func:`jax.jit`). Without
    an active mesh, or with ``names=None``, ``x`` is returned unchanged, so layers can annotate their
    activations and still run on one device. Dimensions not divisible by their mesh axes are left
    replicated, as in :func:`state_shardings`.

    Args:
      x: an array ``[...]``.
      names: one logical name (or None) per dimension of ``x``, or None.
      rules: as :func:`logical_to_spec`.

    Returns:
      ``x``, constrained to the sharding the rules give (same values).

    Raises:
      ValueError: ``len(names) != x.ndim``, a name without a rule.

    Example::

        h = with_logical_constraint(h, ("batch", "sequence", "embed"))
    """
    if names is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _spec_for_shape(names, np.shape(x), rules, mesh))


def _is_variable(x: Any) -> bool:
    """An ``nnx.Variable`` (duck-typed: metadata and a value to replace)."""
    return callable(getattr(x, "get_metadata", None)) and callable(getattr(x, "replace", None))


def _spec_for_shape(names, shape: tuple[int, ...], rules: Rules, mesh) -> P:
    """:func:`logical_to_spec` on ``mesh``, replicating dimensions its axes do not divide."""
    if isinstance(names, str) or len(names) != len(shape):
        raise ValueError(f"names {names!r} must give one logical axis per dimension of shape {tuple(shape)}")
    spec = logical_to_spec(names, rules, mesh)
    entries = []
    for size, entry in zip(shape, spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        entries.append(entry if size % math.prod(mesh.shape[axis] for axis in axes) == 0 else None)
    return P(*entries)


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    """``rules`` as ``{logical name: tuple of mesh axes}``, after checking their form."""
    table = {}
    for rule in rules:
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"rules must be (logical name, mesh axes) pairs, got {rule!r}")
        name, axes = rule
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if not isinstance(axes, tuple) or not all(isinstance(axis, str) for axis in axes):
            raise ValueError(f"rules: {name!r} must map to a mesh axis name, a tuple of them or None, got {rule[1]!r}")
        if name in table:
            raise ValueError(f"rules name the logical axis {name!r} twice")
        table[name] = axes
    return table
