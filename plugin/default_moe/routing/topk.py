"""TopK routing (the baseline) and Default MoE routing.

Both compute pi = softmax(W x) in fp32 over ALL experts and take the top-k of pi. They differ
only in what the layer does with pi: TopK combines the k selected experts; Default also adds
sum_{i not in S} pi_i D_i, so the router receives gradient from every expert
(d y / d pi_i = D_i for unselected i). That is why Default is TopK plus one class attribute.

Today's routing options (megatron-core's `topk_routing_with_score_function`, torchtitan's
`TokenChoiceTopKRouter`): sigmoid scores, an aux-loss-free expert bias used for selection only
(`routing.expert_bias`), group-limited selection, renormalised selected gates (`normalize_topk`)
times `route_scale`. The gates are always the unbiased scores of the selected experts.

Legend: T tokens, E experts, K top-k, D hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from default_moe import losses
from default_moe.defaults import dense_scores
from default_moe.parallel import ParallelGroups
from default_moe.routing import Router, RouterOutput, register_router, router_weight
from default_moe.routing.expert_bias import ExpertBias


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
        self.expert_bias = ExpertBias(config.num_experts, config.expert_bias_update_rate) if config.expert_bias else None

    def forward(self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        cfg = self.config
        # Routing decisions are precision sensitive: fp32 even under bf16 autocast.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
            scores_TE = dense_scores(logits_TE, cfg.score_function)
        select_TE = scores_TE if self.expert_bias is None else scores_TE + self.expert_bias.expert_bias_E
        if cfg.num_expert_groups is not None:
            idx_TK = group_limited_topk(select_TE, cfg.top_k, cfg.num_expert_groups, cfg.group_topk)
        else:
            idx_TK = torch.topk(select_TE, cfg.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(1, idx_TK)
        if cfg.normalize_topk:
            gates_TK = gates_TK / (gates_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.route_scale != 1.0:
            gates_TK = gates_TK * cfg.route_scale
        if self.expert_bias is not None:
            gates_TK = self.expert_bias.observe(self.training, idx_TK, anchor=logits_TE, carrier=gates_TK)
        # The balance loss sees probabilities: sigmoid scores normalised per token (megatron-core's).
        balance_TE = scores_TE if cfg.score_function == "softmax" else scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
        aux = {
            "load_balancing": losses.switch_load_balancing_loss(balance_TE, idx_TK, cfg.aux_loss_coeff, groups.dp_group),
            "z_loss": losses.z_loss(logits_TE, cfg.z_loss_coeff),
        }
        return RouterOutput(probs_TE=scores_TE, idx_TK=idx_TK, gates_TK=gates_TK, aux_losses=aux)


def group_limited_topk(scores_TE: torch.Tensor, top_k: int, num_groups: int, group_topk: int) -> torch.Tensor:
    """[T, K] experts chosen within each token's best `group_topk` groups (megatron-core's rule:
    a group's score is the sum of its top-(top_k / group_topk) scores)."""
    T, E = scores_TE.shape
    group_scores_TG = scores_TE.view(T, num_groups, -1).topk(top_k // group_topk, dim=-1).values.sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=group_topk, dim=-1, sorted=False).indices
    group_mask_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter(1, group_idx, True)
    mask_TE = group_mask_TG.unsqueeze(-1).expand(T, num_groups, E // num_groups).reshape(T, E)
    return torch.topk(scores_TE.masked_fill(~mask_TE, float("-inf")), k=top_k, dim=-1).indices


@register_router("default")
class DefaultRouter(TopKRouter):
    """Default MoE (Panda et al. 2025): TopK routing plus EMA default outputs for unselected experts."""

    uses_defaults = True
