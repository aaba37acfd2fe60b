"""Hash routing (Roller et al. 2021; StableMoE's baseline): experts fixed by the token id.

expert_k(t) = (t * 2654435761 + k) mod E for k < K: no router parameters, distinct experts per
token, and over any E consecutive token ids every expert is chosen exactly once per slot
(multiplying by a constant coprime to E permutes the residues mod E; 2654435761 is prime, so that
holds for every E it does not divide). Gates are 1/K (not learned); `probs_TE` is that uniform
weight on the chosen experts.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import torch

from default_moe.parallel import ParallelGroups
from default_moe.routing import Router, RouterOutput, register_router

_MULT = 2654435761  # a prime (Knuth's multiplicative hash constant)


def hash_experts(token_ids_T: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    base_T = (token_ids_T.long() * _MULT) % num_experts
    return (base_T[:, None] + torch.arange(top_k, device=token_ids_T.device)) % num_experts


@register_router("hash")
class HashRouter(Router):
    """Fixed routing by a hash of the input token id; needs `token_ids`."""

    uses_defaults = False

    def __init__(self, config, weight=None) -> None:
        super().__init__()
        self.config = config  # `weight` (an engine's router weight) is not used: no parameters

    def forward(self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        cfg = self.config
        if token_ids_T is None:
            raise ValueError("router 'hash' routes by token id: call the layer as layer(x, token_ids=ids)")
        if token_ids_T.numel() != x_TD.shape[0]:
            raise ValueError(f"token_ids has {token_ids_T.numel()} entries for {x_TD.shape[0]} tokens")
        idx_TK = hash_experts(token_ids_T.to(x_TD.device), cfg.num_experts, cfg.top_k)
        gates_TK = torch.full(idx_TK.shape, 1.0 / cfg.top_k, device=x_TD.device)
        probs_TE = torch.zeros(x_TD.shape[0], cfg.num_experts, device=x_TD.device).scatter(1, idx_TK, 1.0 / cfg.top_k)
        return RouterOutput(probs_TE=probs_TE, idx_TK=idx_TK, gates_TK=gates_TK, aux_losses={})
