"""Token dispatch for expert parallelism: permute by expert, uneven all-to-all, and back.

Dropless by default; with a capacity factor, each rank keeps at most
ceil(capacity_factor * T * K / E) slots per expert and drops the rest (highest-probability or
earliest slots survive, `MoEConfig.drop_policy`). A dropped slot's raw output is zero.

Flow on an EP group of P ranks, L = E / P local experts each:

    slots (T*K) --sort by expert--> x_send (rank-major, expert-minor)
    count exchange (all_to_all of E ints)  ->  split sizes on the host (the one host sync)
    all_to_all(x_send)  ->  x_recv [src rank][local expert]  --regroup-->  x_local [local expert][src rank]
    ... experts ...
    y_local --regroup back--> all_to_all back --unpermute--> y_TKD (zeros for dropped slots)

Legend: T tokens, K top-k, E experts, L local experts, P EP size, N rows, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from default_moe import comm


def capacity_keep_mask(
    idx_TK: torch.Tensor,
    priority_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: Optional[float],
    drop_policy: str = "probs",
) -> Optional[torch.Tensor]:
    """Which token slots fit in their expert's capacity on this rank (None when dropless).

    Args:
        idx_TK: selected experts.
        priority_TK: the slots' router probabilities (priority for drop_policy="probs").
        num_experts: E.
        capacity_factor: None (dropless) or the factor.
        drop_policy: "probs" keeps the highest-probability slots, "position" the earliest tokens.

    Returns:
        keep_TK boolean mask, or None.
    """
    if capacity_factor is None:
        return None
    T, K = idx_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    expert_S = idx_TK.reshape(-1)
    if drop_policy == "probs":
        by_prob_S = torch.argsort(priority_TK.detach().reshape(-1), descending=True, stable=True)
        order_S = by_prob_S[torch.argsort(expert_S[by_prob_S], stable=True)]
    else:
        order_S = torch.argsort(expert_S, stable=True)
    counts_E = expert_counts(expert_S, num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_in_expert = torch.arange(expert_S.numel(), device=idx_TK.device) - starts_E[expert_S[order_S]]
    keep_S = torch.empty_like(expert_S, dtype=torch.bool)
    keep_S[order_S] = rank_in_expert < capacity
    return keep_S.view(T, K)


@dataclass
class DispatchPlan:
    """Everything `combine` needs to undo `dispatch`."""

    num_tokens: int
    top_k: int
    slot_order: torch.Tensor  # kept slot ids (t*K + k), sorted by expert
    input_splits: List[int]  # rows sent to each EP rank
    output_splits: List[int]  # rows received from each EP rank
    regroup: Optional[torch.Tensor]  # received row -> position in local-expert-major order (EP > 1)
    tokens_per_local_expert: List[int]  # host ints (the loop backend's slices)
    counts_L: torch.Tensor  # the same counts on the device (the grouped backend's offsets)


def expert_counts(expert_S: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Slots per expert without a host sync (`bincount` syncs on CUDA to size its output)."""
    return torch.zeros(num_bins, dtype=torch.long, device=expert_S.device).scatter_add_(0, expert_S, torch.ones_like(expert_S))


class AllToAllDispatcher:
    """Dropless / capacity dispatch over an EP group with uneven `all_to_all_single`.

    Exactly one host sync per dispatch: every split size (all-to-all splits, kept slots, rows per
    local expert) comes from one device-to-host transfer of the local and received counts.

    Args:
        num_experts: E (global).
        ep_group: the expert-parallel group (None or size 1: local only).
    """

    def __init__(self, num_experts: int, ep_group: Optional[dist.ProcessGroup]) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = comm.group_size(ep_group)
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor]
    ) -> "tuple[torch.Tensor, DispatchPlan]":
        """Sends each kept (token, expert) slot to the rank holding the expert.

        Returns:
            x_local_ND: rows for this rank's experts, sorted by local expert.
            plan: the bookkeeping for `combine`.
        """
        T, K = idx_TK.shape
        E, P, L = self.num_experts, self.ep_size, self.num_local_experts
        expert_S = idx_TK.reshape(-1)
        if keep_TK is not None:
            # Dropped slots sort after every real expert and are cut off.
            expert_S = torch.where(keep_TK.reshape(-1), expert_S, torch.full_like(expert_S, E))
        counts_E = expert_counts(expert_S, E + 1)[:E]
        order_S = torch.argsort(expert_S, stable=True)

        if P == 1:
            # The one host sync, and under torch.compile the layer's one graph break: the experts'
            # split sizes (the loop backend's torch.split; the slot cut when capacity drops).
            counts = counts_E.tolist()
            slot_order = order_S[: sum(counts)]
            x_ND = x_TD.index_select(0, torch.div(slot_order, K, rounding_mode="floor"))
            n = x_ND.shape[0]
            return x_ND, DispatchPlan(T, K, slot_order, [n], [n], None, counts, counts_E)

        recv_counts_E = torch.empty_like(counts_E)
        comm.all_to_all_single(recv_counts_E, counts_E, None, None, self.ep_group)
        # The one host sync (a graph break under torch.compile: the all-to-all takes host split
        # sizes): local and received counts in one transfer; every split derives from it.
        both = torch.cat([counts_E, recv_counts_E]).tolist()
        sent_PL = [both[p * L : (p + 1) * L] for p in range(P)]
        recv_PL = [both[E + p * L : E + (p + 1) * L] for p in range(P)]
        input_splits = [sum(c) for c in sent_PL]
        output_splits = [sum(c) for c in recv_PL]
        tokens_per_local_expert = [sum(col) for col in zip(*recv_PL)]

        slot_order = order_S[: sum(input_splits)]
        x_send_ND = x_TD.index_select(0, torch.div(slot_order, K, rounding_mode="floor"))
        x_recv_ND = comm.all_to_all(x_send_ND, output_splits, input_splits, self.ep_group)
        recv_counts_PL = recv_counts_E.view(P, L)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(P), recv_counts_PL.reshape(-1), output_size=sum(output_splits)
        )
        regroup = torch.argsort(local_expert_of_row, stable=True)
        plan = DispatchPlan(
            T, K, slot_order, input_splits, output_splits, regroup, tokens_per_local_expert, recv_counts_PL.sum(0)
        )
        return x_recv_ND.index_select(0, regroup), plan

    def combine(self, y_local_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Returns raw expert outputs per token and slot, y_TKD (zeros for dropped slots)."""
        if self.ep_size > 1:
            y_recv_ND = torch.zeros_like(y_local_ND).index_copy(0, plan.regroup, y_local_ND)
            y_back_ND = comm.all_to_all(y_recv_ND, plan.input_splits, plan.output_splits, self.ep_group)
        else:
            y_back_ND = y_local_ND
        D = y_back_ND.shape[-1]
        y_SD = y_back_ND.new_zeros(plan.num_tokens * plan.top_k, D).index_copy(0, plan.slot_order, y_back_ND)
        return y_SD.view(plan.num_tokens, plan.top_k, D)
