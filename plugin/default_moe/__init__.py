"""default-moe: expert-parallel Mixture-of-Experts with Default MoE dense router gradients."""

from default_moe.config import MoEConfig
from default_moe.comm import count_collectives
from default_moe.defaults import commit_defaults
from default_moe.layer import MoELayer
from default_moe.losses import AuxLossAutoScaler
from default_moe.parallel import ParallelGroups, build_groups
from default_moe.routing import Router, RouterOutput, register_router, registered_routers

__version__ = "0.1.0"

__all__ = [
    "MoEConfig",
    "MoELayer",
    "ParallelGroups",
    "build_groups",
    "count_collectives",
    "commit_defaults",
    "AuxLossAutoScaler",
    "Router",
    "RouterOutput",
    "register_router",
    "registered_routers",
]
