"""Multi-device layers built on ``jax.shard_map``: expert parallelism for the MoE FFN."""

from jaxsparse.parallel.expert_parallel import expert_parallel_moe_ffn

__all__ = ["expert_parallel_moe_ffn"]
