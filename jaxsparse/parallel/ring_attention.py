"""Sequence-parallel ring attention over ``jax.shard_map``, sparsity-aware, with a ring backward pass.

The sequence axis of q, k and v is sharded over a mesh axis of ``n`` devices in a
:class:`~jaxsparse.parallel.layouts.SequenceLayout` order. At ring step ``s`` device ``i`` holds the
keys and values of shard ``(i - s) mod n``, attends its own queries to them with the block-sparse
attention of :mod:`jaxsparse.ops.attention`, and merges the partial result into its output by
log-sum-exp; between steps the keys and values move one device on (``lax.ppermute``). The schedule
(:mod:`jaxsparse.parallel.ring_plan`) skips pairs of shards with no visible block and ends the ring
after the last step any device needs.

The backward pass is a second ring: keys and values travel again, together with float32 dK / dV
accumulators that collect every device's contribution to their shard and are sent home at the end;
dQ accumulates on its own device. Only the local q, k, v, output and logsumexp are saved.

Papers: Ring Attention (Liu, Zaharia, Abbeel 2023); load balancing by zigzag (ring-flash-attention,
Llama 3 context parallelism) and striping (Striped Attention, Brandon et al. 2023).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsparse.masks.base import Mask
from jaxsparse.masks.structured import full
from jaxsparse.ops.attention.checks import check_positive, check_qkv
from jaxsparse.ops.attention.config import BlockSizes
from jaxsparse.parallel.layouts import KINDS, SequenceLayout
from jaxsparse.parallel.pair_attention import PairAttention, from_internal, merge_partials, pair_attention, to_internal
from jaxsparse.parallel.ring_plan import (RingMetadata, RingPlan, build_schedule, default_block_sizes,
                                          pair_block_mask, pair_is_computed, ring_plan)

__all__ = ["RingPlan", "ring_attention", "ring_plan"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RingSetup:
    """Everything static about one ring call (shared by the ring variants).

    Attributes:
      mesh, axis_name: where the ring runs.
      plan: the schedule.
      pair: the implementation's per-pair functions.
      scale, softcap: the logit scale and optional soft-cap.
    """

    mesh: jax.sharding.Mesh
    axis_name: str
    plan: RingPlan
    pair: PairAttention
    scale: float
    softcap: float | None

    @property
    def q_padded_len(self) -> int:
        """The shard length rounded up to whole q blocks."""
        return -(-self.plan.shard_len // self.plan.block_q) * self.plan.block_q

    @property
    def kv_padded_len(self) -> int:
        """The shard length rounded up to whole kv blocks."""
        return -(-self.plan.shard_len // self.plan.block_kv) * self.plan.block_kv

    def rotate(self, x, shift: int):
        """Sends ``x`` (a pytree) from every device ``d`` to device ``(d + shift) mod n``."""
        n = self.plan.num_shards
        return lax.ppermute(x, self.axis_name, [(d, (d + shift) % n) for d in range(n)])

    def shard_map(self, local, in_specs, out_specs):
        """``jax.shard_map`` over the mesh, without the varying-axes check: the attention backends
        start their scans from fresh (unvarying) accumulators, which the check would reject."""
        return jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def prepare_ring(q, k, v, mask, *, mesh, axis_name, layout, scale, softcap, block_sizes, implementation,
                 rotate) -> tuple[RingSetup, RingMetadata, Mask]:
    """Checks the arguments of a ring attention and plans it.

    Returns:
      ``(setup, stacked block lists, mask)`` (``mask`` is ``full()`` when None was given).
    """
    batch, q_len, heads, head_dim = check_qkv(q, k, v)
    if k.shape[1] != q_len:
        raise ValueError(f"ring attention is self-attention: k and v need S == T, got S={k.shape[1]} (k.shape[1]) "
                         f"and T={q_len} (q.shape[1])")
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh; mesh.axis_names = {mesh.axis_names}")
    num_shards = mesh.shape[axis_name]
    if isinstance(layout, str):
        if layout not in KINDS:
            raise ValueError(f"layout must be one of {KINDS} or a SequenceLayout, got {layout!r}")
        layout = SequenceLayout(kind=layout, num_shards=num_shards)
    elif not isinstance(layout, SequenceLayout):
        raise TypeError(f"layout must be a str or a SequenceLayout, got {type(layout).__name__}")
    if layout.num_shards != num_shards:
        raise ValueError(f"layout has num_shards={layout.num_shards}, but mesh axis axis_name={axis_name!r} has "
                         f"size {num_shards}")
    try:
        layout.check_seq_len(q_len)
    except ValueError as error:
        raise ValueError(f"the sequence length T = q.shape[1] does not fit the ring: {error}") from error
    if mask is None:
        mask = full()
    pair = pair_attention(implementation)
    scale = check_positive("scale", scale, default=head_dim**-0.5)
    softcap = check_positive("softcap", softcap, default=None)
    block_sizes = default_block_sizes(block_sizes, layout.shard_len(q_len))
    plan, metadata = build_schedule(mask, layout=layout, seq_len=q_len, block_sizes=block_sizes, batch=batch,
                                    heads=heads, rotate=rotate)
    setup = RingSetup(mesh=mesh, axis_name=axis_name, plan=plan, pair=pair, scale=scale, softcap=softcap)
    return setup, metadata, mask


def when(flag, compute, skip, operand):
    """``compute(operand)`` if ``flag`` else ``skip(operand)``; no ``lax.cond`` when ``flag`` is python True."""
    if flag is True:
        return compute(operand)
    return lax.cond(flag, compute, skip, operand)


def ring_attention(q, k, v, mask: Mask | None = None, *, mesh: jax.sharding.Mesh, axis_name: str,
                   layout: str | SequenceLayout = "zigzag", scale: float | None = None, softcap: float | None = None,
                   block_sizes: BlockSizes | None = None, implementation: str | None = None):
    """Sequence-parallel block-sparse self-attention on a ring of devices (keys and values travel).

    Computes, for the global sequences, exactly what ``jaxsparse.attention(q, k, v, mask)`` computes
    on one device: ``out[b, t, h] = sum_s softmax_s(cap(scale * q[b,t,h] . k[b,s,h//G]))[s] *
    v[b,s,h//G]`` over the keys the mask lets query ``t`` see. The arrays are in layout order: call
    ``layout.permute(x, axis=1)`` once on the token axis at the model input and
    ``layout.unpermute(out, axis=1)`` at its output; ``mask`` stays defined on natural positions and
    follows the permutation internally (the pair of q shard ``a`` and kv shard ``b`` uses
    ``mask(b, h, positions[a][t], positions[b][s])``).

    Schedule (static when the mask has no traced data, see :func:`ring_plan`): a device skips
    (``lax.cond``) a pair of shards without a visible block, and the ring stops after the last step
    any device needs: ``causal() & sliding_window(w)`` with ``w <= T / n`` under the contiguous
    layout needs steps 0 and 1, one ``ppermute`` of k and v instead of ``n - 1``. The steps run in
    a ``lax.scan``, each step's ``ppermute`` issued before its compute so that the two can overlap.
    A mask with traced arrays (``document(segment_ids)`` with ids computed inside ``jit``) runs
    every step and skips empty pairs at run time from the block counts. Load balance under causal
    masks: ``"zigzag"`` and ``"striped"`` give every device the same work; ``"contiguous"`` gives
    the last device close to twice the mean (1.85x at ``n = 8``).

    Gradients (``jax.custom_vjp``): a ring backward pass rotates k and v with float32 dK / dV
    accumulators (sent home after the last step that runs); dQ accumulates locally; each pair runs
    the implementation's backward with the ring's merged logsumexp and ``delta = rowsum(dO * O)``.
    Residuals: the local q, k, v, output and logsumexp.

    Cost: the steps run in one ``lax.scan``, so every pair's block list is padded to the widest
    pair's; ``"xla"`` processes that many tiles per computed pair (masked past the pair's own count).
    Communication per device (forward): ``rotations * 2 * B * (T/n) * K * D * itemsize`` bytes
    (:meth:`RingPlan.bytes_sent_per_device`).

    Args:
      q: queries ``[B, T, H, D]`` in layout order, sharded (or shardable) over ``axis_name`` on the
        token axis; ``T`` a multiple of ``n x layout.chunks_per_shard``.
      k: keys ``[B, S, K, D]`` with ``S == T`` and ``H % K == 0``, in layout order.
      v: values ``[B, S, K, D]``, same dtype as q and k.
      mask: a :class:`~jaxsparse.masks.Mask` on natural positions, or None (full attention).
      mesh: a :class:`jax.sharding.Mesh` (other axes than ``axis_name`` replicate the computation).
      axis_name: the mesh axis of the ring (size ``n``).
      layout: ``"zigzag"`` (default), ``"contiguous"``, ``"striped"``, or a :class:`SequenceLayout`
        with ``num_shards == n``.
      scale: multiplies ``q . k``; default ``D ** -0.5``.
      softcap: optional positive tanh soft-cap of the logits.
      block_sizes: tiles of the per-pair block-sparse attention (default: the local op's default
        for ``T / n`` tokens). Blocks dividing the layout's runs (``T / n`` contiguous, ``T / 2n``
        zigzag) classify the mask on the natural block grid; others evaluate it per element.
      implementation: ``"xla"`` (default) or ``"reference"`` (dense per pair, for tests).

    Returns:
      ``out [B, T, H, D]`` in q's dtype, layout order, sharded over ``axis_name``.

    Raises:
      ValueError: wrong ranks or shapes (as :func:`jaxsparse.attention`), ``S != T``, ``axis_name``
        not in ``mesh.axis_names``, ``T`` not a multiple of ``n x chunks_per_shard``, a layout with
        another ``num_shards``, an unknown layout or implementation, non-positive scale or softcap.
      TypeError: mismatched dtypes, a mask that is not a Mask (a BlockMask cannot follow the layout).
      NotImplementedError: ``"pallas_tpu"`` / ``"pallas_gpu"`` (their adapters do not expose the
        separate forward and backward the ring needs).
    """
    setup, metadata, mask = prepare_ring(q, k, v, mask, mesh=mesh, axis_name=axis_name, layout=layout, scale=scale,
                                         softcap=softcap, block_sizes=block_sizes, implementation=implementation,
                                         rotate="kv")

    @jax.custom_vjp
    def ring(q, k, v, metadata, mask):
        return _sharded_forward(setup, q, k, v, metadata, mask)[0]

    def ring_forward(q, k, v, metadata, mask):
        out, lse = _sharded_forward(setup, q, k, v, metadata, mask)
        return out, (q, k, v, out, lse, metadata, mask)

    def ring_backward(residuals, d_out):
        q, k, v, out, lse, metadata, mask = residuals
        dq, dk, dv = _sharded_backward(setup, q, k, v, out, lse, d_out, metadata, mask)
        return dq, dk, dv, None, None

    ring.defvjp(ring_forward, ring_backward)
    return ring(q, k, v, metadata, mask)


def _sharded_forward(setup: RingSetup, q, k, v, metadata, mask):
    """``(out [B, T, H, D], lse float32 [B, H, T])``, both sharded over the ring axis."""
    tokens = P(None, setup.axis_name)
    local = setup.shard_map(lambda *args: _local_forward(setup, *args), in_specs=(tokens, tokens, tokens, P(), P()),
                            out_specs=(tokens, P(None, None, setup.axis_name)))
    return local(q, k, v, metadata, mask)


def _local_forward(setup: RingSetup, q, k, v, metadata: RingMetadata, mask: Mask):
    """One device: q ``[B, c, H, D]``, k and v ``[B, c, K, D]``; returns its ``out`` and ``lse [B, H, c]``."""
    plan, shard_len = setup.plan, q.shape[1]
    device = lax.axis_index(setup.axis_name)
    q = to_internal(q, setup.q_padded_len)
    k, v = (to_internal(x, setup.kv_padded_len) for x in (k, v))

    def attend(step, k, v, acc):
        """Merges the pair of ring ``step`` (kv shard ``device - step``) into ``acc = (out, lse)``."""
        block_mask = pair_block_mask(metadata, step, device, mask, plan)

        def compute(acc):
            pair_out, pair_lse = setup.pair.forward(q, k, v, block_mask, scale=setup.scale, softcap=setup.softcap)
            return merge_partials(*acc, pair_out, pair_lse)

        return when(pair_is_computed(metadata, step, device), compute, lambda acc: acc, acc)

    def ring_step(carry, step):
        k, v, acc = carry
        travelled = setup.rotate((k, v), 1)  # issued before the compute: the transfer can overlap it
        return (*travelled, attend(step, k, v, acc)), None

    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
    if plan.steps > 1:
        (k, v, acc), _ = lax.scan(ring_step, (k, v, acc), jnp.arange(plan.steps - 1))
    if plan.steps:
        acc = attend(plan.steps - 1, k, v, acc)  # the last step: nothing to send on
    out, lse = acc
    return from_internal(out.astype(q.dtype), shard_len), lse[:, :, :shard_len]


def _sharded_backward(setup: RingSetup, q, k, v, out, lse, d_out, metadata, mask):
    tokens = P(None, setup.axis_name)
    local = setup.shard_map(lambda *args: _local_backward(setup, *args),
                            in_specs=(tokens, tokens, tokens, tokens, P(None, None, setup.axis_name), tokens, P(), P()),
                            out_specs=(tokens, tokens, tokens))
    return local(q, k, v, out, lse, d_out, metadata, mask)


def _local_backward(setup: RingSetup, q, k, v, out, lse, d_out, metadata: RingMetadata, mask: Mask):
    """One device's ring backward; returns ``(dq, dk, dv)`` of its own shard in the input dtypes."""
    plan, shard_len, dtypes = setup.plan, q.shape[1], (q.dtype, k.dtype, v.dtype)
    device = lax.axis_index(setup.axis_name)
    q, out, d_out = (to_internal(x, setup.q_padded_len) for x in (q, out, d_out))
    k, v = (to_internal(x, setup.kv_padded_len) for x in (k, v))
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, setup.q_padded_len - shard_len)), constant_values=-jnp.inf)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def accumulate(step, k, v, grads):
        """Adds the pair of ring ``step`` to ``grads = (dq, dk, dv)`` (dk, dv: of the kv shard held)."""
        block_mask = pair_block_mask(metadata, step, device, mask, plan)

        def compute(grads):
            pair_grads = setup.pair.backward(q, k, v, block_mask, out, lse, d_out, delta, scale=setup.scale,
                                             softcap=setup.softcap)
            return tuple(total + grad.astype(jnp.float32) for total, grad in zip(grads, pair_grads))

        return when(pair_is_computed(metadata, step, device), compute, lambda grads: grads, grads)

    def ring_step(carry, step):
        k, v, grads = carry
        travelled = setup.rotate((k, v), 1)
        dq, dk, dv = accumulate(step, k, v, grads)
        dk, dv = setup.rotate((dk, dv), 1)  # the accumulators travel with their kv shard
        return (*travelled, (dq, dk, dv)), None

    grads = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if plan.steps > 1:
        (k, v, grads), _ = lax.scan(ring_step, (k, v, grads), jnp.arange(plan.steps - 1))
    if plan.steps:
        grads = accumulate(plan.steps - 1, k, v, grads)
    dq, dk, dv = grads
    if plan.steps > 1:
        dk, dv = setup.rotate((dk, dv), 1 - plan.steps)  # each accumulator goes home to its shard's device
    return tuple(from_internal(x, shard_len).astype(dtype) for x, dtype in zip((dq, dk, dv), dtypes))
