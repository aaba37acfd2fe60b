"""SparseMixer routing (Liu et al. 2023, "Sparse Backpropagation for MoE Training"; v2 from
GRIN-MoE / Phi-3.5-MoE): sampled experts and a gradient estimator for the router.

v1 (top-1), after microsoft/SparseMixer `sparsemixer.py`:
  1. mask experts that could not win under multiplicative jitter U(1-eps, 1+eps):
     (z* - z_i) / max(|z_i|, z*) > 2 eps  ->  z_i = -inf;   p = softmax(masked z)
  2. training: D ~ p (Gumbel-max), m = p_D; branch b = [D == argmax z] or [U > 1/2];
     forward m' = m (b) or m/2 (mid-point), backward dL/dm = 2 dL/dm' (`_MidpointScale`)
  3. output omega * (m' E_D(x)), omega a learnable vector (init 1), in training and eval
  4. eval: D = argmax, gate p_D of the masked softmax.
v2 (top-2), after HF `modeling_phimoe.sparsemixer` / GRIN appendix A:
  - each round masks, samples D ~ p, draws the Heun scale s = 1 if [D == argmax p] or [U > 3/4]
    else 1/3, and returns m*s with the custom backward dL/dz_j = g * m * (delta_jD - p_j) into the
    ORIGINAL logits (`_HeunGate`); the second round first sets z_{D1} = -inf and re-masks;
  - weights [p1_D1 s1, p2_D2 s2], not renormalised; eval: argmax, argmax excluding the first,
    masked-softmax weights, no scaling.
Balance loss: N * sum_i f_i P_i with f over the sampled experts, counts reduced over DP (global),
P the mean masked softmax (v1) or the raw softmax (v2), coefficient `aux_loss_coeff`.

Legend: T tokens, E experts, K top-k, D hidden.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from default_moe import losses
from default_moe.parallel import ParallelGroups
from default_moe.routing import Router, RouterOutput, register_router, router_weight


def jitter_mask(logits_TE: torch.Tensor, eps: float) -> torch.Tensor:
    """True where an expert cannot win under multiplicative jitter of +-eps (masked out)."""
    top_T1 = logits_TE.max(dim=-1, keepdim=True).values
    factor = logits_TE.abs().clamp(min=top_T1)
    return (top_T1 - logits_TE) / factor > 2 * eps


def masked_softmax(logits_TE: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.softmax(logits_TE.masked_fill(jitter_mask(logits_TE.detach(), eps), float("-inf")), dim=-1)


def gumbel_argmax(logits_TE: torch.Tensor, masked_TE: torch.Tensor, generator=None) -> torch.Tensor:
    """A sample of softmax(masked logits) by the Gumbel-max trick."""
    u = torch.rand(logits_TE.shape, device=logits_TE.device, generator=generator).clamp(1e-20, 1.0)
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))  # G = -log(Exp(1))
    return (logits_TE.masked_fill(masked_TE, float("-inf")) + gumbel).argmax(dim=-1)


class _MidpointScale(torch.autograd.Function):
    """v1: forward m * (1/2 + b/2); backward dL/dm = 2 * dL/dm' in both branches."""

    @staticmethod
    def forward(ctx, m_T, euler_T):
        return m_T * (0.5 + 0.5 * euler_T)

    @staticmethod
    def backward(ctx, grad_T):
        return 2.0 * grad_T, None


class _HeunGate(torch.autograd.Function):
    """v2: forward m*s; backward dL/dz_j = g * m * (delta_jD - p_j) into the original logits."""

    @staticmethod
    def forward(ctx, logits_TE, m_T, idx_T, probs_TE, scale_T):
        ctx.save_for_backward(m_T, idx_T, probs_TE)
        return m_T * scale_T

    @staticmethod
    def backward(ctx, grad_T):
        m_T, idx_T, probs_TE = ctx.saved_tensors
        onehot_TE = F.one_hot(idx_T, probs_TE.shape[-1]).to(probs_TE.dtype)
        grad_logits = (grad_T * m_T).unsqueeze(-1) * (onehot_TE - probs_TE)
        return grad_logits, None, None, None, None


