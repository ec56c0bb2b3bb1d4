"""moe_jax: Mixture-of-Experts layers, routers and language models in JAX/Flax."""
from moe_jax.capacity import assign_slots, compute_capacity
from moe_jax.moe import MoEConfig, MoELayer, MoEStats
from moe_jax.routing import RoutingDecision, register_router, router_names

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "MoEStats", "RoutingDecision", "assign_slots", "compute_capacity",
           "register_router", "router_names"]
