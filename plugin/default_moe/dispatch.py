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
    tokens_per_local_expert: Optional[List[int]]  # host ints (the loop backend's slices; None: not fetched)
    counts_L: torch.Tensor  # the same counts on the device (the grouped backend's offsets)
    inverse: Optional[torch.Tensor] = None  # dropless: slot -> row of slot_order (None with drops)
    slot_counts_E: Optional[torch.Tensor] = None  # this rank's kept slots per (global) expert, device


class _Permute(torch.autograd.Function):
    """Rows of `x` in the order `index`, where `index` is a permutation: the backward gathers the
    gradient with the inverse permutation (one read and one write) instead of index_select's
    zero-fill plus scatter-add."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_ND: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


def permute_rows(x_ND: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    """`x_ND.index_select(0, index_N)` for a permutation `index_N` whose inverse is `inverse_N`."""
    return _Permute.apply(x_ND, index_N, inverse_N)


def inverse_permutation(perm_N: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[n]] = n (one scatter, no sort)."""
    return torch.empty_like(perm_N).scatter_(0, perm_N, torch.arange(perm_N.numel(), device=perm_N.device))


class _WeightedSum(torch.autograd.Function):
    """out_TD = sum_k gates_TK * y_TKD in one pass, and both gradients in one pass each (the
    broadcast multiply + sum it replaces reads and writes y twice forward and three times backward)."""

    @staticmethod
    def forward(ctx, y_TKD: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_TKD, gates_TK)
        if y_TKD.shape[1] == 1:
            return y_TKD[:, 0] * gates_TK
        return torch.bmm(gates_TK.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_TKD, gates_TK = ctx.saved_tensors
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:
            grad_y = grad_TD.unsqueeze(1) * gates_TK.unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            grad_gates = torch.bmm(y_TKD, grad_TD.unsqueeze(-1)).squeeze(-1)
        return grad_y, grad_gates


def weighted_sum(y_TKD: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
    """sum_k gates_TK[:, k] * y_TKD[:, k] -> [T, D] (gates cast to y's dtype)."""
    return _WeightedSum.apply(y_TKD, gates_TK.to(y_TKD.dtype))


def expert_counts(expert_S: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Slots per expert without a host sync (`bincount` syncs on CUDA to size its output)."""
    return torch.zeros(num_bins, dtype=torch.long, device=expert_S.device).scatter_add_(0, expert_S, torch.ones_like(expert_S))


class AllToAllDispatcher:
    """Dropless / capacity dispatch over an EP group with uneven `all_to_all_single`.

    At most one host sync per dispatch: every split size (all-to-all splits, kept slots, rows per
    local expert) comes from one device-to-host transfer of the local and received counts. None
    at all without expert parallelism, drops or a consumer of host counts (`host_counts=False`,
    the grouped GEMM backend): every size is then T*K, and the counts stay on the device.

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
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor], host_counts: bool = True
    ) -> "tuple[torch.Tensor, DispatchPlan]":
        """Sends each kept (token, expert) slot to the rank holding the expert.

        Args:
            host_counts: whether the experts need the rows per local expert as host ints
                (`plan.tokens_per_local_expert`; None in the plan when not fetched).

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

        if P == 1 and keep_TK is None and not host_counts:
            # No host sync and, under torch.compile, no graph break: every slot is kept, in order.
            inverse = inverse_permutation(order_S)
            x_ND = self._gather(x_TD, order_S, K, inverse)
            return x_ND, DispatchPlan(T, K, order_S, [T * K], [T * K], None, None, counts_E, inverse, counts_E)
        if P == 1:
            # The one host sync, and under torch.compile the layer's one graph break: the experts'
            # split sizes (the loop backend's torch.split; the slot cut when capacity drops).
            counts = counts_E.tolist()
            n = sum(counts)
            slot_order = order_S[:n]
            inverse = inverse_permutation(order_S) if n == T * K else None
            x_ND = self._gather(x_TD, slot_order, K, inverse)
            return x_ND, DispatchPlan(T, K, slot_order, [n], [n], None, counts, counts_E, inverse, counts_E)

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

        n = sum(input_splits)
        slot_order = order_S[:n]
        inverse = inverse_permutation(order_S) if n == T * K else None
        x_send_ND = self._gather(x_TD, slot_order, K, inverse)
        x_recv_ND = comm.all_to_all(x_send_ND, output_splits, input_splits, self.ep_group)
        recv_counts_PL = recv_counts_E.view(P, L)
        local_expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(P), recv_counts_PL.reshape(-1), output_size=sum(output_splits)
        )
        regroup = torch.argsort(local_expert_of_row, stable=True)
        plan = DispatchPlan(
            T,
            K,
            slot_order,
            input_splits,
            output_splits,
            regroup,
            tokens_per_local_expert,
            recv_counts_PL.sum(0),
            inverse,
            counts_E,
        )
        return x_recv_ND.index_select(0, regroup), plan

    @staticmethod
    def _gather(x_TD: torch.Tensor, slot_order: torch.Tensor, K: int, inverse: Optional[torch.Tensor]) -> torch.Tensor:
        """The token row of each slot in `slot_order`. With K = 1 and no drop that is a permutation
        of the tokens, whose backward is a gather too (no zero-fill + scatter-add)."""
        if K == 1 and inverse is not None:
            return permute_rows(x_TD, slot_order, inverse)
        return x_TD.index_select(0, torch.div(slot_order, K, rounding_mode="floor"))

    def combine(self, y_local_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Returns raw expert outputs per token and slot, y_TKD (zeros for dropped slots)."""
        if self.ep_size > 1:
            y_recv_ND = torch.zeros_like(y_local_ND).index_copy(0, plan.regroup, y_local_ND)
            y_back_ND = comm.all_to_all(y_recv_ND, plan.input_splits, plan.output_splits, self.ep_group)
        else:
            y_back_ND = y_local_ND
        D = y_back_ND.shape[-1]
        if plan.inverse is not None:  # dropless: every slot has its row
            return permute_rows(y_back_ND, plan.inverse, plan.slot_order).view(plan.num_tokens, plan.top_k, D)
        y_SD = y_back_ND.new_zeros(plan.num_tokens * plan.top_k, D).index_copy(0, plan.slot_order, y_back_ND)
        return y_SD.view(plan.num_tokens, plan.top_k, D)