def _heun_round(
    logits_TE: torch.Tensor, eps: float, training: bool, generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One v2 routing round: (expert, gate with the custom backward, masked softmax)."""
    masked_TE = jitter_mask(logits_TE.detach(), eps)
    probs_TE = torch.softmax(logits_TE.detach().masked_fill(masked_TE, float("-inf")), dim=-1)
    if training:
        idx_T = gumbel_argmax(logits_TE.detach(), masked_TE, generator)
        keep_T = (idx_T == probs_TE.argmax(-1)) | (torch.rand(idx_T.shape, device=idx_T.device, generator=generator) > 0.75)
        scale_T = torch.where(keep_T, 1.0, 1.0 / 3.0).to(probs_TE.dtype)
        m_T = probs_TE.gather(1, idx_T[:, None]).squeeze(1)
        return idx_T, _HeunGate.apply(logits_TE, m_T, idx_T, probs_TE, scale_T), probs_TE
    idx_T = probs_TE.argmax(-1)
    return idx_T, probs_TE.gather(1, idx_T[:, None]).squeeze(1), probs_TE


def sparsemixer_route(
    logits_TE: torch.Tensor, version: str, eps: float, training: bool, generator=None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseMixer on fp32 router logits (shared by our router and the engine adapters).

    Returns:
        idx_TK, gates_TK (custom backward), probs_TE (masked softmax of the first round), and the
        probabilities the balance loss averages (masked softmax for v1, raw softmax for v2).
    """
    if version == "v1":
        probs_TE = masked_softmax(logits_TE, eps)  # differentiable
        if training:
            idx_T = gumbel_argmax(logits_TE.detach(), jitter_mask(logits_TE.detach(), eps), generator)
            euler_T = (idx_T == logits_TE.detach().argmax(-1)) | (
                torch.rand(idx_T.shape, device=idx_T.device, generator=generator) > 0.5
            )
            m_T = probs_TE.gather(1, idx_T[:, None]).squeeze(1)
            gate_T = _MidpointScale.apply(m_T, euler_T.to(m_T.dtype))
        else:
            idx_T = logits_TE.argmax(-1)
            gate_T = probs_TE.gather(1, idx_T[:, None]).squeeze(1)
        return idx_T[:, None], gate_T[:, None], probs_TE, probs_TE
    idx1, gate1, probs1 = _heun_round(logits_TE, eps, training, generator)
    # Round 2 on the original logits with the first expert removed (the gradient still reaches the
    # original logits; it is 0 at D1 since p2_D1 = 0).
    idx2, gate2, _ = _heun_round(logits_TE.scatter(1, idx1[:, None], float("-inf")), eps, training, generator)
    return torch.stack([idx1, idx2], 1), torch.stack([gate1, gate2], 1), probs1, torch.softmax(logits_TE, dim=-1)


@register_router("sparsemixer")
class SparseMixerRouter(Router):
    """SparseMixer v1 (top-1) / v2 (top-2) router; see the module docstring."""

    uses_defaults = False

    def __init__(self, config, weight: Optional[nn.Parameter] = None) -> None:
        super().__init__()
        self.config = config
        self.version, self.eps = config.sparsemixer.resolved(config.top_k)
        self.weight = router_weight(config, weight)
        # v1's learnable output scale omega (init 1); v2 has none (GRIN replaces it by a proper init).
        self.omega = nn.Parameter(torch.ones(config.hidden_size)) if self.version == "v1" else None
        self.generator: Optional[torch.Generator] = None  # tests may pin the sampling

    def forward(self, x_TD: torch.Tensor, groups: ParallelGroups, token_ids_T: Optional[torch.Tensor] = None) -> RouterOutput:
        cfg = self.config
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        idx_TK, gates_TK, probs_TE, balance_probs_TE = sparsemixer_route(
            logits_TE, self.version, self.eps, self.training, self.generator
        )
        aux = {
            "load_balancing": losses.switch_load_balancing_loss(balance_probs_TE, idx_TK, cfg.aux_loss_coeff, groups.dp_group),
            "z_loss": losses.z_loss(logits_TE, cfg.z_loss_coeff),
        }
        return RouterOutput(probs_TE=probs_TE, idx_TK=idx_TK, gates_TK=gates_TK, aux_losses=aux, output_scale_D=self.omega)
