"""default-moe: expert-parallel Mixture-of-Experts with Default MoE dense router gradients."""

from default_moe import amp, layer_utils as _layer_utils
from default_moe.config import MoEConfig
from default_moe.comm import count_collectives
from default_moe.defaults import commit_defaults
from default_moe.layer import MoELayer
from default_moe.losses import AuxLossAutoScaler
from default_moe.parallel import ParallelGroups, build_groups
from default_moe.routing import Router, RouterOutput, register_router, registered_routers

__version__ = "0.1.0"


def _deepspeed_section_guard(layer) -> None:
    # A "default_moe" section must not reach a DeepSpeed engine we did not build (DeepSpeed would
    # ignore it). Registered here so that the core modules never import an integration.
    import sys

    if "deepspeed" in sys.modules:
        from default_moe.integrations.deepspeed import install_section_guard, skip_cpu_jit_builds

        install_section_guard()
        skip_cpu_jit_builds()  # before accelerate's or the user's deepspeed.init_distributed (CPU)


_layer_utils.on_layer_built(_deepspeed_section_guard)

__all__ = [
    "amp",
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
