"""TokenRing: sequence-parallel attention where the queries travel and the partial outputs come back.

Each device keeps its own keys and values. At ring step ``s`` device ``i`` holds the queries of shard
``(i - s) mod n`` (the queries move one device on, ``+1``, per step), attends them to its keys and
values, and sends the partial ``(out, lse)`` straight back (``-s``) to the queries' owner, which
merges it into its output by log-sum-exp. Queries and partial outputs flow in opposite directions,
so both directions of every link carry data (TokenRing, Wang et al. 2024).

The schedule is planned as for :func:`~jaxsparse.parallel.ring_attention.ring_attention`
(``rotate="q"``): pairs without a visible block are skipped and the ring stops after the last step
any device needs. The steps run in a ``lax.scan``; the send back of step ``s`` (shift ``-s``, the
same on every device) is a ``lax.switch`` over the static shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxsparse.masks.base import Mask
from jaxsparse.ops.attention.config import BlockSizes
from jaxsparse.parallel.layouts import SequenceLayout
from jaxsparse.parallel.pair_attention import from_internal, merge_partials, to_internal
from jaxsparse.parallel.ring_attention import RingSetup, prepare_ring, when
from jaxsparse.parallel.ring_plan import RingMetadata, pair_block_mask, pair_is_computed

__all__ = ["token_ring_attention"]


def token_ring_attention(q, k, v, mask: Mask | None = None, *, mesh: jax.sharding.Mesh, axis_name: str,
                         layout: str | SequenceLayout = "zigzag", scale: float | None = None,
                         softcap: float | None = None, block_sizes: BlockSizes | None = None,
                         implementation: str | None = None):
    """Sequence-parallel block-sparse self-attention where queries travel (TokenRing).

    Same result, arguments and errors as :func:`~jaxsparse.parallel.ring_attention.ring_attention`;
    only the communication differs. Per step after 0 each device sends the queries it holds one way
    (``B * T/n * H * D`` elements) and a partial output plus its float32 logsumexp the other way;
    the keys and values never move. Worth it when K / H is large (little GQA sharing) or when the
    two link directions are otherwise idle.

    Gradients come from JAX's autodiff through the ``shard_map``: each ``ppermute`` transposes to the
    reverse permutation, and each pair's backward is the implementation's own VJP (its custom VJP
    for ``"xla"``). The residuals are therefore those autodiff keeps (every step's partial outputs
    and travelling queries), more than the ring backward of ``ring_attention`` saves.

    Args:
      q: queries ``[B, T, H, D]`` in layout order, sharded over ``axis_name`` on the token axis.
      k, v: keys and values ``[B, S, K, D]``, ``S == T``, in layout order.
      mask: a :class:`~jaxsparse.masks.Mask` on natural positions, or None (full attention).
      mesh, axis_name, layout, scale, softcap, block_sizes, implementation: as ``ring_attention``.

    Returns:
      ``out [B, T, H, D]`` in q's dtype, layout order, sharded over ``axis_name``.

    Raises:
      ValueError, TypeError, NotImplementedError: as ``ring_attention``.
    """
    setup, metadata, mask = prepare_ring(q, k, v, mask, mesh=mesh, axis_name=axis_name, layout=layout, scale=scale,
                                         softcap=softcap, block_sizes=block_sizes, implementation=implementation,
                                         rotate="q")
    tokens = P(None, axis_name)
    local = setup.shard_map(lambda *args: _local_token_ring(setup, *args), in_specs=(tokens, tokens, tokens, P(), P()),
                            out_specs=tokens)
    return local(q, k, v, metadata, mask)


def _local_token_ring(setup: RingSetup, q, k, v, metadata: RingMetadata, mask: Mask):
    """One device: its q ``[B, c, H, D]``, k and v ``[B, c, K, D]``; returns its ``out [B, c, H, D]``."""
    plan, shard_len = setup.plan, q.shape[1]
    device = lax.axis_index(setup.axis_name)
    queries = to_internal(q, setup.q_padded_len)
    k, v = (to_internal(x, setup.kv_padded_len) for x in (k, v))

    def attend(step, queries):
        """The partial ``(out, lse)`` of the queries held at ring ``step`` (q shard ``device - step``)."""
        block_mask = pair_block_mask(metadata, step, device, mask, plan)

        def compute(queries):
            return setup.pair.attend(queries, k, v, block_mask, scale=setup.scale, softcap=setup.softcap)

        def skip(queries):
            return jnp.zeros_like(queries), jnp.full(queries.shape[:3], -jnp.inf, jnp.float32)

        return when(pair_is_computed(metadata, step, device), compute, skip, queries)

    # Step s's partial goes back to its queries' owner, s devices behind.
    send_back = [lambda partial, shift=shift: setup.rotate(partial, -shift) for shift in range(1, plan.steps)]

    def ring_step(carry, step):
        queries, acc = carry
        queries = setup.rotate(queries, 1)
        partial = lax.switch(step - 1, send_back, attend(step, queries))
        return (queries, merge_partials(*acc, *partial)), None

    acc = (jnp.zeros(queries.shape, jnp.float32), jnp.full(queries.shape[:3], -jnp.inf, jnp.float32))
    if plan.steps:
        acc = merge_partials(*acc, *attend(0, queries))  # step 0: the device's own queries, nothing to send
    if plan.steps > 1:
        (_, acc), _ = lax.scan(ring_step, (queries, acc), jnp.arange(1, plan.steps))
    return from_internal(acc[0].astype(q.dtype), shard_len)
