"""Aux-loss-free load balancing (DeepSeek-V3; Wang et al. 2024, arXiv 2408.15664): a per-expert
bias added to the routing scores for *selection only* (the gates use the unbiased scores), nudged
once per optimizer step toward balance:

    b_i <- b_i + rate * sign(mean_j c_j - c_i),   c = selected token slots per expert in the step,

with c summed over the layer's reduction group, so every replica holds the same bias. The bias is
a step state (`default_moe.step_state`): counts accumulate when a micro-batch's backward reaches
the router, the update lands at the optimizer step, the same moment megatron-core
(`finalize_model_grads`) and torchtitan (an optimizer pre-hook) update theirs.

Legend: T tokens, K top-k, E experts.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from default_moe.step_state import StepState


class ExpertBias(StepState):
    """`expert_bias_E` (buffer, checkpointed) and the step's token counts.

    Args:
        num_experts: E.
        rate: the update step (megatron-core's `moe_router_bias_update_rate`, DeepSeek-V3's gamma).
    """

    def __init__(self, num_experts: int, rate: float, name: str = "") -> None:
        super().__init__(name)
        self.rate = rate
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("tokens_E", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def observe(
        self, training: bool, idx_TK: torch.Tensor, anchor: torch.Tensor, carrier: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Counts this forward's selected slots when its backward reaches `anchor` (the scores).
        Returns `carrier` to go on with (`StepState.collect_on_backward`)."""
        if not self.collects(training):
            return carrier
        counts_E = torch.zeros_like(self.tokens_E).index_add_(
            0, idx_TK.reshape(-1), torch.ones(idx_TK.numel(), dtype=torch.float32, device=idx_TK.device)
        )
        return self.collect_on_backward(counts_E, anchor, carrier=carrier)

    def accumulator(self) -> torch.Tensor:
        return self.tokens_E

    def reduce_parts(self) -> List[torch.Tensor]:
        return [self.tokens_E.clone()]

    @torch.no_grad()
    def commit_parts(self, parts: List[torch.Tensor]) -> None:
        tokens_E = parts[0]
        # No token anywhere in the step: every offset is 0 and the bias stays (no host sync).
        self.expert_bias_E.add_(torch.sign(tokens_E.mean() - tokens_E) * self.rate)
        self.num_updates += 1
        self._clear()

    def _apply(self, fn, *args, **kwargs):
        # Stays fp32 under .to(bf16): the rate-sized steps would round away.
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, *args, **kwargs)
        for n, b in fp32.items():
            if self._buffers[n].dtype != torch.float32:
                self._buffers[n] = b.to(device=self._buffers[n].device)
        return self

    def extra_repr(self) -> str:
        return f"num_experts={self.expert_bias_E.numel()}, rate={self.rate}, committed_by={self.committed_by}"
