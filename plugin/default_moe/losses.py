"""Router auxiliary losses and the function that attaches them to the autograd graph.

Legend: T tokens on this rank, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from default_moe import comm


# AuxLossAutoScaler's scale as one tensor per device, for backward: engines set the scale between
# forward and backward, and a compiled backward reads a tensor (updated in place by a fill, no host
# sync) where a Python float would be baked into the graph.
_SCALES: dict = {}
_SCALE_VALUE = [1.0]


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output` whose backward also back-propagates `aux_loss` (gradient 1 * scale).

    The same mechanism as megatron-core's `MoEAuxLossAutoScaler`: the layer attaches its aux loss
    to its own output, so a user adds nothing to the training loss. `set_loss_scale` lets an engine
    scale it like the main loss (e.g. 1/gradient_accumulation_steps, or the fp16 loss scale).
    """

    main_loss_backward_scale: float = 1.0

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        scaled = AuxLossAutoScaler._scale_on(aux_loss.device).to(aux_loss.dtype).expand_as(aux_loss)
        return grad_output, scaled

    @staticmethod
    def _scale_on(device: torch.device) -> torch.Tensor:
        t = _SCALES.get(device)
        if t is None:  # `apply` called without `attach`: a fresh tensor (nothing stored in backward)
            t = torch.full((), _SCALE_VALUE[0], dtype=torch.float32, device=device)
        return t

    @staticmethod
    def attach(output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        """`apply(output, aux_loss)`, with the device's scale tensor made first (outside the
        autograd Function, where torch.compile allows the side effect)."""
        if aux_loss.device not in _SCALES:
            _SCALES[aux_loss.device] = torch.full((), _SCALE_VALUE[0], dtype=torch.float32, device=aux_loss.device)
        return AuxLossAutoScaler.apply(output, aux_loss)

    @staticmethod
    def set_loss_scale(scale: float) -> None:
        AuxLossAutoScaler.main_loss_backward_scale = float(scale)
        if _SCALE_VALUE[0] == float(scale):
            return
        _SCALE_VALUE[0] = float(scale)
        for t in _SCALES.values():
            # Through `.data`: the fill must not bump the tensor's version counter. A compiled
            # backward (AOT autograd) saved this tensor at the forward and refuses to run on a
            # saved tensor modified since; reading the value set here, at backward time, is what
            # the scale is for (an engine sets it between forward and backward).
            t.data.fill_(float(scale))


class _GlobalBalanceLoss(torch.autograd.Function):
    """sum_e (sum_t p_te) * c_e with the counts c averaged over the data-parallel group *in the
    backward*: the all-reduce runs only where a backward runs, so forwards without one (no-grad
    rollouts, reference log-probs, a skipped loss) issue no collective and ranks may run different
    numbers of them. The forward's value uses the local counts (what is logged)."""

    @staticmethod
    def forward(ctx, probs_TE: torch.Tensor, counts_E: torch.Tensor, group) -> torch.Tensor:
        ctx.save_for_backward(counts_E)
        ctx.group, ctx.T = group, probs_TE.shape[0]
        return (probs_TE.sum(dim=0) * counts_E).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (counts_E,) = ctx.saved_tensors
        counts_E = counts_E.clone()
        comm.all_reduce(counts_E, ctx.group)
        counts_E = counts_E / comm.group_size(ctx.group)
        return (grad * counts_E).expand(ctx.T, -1), None, None


def switch_load_balancing_loss(
    probs_TE: torch.Tensor,
    idx_TK: torch.Tensor,
    coeff: float,
    dp_group: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    """Switch-style load-balancing loss with token counts reduced over the data-parallel group.

    loss = coeff * E / (T^2 * K) * sum_e (sum_t p_te) * c_e, where c_e is the number of token slots
    routed to expert e averaged over the DP ranks (a "global" aux loss: the balance of the whole
    batch is what is optimised, not each rank's micro-batch). The counts are all-reduced in the
    backward (`_GlobalBalanceLoss`), so only forwards that are backpropagated communicate, and
    every rank's backward of the layer issues it alike, also a rank with no tokens. The returned
    value (logged) uses the local counts; its gradient uses the group's.

    Args:
        probs_TE: fp32 router probabilities over all experts.
        idx_TK: selected experts.
        coeff: loss coefficient.
        dp_group: group the counts are summed over (None: local only).

    Returns:
        Scalar fp32 loss.
    """
    T, E = probs_TE.shape
    K = idx_TK.shape[1]
    if coeff == 0.0:
        return probs_TE.new_zeros(())
    # scatter_add, not bincount: no host sync on CUDA.
    counts_E = torch.zeros(E, dtype=torch.float32, device=idx_TK.device).index_add_(
        0, idx_TK.reshape(-1), torch.ones(idx_TK.numel(), dtype=torch.float32, device=idx_TK.device)
    )
    scale = coeff * E / (max(T, 1) * max(T, 1) * K)
    if comm.group_size(dp_group) > 1 and probs_TE.requires_grad:
        return scale * _GlobalBalanceLoss.apply(probs_TE, counts_E, dp_group)
    if T == 0:
        return probs_TE.new_zeros(())
    return scale * (probs_TE.sum(dim=0) * counts_E).sum()


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE router z-loss: coeff * mean_t logsumexp(logits_t)^2."""
    if coeff == 0.0 or logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
