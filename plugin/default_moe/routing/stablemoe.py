"""StableMoE routing (Dai et al. 2022), after Hunter-DDM/stablemoe `BaseLayer`.

Stage 1 (training forwards < `stablemoe.stage2_step`):
  - affinity s_ti = h_t . C_i with expert centroids C [E, D] (orthogonal init, gain 0.1); greedy
    a_t = argmax_i s_ti (no gradient through the choice); gate sigmoid(s_{t,a_t}) (gradient to C
    and h: "cohesive" routing);
  - balance loss  balance_coeff * sum_i ((|A_i| - n_bar) / n_bar) * sum_{t in A_i} sigmoid(s_ti) / T
    (the ratio is a constant; fairseq sums over tokens and divides the gradient by ntokens, so the
    per-token mean is used here);
  - distilled router (`DistilledRouter`): embedding of the input token id Emb [V, R] and centroids C' [E, R]
    (orthogonal, gain 0.1), s'_t = Emb(x_t) . C'^T, trained by distill_coeff * CE(s'_t, a_t)
    (mean over tokens) on the detached stage-1 assignments; only Emb and C' get its gradient.
Stage 2 (from `stage2_step` on) and every forward outside training (eval/inference): routing by
the frozen distilled router, a_t = argmax_i s'_ti (no gradient); the gate sigmoid(h_t . C_{a_t})
is still trained; no balance or distillation loss.

The number of training forwards seen (`num_steps`) and the stage are buffers: a checkpoint resumed
in stage 2 stays in stage 2. Under gradient accumulation `stage2_step` counts micro-batches.

Legend: T tokens, E experts, D hidden, R distilled-router width, V vocabulary.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from default_moe.layer_utils import ForwardSnapshots, updates_state
from default_moe.parallel import ParallelGroups
from default_moe.routing import Router, RouterOutput, register_router


class DistilledRouter(nn.Module):
    """StableMoE's lightweight router: token-id embedding [V, R] and centroids [E, R], both
    orthogonally initialised with gain 0.1 (embedding default init for the table)."""

    def __init__(self, num_experts: int, vocab_size: int, router_dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, router_dim)
        self.centroids_ER = nn.Parameter(torch.empty(num_experts, router_dim))
        nn.init.orthogonal_(self.centroids_ER, gain=0.1)

    def forward(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        return self.emb(token_ids_T) @ self.centroids_ER.t()


def stablemoe_route(
    scores_TE: torch.Tensor, token_ids_T: torch.Tensor, distill: DistilledRouter, sc, first_stage: bool
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """StableMoE routing from the affinity scores h . C^T (shared with the engine adapters).

    Args:
        sc: the `StableMoEConfig` (loss coefficients).

    Returns:
        idx_T, gate_T = sigmoid(s_{t, a_t}), and the stage-1 aux losses (empty in stage 2).
    """
    if first_stage:
        idx_T = scores_TE.detach().argmax(-1)
    else:
        with torch.no_grad():
            idx_T = distill(token_ids_T).argmax(-1)
    gate_T = torch.sigmoid(scores_TE.gather(1, idx_T[:, None]).squeeze(1))
    aux: Dict[str, torch.Tensor] = {}
    if first_stage:
        T, E = scores_TE.shape
        counts_E = torch.zeros(E, device=idx_T.device).index_add_(0, idx_T, torch.ones(T, device=idx_T.device))
        n_bar = max(T / E, 1e-9)
        assigned_T = torch.sigmoid(scores_TE).gather(1, idx_T[:, None]).squeeze(1)
        ratio_T = ((counts_E - n_bar) / n_bar)[idx_T]
        aux["stablemoe_balance"] = sc.balance_coeff * (ratio_T * assigned_T).sum() / max(T, 1)
        ce = F.cross_entropy(distill(token_ids_T), idx_T, reduction="sum") / max(T, 1)
        aux["stablemoe_distill"] = sc.distill_coeff * ce
    return idx_T, gate_T, aux


def stage_for(record: dict, training: bool, num_steps: torch.Tensor, stage2_step: int) -> bool:
    """Whether the forward `record` belongs to is a stage-1 training forward (the engine adapters'
    StableMoE step): decided and counted once per forward, replayed by its recompute."""
    if "first" not in record:
        record["first"] = training and int(num_steps) < stage2_step
        if updates_state(training):
            num_steps += 1
    return record["first"]


def check_token_ids(token_ids_T: Optional[torch.Tensor], num_tokens: int, name: str) -> None:
    if token_ids_T is None:
        raise ValueError(f"router {name!r} needs the input token ids: call the layer as layer(x, token_ids=ids)")
    if token_ids_T.numel() != num_tokens:
        raise ValueError(f"token_ids has {token_ids_T.numel()} entries for {num_tokens} tokens")


@register_router("stablemoe")
class StableMoERouter(Router):
    """StableMoE's two-stage top-1 router; needs `token_ids`."""

    uses_defaults = False

    def __init__(self, config, weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.config = config
        sc = config.stablemoe
        # An engine's router weight [E, D] serves as the expert centroids (affinity = its logits).
        if weight is None:
            weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
            nn.init.orthogonal_(weight, gain=0.1)
        self.centroids_ED = weight
        self.distill = DistilledRouter(config.num_experts, sc.vocab_size, sc.router_dim)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self._stages = ForwardSnapshots()

    @property
    def stage(self) -> int:
        return 2 if int(self.num_steps) >= self.config.stablemoe.stage2_step else 1

    def distilled_scores(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        return self.distill(token_ids_T)

    def step(self, training: bool):
        """(whether this forward is a stage-1 training forward, its record); counts training forwards.

        A recompute replays its forward's stage (the recompute contract), also across the
        stage boundary with other forwards in between.
        """
        record = updates_state(training)
        first, entry = self._stages.get(lambda: training and self.stage == 1, record)
        if record:
            self.num_steps += 1
        return first, entry

    def forward(self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        check_token_ids(token_ids_T, x_TD.shape[0], "stablemoe")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scores_TE = x_TD.float() @ self.centroids_ED.float().t()
        first_stage, entry = self.step(self.training)
        idx_T, gate_T, aux = stablemoe_route(
            scores_TE, token_ids_T.to(x_TD.device).long(), self.distill, self.config.stablemoe, first_stage
        )
        self._stages.release_after_backward(entry, gate_T)
        probs_TE = torch.zeros_like(scores_TE).scatter(1, idx_T[:, None], 1.0)
        return RouterOutput(probs_TE=probs_TE, idx_TK=idx_T[:, None], gates_TK=gate_T[:, None], aux_losses=aux)
