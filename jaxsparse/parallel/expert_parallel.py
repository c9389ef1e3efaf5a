"""Expert parallelism: the routed expert FFNs of an MoE layer with the experts sharded over a mesh axis.

Over a mesh axis of size ``d``, tokens are sharded (each device holds ``N / d`` tokens and their
routing) and experts are sharded (each device holds ``E / d`` experts' weights). One layer, inside
:func:`jax.shard_map`, on every device:

1. Build the GShard capacity buffers of the device's own ``N / d`` tokens exactly as the
   single-device capacity dispatch does (:func:`jaxsparse.moe.moe_ffn` with ``capacity_factor > 0``):
   ``[E, C, M]`` with ``C = capacity(N / d, k, E, capacity_factor)``; slots over capacity drop.
2. ``lax.all_to_all`` over the axis: ``[E, C, M] -> [d, E/d, C, M]``; block ``j`` goes to device
   ``j``, which owns experts ``j*E/d .. (j+1)*E/d - 1``, and the device receives, for each of its
   ``E/d`` local experts, the ``C`` rows of every device: ``[d, E/d, C, M]`` indexed by source.
3. Run the ``E/d`` local experts on their ``d * C`` rows each (one batched einsum per matmul).
4. The inverse ``lax.all_to_all`` returns every row to the device its token lives on: ``[E, C, M]``.
5. Combine with the routing weights (gather each kept slot's row, weight it, sum per token).

The result equals the single-device capacity dispatch run separately on every token shard (forward
and gradients, up to float reassociation): capacity is per device, so which slots drop depends on
the sharding. With a capacity factor large enough that nothing drops, it equals the dropless
single-device layer over all N tokens.

Communication per device per layer (forward): each ``all_to_all`` moves the whole buffer, ``E * C * M``
elements, of which the fraction ``(d - 1) / d`` leaves the device. Dispatch sends in ``x``'s dtype;
the return trip carries the experts' float32 outputs (as the single-device path combines in
float32), so the volume is ``2 * E * C * M * itemsize`` bytes for float32 activations and
``E * C * M * (itemsize + 4)`` for bfloat16 ones; the backward pass sends as much again. The
buffers are padded to ``C`` rows per (device, expert) whatever the load: with ``k`` slots per token
that is ``capacity_factor`` times the ``k * N / d`` rows actually routed.

``lax.ragged_all_to_all`` would send only the routed rows (no padding, no drops, a dropless expert
parallel layer) on GPU and TPU, but XLA:CPU does not implement it, so this padded path is the one
that runs, and is tested, everywhere; ``capacity_factor <= 0`` (dropless) is rejected here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsparse.moe.dispatch import capacity, capacity_buffers, check_moe_args, combine_buffers, dispatch_stats, expert_ffn
from jaxsparse.moe.routing import Routing
from jaxsparse.ops.activations import get_activation

__all__ = ["expert_parallel_moe_ffn"]


def expert_parallel_moe_ffn(x, routing: Routing, w_up, w_down, *, w_gate=None, activation="silu",
                            capacity_factor: float, mesh: jax.sharding.Mesh, axis_name: str):
    """Expert-parallel routed FFN over mesh axis ``axis_name`` (size ``d``) with ``jax.shard_map``.

    ``x`` and ``routing`` are sharded by tokens over the axis, the expert weights by experts. Each
    device builds capacity buffers for its ``N / d`` tokens exactly as the single-device capacity
    dispatch does, with ``C = capacity(N // d, k, E, capacity_factor)``, sends each expert's buffer
    to the device that owns the expert (``lax.all_to_all``, ``[E, C, M] -> [d, E/d, C, M]``), runs
    its ``E / d`` local experts on the ``d * C`` rows received for each, sends the results back with
    the inverse ``all_to_all``, and combines them with the routing weights. Other mesh axes are
    replicated over (every device along them computes the same thing).

    Equal (up to float reassociation) to ``moe_ffn(x_i, routing_i, ..., capacity_factor=...)`` on each
    token shard ``i`` separately, forward and backward.

    Args:
      x: ``[N, M]``, ``N % d == 0``.
      routing: a :class:`~jaxsparse.moe.Routing` for the N tokens (``expert_index`` /
        ``expert_weight`` ``[N, k]``, ``router_probs`` / ``router_logits`` ``[N, E]``).
      w_up: ``[E, M, F]``, ``E % d == 0``; w_down: ``[E, F, M]``; w_gate: ``[E, M, F]`` or None.
      activation: name or callable (``"silu"`` for SwiGLU experts).
      capacity_factor: > 0; each expert takes at most ``C`` slots from each device.
      mesh: a :class:`jax.sharding.Mesh` with ``axis_name`` among its axes.
      axis_name: the mesh axis that shards tokens and experts.

    Returns:
      ``(y [N, M] in x's dtype, sharded like x, DispatchStats summed over the devices of the axis)``;
      ``expert_load`` ``[E]`` counts routed slots before drops, ``dropped`` the slots over capacity.

    Raises:
      ValueError: ``axis_name`` not in ``mesh.axis_names``; ``E`` or ``N`` not divisible by the axis
        size; weight shapes that do not match ``x`` and ``routing``.
      NotImplementedError: ``capacity_factor <= 0`` (dropless).
    """
    x = jnp.asarray(x)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; mesh.axis_names = {mesh.axis_names}")
    check_moe_args(x, routing, w_gate, w_up, w_down)
    if not capacity_factor > 0:
        raise NotImplementedError(
            f"capacity_factor={capacity_factor!r}: dropless (capacity_factor <= 0) expert parallelism is not supported; "
            "the padded all_to_all needs a fixed capacity per expert, and lax.ragged_all_to_all (which would send "
            "variable-size groups) is unimplemented on XLA:CPU. Use capacity_factor > 0 (e.g. a large one so that "
            "nothing drops).")
    devices = mesh.shape[axis_name]
    tokens, k = routing.expert_index.shape
    experts = routing.num_experts
    if experts % devices:
        raise ValueError(f"the number of experts E = {experts} (w_up.shape[0]) must be divisible by the size "
                         f"{devices} of mesh axis axis_name={axis_name!r}")
    if tokens % devices:
        raise ValueError(f"the number of tokens N = {tokens} (x.shape[0]) must be divisible by the size "
                         f"{devices} of mesh axis axis_name={axis_name!r}")
    slots_per_expert = capacity(tokens // devices, k, experts, capacity_factor)
    act = get_activation(activation)

    def local(x, routing, w_gate, w_up, w_down):
        # x [N/d, M], routing for those tokens, weights [E/d, ...]: this device's share.
        buffer, plan = capacity_buffers(x, routing, slots_per_expert)  # [E, C, M]
        sent = buffer.reshape(devices, experts // devices, slots_per_expert, x.shape[1])
        received = lax.all_to_all(sent, axis_name, split_axis=0, concat_axis=0)  # [d (source), E/d, C, M]
        rows = received.transpose(1, 0, 2, 3).reshape(experts // devices, devices * slots_per_expert, x.shape[1])
        out = expert_ffn(rows, w_gate, w_up, w_down, act)  # float32 [E/d, d*C, M]
        out = out.reshape(experts // devices, devices, slots_per_expert, x.shape[1]).transpose(1, 0, 2, 3)
        returned = lax.all_to_all(out, axis_name, split_axis=0, concat_axis=0)  # [d (expert owner), E/d, C, M]
        y = combine_buffers(returned.reshape(experts, slots_per_expert, x.shape[1]), plan, x.shape[0], x.dtype)
        stats = dispatch_stats(routing, plan.dropped)
        return y, jax.tree.map(lambda s: lax.psum(s, axis_name), stats)

    tokens_spec, experts_spec = P(axis_name), P(axis_name)
    gate_spec = None if w_gate is None else experts_spec
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens_spec, tokens_spec, gate_spec, experts_spec, experts_spec),
        out_specs=(tokens_spec, P()),
        check_vma=True,
    )
    return sharded(x, routing, w_gate, w_up, w_down)
