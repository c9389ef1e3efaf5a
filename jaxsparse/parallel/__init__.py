"""Multi-device layers built on ``jax.shard_map`` and the sharding rules for jit training.

- :func:`ulysses_attention`: sequence parallelism by all-to-all from sequence to heads and back.
- :func:`expert_parallel_moe_ffn`: experts spread over a mesh axis, tokens sent by all-to-all.
- :mod:`jaxsparse.parallel.sharding`: logical axis names, their mesh rules, meshes and shardings.
"""

from jaxsparse.parallel.expert_parallel import expert_parallel_moe_ffn
from jaxsparse.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    logical_to_spec,
    make_mesh,
    shard_state,
    state_shardings,
    with_logical_constraint,
)
from jaxsparse.parallel.ulysses import ulysses_attention

__all__ = ["DEFAULT_RULES", "MESH_AXES", "expert_parallel_moe_ffn", "logical_to_spec", "make_mesh", "shard_state",
           "state_shardings", "ulysses_attention", "with_logical_constraint"]
