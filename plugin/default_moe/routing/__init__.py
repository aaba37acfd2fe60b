"""Router interface and registry.

A router maps tokens to experts and returns a `RouterOutput`. The layer only needs those fields,
so a new routing method (SparseMixer, StableMoE, hash, ...) is one class registered under a
name, selected by `MoEConfig.router`, with no change to the layer. A router whose class sets
`uses_defaults = True` makes the layer add the Default MoE term
`sum_{i not in S} pi_i * D_i` and keep the EMA defaults.

Legend: T tokens, E experts, K top-k, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Type

import torch
from torch import nn

from default_moe.parallel import ParallelGroups


@dataclass
class RouterOutput:
    """What every router returns.

    Attributes:
        probs_TE: fp32 probabilities over ALL experts (differentiable); the default term weights
            unselected experts with them.
        idx_TK: selected experts per token (int64).
        gates_TK: combine weights of the selected experts (differentiable, fp32).
        aux_losses: named scalar losses the layer attaches to the graph (already scaled by their
            coefficients).
        output_scale_D: optional per-channel scale of the layer output (SparseMixer v1's omega).
    """

    probs_TE: torch.Tensor
    idx_TK: torch.Tensor
    gates_TK: torch.Tensor
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    output_scale_D: Optional[torch.Tensor] = None


class Router(nn.Module):
    """Base class of routers. Subclasses implement `forward`.

    Class attributes:
        uses_defaults: the layer adds the Default MoE term and maintains EMA defaults.
    """

    uses_defaults: bool = False

    def forward(
        self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None
    ) -> RouterOutput:  # pragma: no cover - interface
        raise NotImplementedError


def router_weight(config, weight: Optional[nn.Parameter] = None) -> nn.Parameter:
    """The [E, D] router weight: an engine's existing Parameter, or a new normal-initialised one."""
    if weight is None:
        weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(weight, std=config.init_std)
    return weight


_REGISTRY: Dict[str, Type[Router]] = {}


def register_router(name: str) -> Callable[[Type[Router]], Type[Router]]:
    """Class decorator: makes a router selectable as `MoEConfig(router=name)`."""

    def wrap(cls: Type[Router]) -> Type[Router]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered to {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_routers() -> Dict[str, Type[Router]]:
    _load_builtin()
    return dict(_REGISTRY)


def build_router(config, weight=None) -> Router:
    """Instantiates the router named by `config.router` (optionally routing with an existing
    [E, D] weight Parameter, e.g. an engine's own router weight)."""
    routers = registered_routers()
    if config.router not in routers:
        raise ValueError(f"MoEConfig.router must be one of {sorted(routers)}, got {config.router!r}")
    return routers[config.router](config, weight=weight)


def _load_builtin() -> None:
    # Import for the registration side effect; deferred to avoid an import cycle with config.
    from default_moe.routing import hash, sparsemixer, stablemoe, topk  # noqa: F401


__all__ = ["Router", "RouterOutput", "register_router", "registered_routers", "build_router"]
