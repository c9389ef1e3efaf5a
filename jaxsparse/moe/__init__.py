"""Mixture of experts: routers, auxiliary losses, load metrics, and dispatch (capacity or dropless)."""

from jaxsparse.moe.dispatch import DispatchStats, capacity, moe_ffn
from jaxsparse.moe.losses import (
    AdaptiveLossWeight,
    activation_locality_loss,
    chunk_sparsification_loss,
    load_balance_loss,
    router_z_loss,
)
from jaxsparse.moe.metrics import expert_load, load_imbalance
from jaxsparse.moe.routing import (
    Routing,
    blockffn_router,
    check_k,
    expert_choice_router,
    jitter,
    sigmoid_bias_router,
    top_k_router,
    update_router_bias,
)

__all__ = [
    "AdaptiveLossWeight", "DispatchStats", "Routing", "activation_locality_loss", "blockffn_router", "capacity", "check_k",
    "chunk_sparsification_loss", "expert_choice_router", "expert_load", "jitter", "load_balance_loss",
    "load_imbalance", "moe_ffn", "router_z_loss", "sigmoid_bias_router", "top_k_router", "update_router_bias",
]
