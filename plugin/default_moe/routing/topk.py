"""TopK routing (the baseline) and Default MoE routing.

Both compute pi = softmax(W x) in fp32 over ALL experts and take the top-k of pi. They differ
only in what the layer does with pi: TopK combines the k selected experts; Default also adds
sum_{i not in S} pi_i D_i, so the router receives gradient from every expert
(d y / d pi_i = D_i for unselected i). That is why Default is TopK plus one class attribute.

Legend: T tokens, E experts, K top-k, D hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from default_moe import losses
from default_moe.defaults import dense_softmax
from default_moe.parallel import ParallelGroups
from default_moe.routing import Router, RouterOutput, register_router, router_weight


@register_router("topk")
class TopKRouter(Router):
    """Linear router D -> E, fp32 softmax over all experts, top-k selection.

    Args:
        config: `MoEConfig` (hidden_size, num_experts, top_k, normalize_topk, aux/z-loss coeffs).
    """

    uses_defaults = False

    def __init__(self, config, weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.config = config
        self.weight = router_weight(config, weight)

    def forward(
        self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None
    ) -> RouterOutput:
        cfg = self.config
        # Routing decisions are precision sensitive: fp32 even under bf16 autocast.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        probs_TE = dense_softmax(logits_TE)
        topk_probs_TK, idx_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
        gates_TK = topk_probs_TK
        if cfg.normalize_topk:
            gates_TK = topk_probs_TK / topk_probs_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        aux = {
            "load_balancing": losses.switch_load_balancing_loss(
                probs_TE, idx_TK, cfg.aux_loss_coeff, groups.dp_group
            ),
            "z_loss": losses.z_loss(logits_TE, cfg.z_loss_coeff),
        }
        return RouterOutput(probs_TE=probs_TE, idx_TK=idx_TK, gates_TK=gates_TK, aux_losses=aux)


@register_router("default")
class DefaultRouter(TopKRouter):
    """Default MoE (Panda et al. 2025): TopK routing plus EMA default outputs for unselected experts."""

    uses_defaults = True
