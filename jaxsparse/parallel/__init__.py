"""Multi-device layers built on ``jax.shard_map`` and the sharding rules for jit training.

- :func:`ring_attention` / :func:`token_ring_attention`: sequence parallelism over a ring, on a
  :class:`SequenceLayout` (contiguous, zigzag, striped); :func:`ring_plan` tells which block pairs
  and rotations a mask needs.
- :func:`ulysses_attention`: sequence parallelism by all-to-all from sequence to heads and back.
- :func:`expert_parallel_moe_ffn`: experts spread over a mesh axis, tokens sent by all-to-all.
- :mod:`jaxsparse.parallel.sharding`: logical axis names, their mesh rules, meshes and shardings.
"""

from jaxsparse.parallel.expert_parallel import expert_parallel_moe_ffn
from jaxsparse.parallel.layouts import SequenceLayout
from jaxsparse.parallel.ring_attention import ring_attention
from jaxsparse.parallel.ring_plan import RingPlan, ring_plan
from jaxsparse.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    logical_to_spec,
    make_mesh,
    shard_state,
    state_shardings,
    with_logical_constraint,
)
from jaxsparse.parallel.token_ring import token_ring_attention
from jaxsparse.parallel.ulysses import ulysses_attention

__all__ = ["DEFAULT_RULES", "MESH_AXES", "RingPlan", "SequenceLayout", "expert_parallel_moe_ffn", "logical_to_spec",
           "make_mesh", "ring_attention", "ring_plan", "shard_state", "state_shardings", "token_ring_attention",
           "ulysses_attention", "with_logical_constraint"]
