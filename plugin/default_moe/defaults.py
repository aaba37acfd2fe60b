"""Default MoE's one mechanism: the default term, the EMA defaults and their update, and the
rules around them. Every adapter (our `MoELayer`, DeepSpeed-MoE, AutoEP, megatron-core, ...) calls
it with tensors it already has and adds the returned term; none re-implements any of it.

    fwd  = defaults.begin_forward(training)                # the update/record/recompute rules
    defaults.observe(fwd, y_TKD, idx_TK, probs_TK, keep_TK, groups)        # statistics + EMA
    (or observe_rows(fwd, y_ND, expert_N, probs_N, groups) for per-expert rows)
    out += defaults.default_term(fwd, probs_TE, ran_TE)    # (probs_TE * ~ran_TE) @ D, fp32

- `dense_softmax(logits)`: pi = softmax over ALL experts in fp32, autocast off;
  `check_score_function(name, where)` refuses anything else (sigmoid scores would add ~0.5 D_i
  for every unselected expert) by name.
- Updates: once per training forward; none in eval; none in an activation-checkpoint recompute
  (it runs inside the autograd engine); none in a `frozen_state()` (diagnostics).
- The recompute contract: `default_term` uses a copy of D taken after this forward's own update
  (the copy backward needs, so the next in-place update cannot touch it), recorded in a
  `ForwardSnapshots`; a recompute of the forward replays that copy even when other forwards of
  the layer ran in between, and the record is freed when the gradient reaches the term.
- The statistics are reduced over the group(s) the adapter passes (summed over each in turn).

The EMA: D_i <- beta * D_i + (1 - beta) * m_i, where m_i is the mean of expert i's raw (pre-gate)
outputs over the token slots routed to it in this micro-batch across the reduction group
(optionally pi-weighted). Experts that received no token keep D_i. The per-expert (sum, weight)
statistics travel as one E x (D+1) fp32 all-reduce, so every replica holds identical defaults.
D is a buffer (in the state dict, no gradient).

Sync modes (`ema_sync`):
- "sync": all-reduce, update, then the layer uses the new D in this step (the paper's order).
- "async": launch the all-reduce and keep using the current D; the update lands at the start
  of the next forward (or before the state dict is saved), hiding the all-reduce behind the
  rest of the step.

Reducing the sync's bytes (large E x D, e.g. DeepSeek-V3's 256 x 7168 per layer):
- `ema_stats_dtype="bfloat16"` all-reduces the per-expert output sums in bf16 (half the bytes; the
  EMA itself stays fp32, and (1 - beta) scales the rounding of the batch mean); the E token counts
  (weights) travel beside them in fp32, so they stay exact (bf16 is exact only up to 256).
- `ema_sync_every=N` accumulates the statistics locally over N training forwards and syncs (and
  updates D) once, e.g. once per optimizer step with N = gradient accumulation steps. D changes
  N times less often, so the same beta averages over N times more micro-batches. Statistics
  accumulated since the last sync are not in a checkpoint: checkpoint at multiples of N.

Non-finite statistics (`nonfinite`): "skip" leaves that expert's D unchanged this step (counted in
`nonfinite_skips`); "raise" raises FloatingPointError naming the layer, the update and the experts.

Every tensor the module holds is a buffer (counters and diagnostics ones non-persistent) or follows
`_apply`, so `.to(device)` moves all of it; D stays fp32 through `.to(dtype)` without a round trip
through the lower precision.

Legend: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from default_moe import comm
from default_moe.layer_utils import ForwardSnapshots, in_backward, state_frozen, updates_state

Groups = Union[None, dist.ProcessGroup, Sequence[Optional[dist.ProcessGroup]]]


def check_score_function(score_function: str, where: str) -> None:
    """Default MoE needs pi = softmax over all experts; other score functions are refused by name."""
    if score_function != "softmax":
        raise ValueError(
            f"Default MoE needs the softmax over all experts as router scores; {where} uses {score_function!r} "
            "(with sigmoid scores the default term adds ~0.5 * D_i for every unselected expert and swamps the "
            "routed output). Use router 'topk' there, or a softmax router"
        )


def dense_softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    """pi = softmax over ALL experts, fp32, outside autocast (routing is precision sensitive)."""
    with torch.autocast(device_type=logits_TE.device.type, enabled=False):
        return torch.softmax(logits_TE.float(), dim=-1)


def ran_mask(num_experts: int, idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, E] bool: the experts that processed each token (selected and not dropped over capacity)."""
    # Counted, not scattered: a dropped route may share its (placeholder) expert id with a kept one.
    keep = torch.ones_like(idx_TK, dtype=torch.int32) if keep_TK is None else keep_TK.to(torch.int32)
    ran = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.int32, device=idx_TK.device).scatter_add(1, idx_TK, keep)
    return ran > 0


@dataclass
class DefaultsForward:
    """What one forward may do (from `ExpertDefaults.begin_forward`)."""

    # A training forward, not a recompute, not frozen: it updates the EMA and records the D it
    # uses for a recompute.
    update: bool


def _as_groups(groups: Groups) -> List[Optional[dist.ProcessGroup]]:
    if groups is None or isinstance(groups, dist.ProcessGroup):
        return [groups]
    return list(groups)


class ExpertDefaults(nn.Module):
    """Holds `defaults_ED` and updates it once per training forward.

    Args:
        num_experts: E.
        hidden_size: D.
        beta: EMA decay in [0, 1).
        weighting: "mean" or "prob" (pi-weighted mean).
        sync_mode: "sync" or "async".
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        beta: float,
        weighting: str,
        sync_mode: str,
        stats_dtype: str = "float32",
        sync_every: int = 1,
        nonfinite: str = "skip",
        name: str = "",
    ) -> None:
        super().__init__()
        self.beta, self.weighting, self.sync_mode = beta, weighting, sync_mode
        self.stats_dtype, self.sync_every, self.nonfinite, self.name = stats_dtype, sync_every, nonfinite, name
        self.register_buffer("defaults_ED", torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)
        self._pending: Optional[tuple] = None  # ([work handles], [stats parts]) of an async update
        self._accum: Optional[torch.Tensor] = None  # local statistics not yet synced (sync_every > 1)
        self._accum_count = 0
        self.num_updates = 0
        # The last update's batch means and which experts it saw (diagnostics only).
        self.register_buffer("last_batch_mean_ED", None, persistent=False)
        self.register_buffer("last_seen_E", None, persistent=False)
        self.default_in_forward = True
        self._snapshots = ForwardSnapshots()

    @classmethod
    def from_config(cls, config, num_experts: Optional[int] = None, hidden_size: Optional[int] = None,
                    name: str = "") -> "ExpertDefaults":
        """From a `MoEConfig` (sizes may come from the host model, e.g. Megatron's config)."""
        self = cls(num_experts or config.num_experts, hidden_size or config.hidden_size, config.beta,
                   config.ema_weighting, config.ema_sync, name=name)
        self.configure(config)
        return self

    def configure(self, config) -> None:
        """Applies a (re)config's EMA settings; the defaults themselves are kept."""
        self.beta, self.weighting, self.sync_mode = config.beta, config.ema_weighting, config.ema_sync
        self.stats_dtype, self.sync_every, self.nonfinite = config.ema_stats_dtype, config.ema_sync_every, config.nonfinite
        self.default_in_forward = config.default_in_forward

    # ---- the mechanism every adapter calls ----

    # Which adapters went through the mechanism (class names), for the test that each one does.
    callers: "set[str]" = set()

    def begin_forward(self, training: bool, caller: str = "") -> DefaultsForward:
        """The rules: an async update in flight is applied first (except in a recompute or a frozen
        forward); the EMA updates once per training forward, never in eval, a recompute or a
        frozen forward."""
        if caller:
            ExpertDefaults.callers.add(caller)
        if not in_backward() and not state_frozen():
            self.finish_pending()
        return DefaultsForward(update=updates_state(training))

    def observe(self, fwd: DefaultsForward, y_TKD: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                keep_TK: Optional[torch.Tensor], groups: Groups) -> None:
        """Statistics of the raw outputs per (token, slot), reduced over `groups`, and the EMA step."""
        if fwd.update:
            self.update(self.local_statistics(y_TKD, idx_TK, probs_TK, keep_TK), groups)

    def observe_rows(self, fwd: DefaultsForward, y_ND: torch.Tensor, expert_N: torch.Tensor,
                     probs_N: torch.Tensor, groups: Groups, count_weights: bool = True) -> None:
        """As `observe`, from raw output rows with their (global) expert ids.

        Args:
            count_weights: False on a rank whose rows another rank of the group also holds as
                partial sums (expert tensor parallelism: every expert-TP rank holds the same rows,
                each a partial sum of the output). The sums then add up to the full outputs and
                the weights (counts) are contributed once, by the rank that passes True.
        """
        if fwd.update:
            stats_E_D1 = self.local_statistics(y_ND[:, None], expert_N[:, None], probs_N[:, None], None)
            if not count_weights:
                stats_E_D1[:, -1] = 0
            self.update(stats_E_D1, groups)

    def default_term(self, fwd: DefaultsForward, probs_TE: torch.Tensor, ran_TE: torch.Tensor) -> torch.Tensor:
        """sum over experts that did not process the token of pi_i * D_i: [T, D] fp32.

        Args:
            probs_TE: pi, the fp32 softmax over all experts (differentiable).
            ran_TE: bool, the experts that processed each token.
        """
        D_ED, entry = self._snapshots.get(lambda: self.defaults_ED.detach().to(torch.float32, copy=True), fwd.update)
        with torch.autocast(device_type=probs_TE.device.type, enabled=False):
            term_TD = (probs_TE.float() * ~ran_TE) @ D_ED
        self._snapshots.release_after_backward(entry, term_TD)
        if not self.default_in_forward:
            term_TD = term_TD - term_TD.detach()  # zero in the forward, same gradient
        return term_TD

    def local_statistics(
        self,
        y_TKD: torch.Tensor,
        idx_TK: torch.Tensor,
        probs_TK: torch.Tensor,
        keep_TK: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Per-expert weighted sums of raw outputs and the weights, as one [E, D+1] fp32 tensor.

        Args:
            y_TKD: raw expert outputs per token and slot.
            idx_TK: the slots' experts.
            probs_TK: the slots' router probabilities pi (weights when weighting="prob").
            keep_TK: slots that reached their expert (None: all).
        """
        E, D = self.defaults_ED.shape
        y_SD = y_TKD.detach().reshape(-1, D).float()
        idx_S = idx_TK.reshape(-1)
        if self.weighting == "prob":
            w_S = probs_TK.detach().reshape(-1).float()
            if keep_TK is not None:
                w_S = w_S * keep_TK.reshape(-1)
            y_SD = y_SD * w_S[:, None]
        else:
            # Dropped slots have zero raw output, so only the weights need the mask.
            w_S = keep_TK.reshape(-1).float() if keep_TK is not None else y_SD.new_ones(idx_S.numel())
        # Accumulate into contiguous tensors (a strided [:, :D] view makes index_add ~5x slower).
        sums_ED = torch.zeros(E, D, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, y_SD)
        weight_E = torch.zeros(E, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, w_S)
        return torch.cat([sums_ED, weight_E[:, None]], dim=1)

    @torch.no_grad()
    def update(self, stats_E_D1: torch.Tensor, dp_group: Groups) -> None:
        """All-reduces the statistics over the group(s) and applies (sync) or schedules (async) the EMA step.

        With `sync_every` N > 1 the statistics are summed locally and only every Nth call syncs.
        """
        self.finish_pending()
        if self.sync_every > 1:
            self._accum = stats_E_D1 if self._accum is None else self._accum + stats_E_D1
            self._accum_count += 1
            if self._accum_count < self.sync_every:
                return
            stats_E_D1, self._accum, self._accum_count = self._accum, None, 0
        D = self.defaults_ED.shape[1]
        if self.stats_dtype == "bfloat16":
            # Sums rounded even without a group, so the setting means the same thing at every world
            # size; the counts stay fp32 (exact).
            parts = [stats_E_D1[:, :D].to(torch.bfloat16), stats_E_D1[:, D:].contiguous()]
        else:
            parts = [stats_E_D1]
        asynchronous = self.sync_mode == "async"
        # Over each group in turn (sums over orthogonal groups = the sum over their product); only
        # the last reduction may stay in flight.
        active = [g for g in _as_groups(dp_group) if comm.group_size(g) > 1]
        works = []
        for i, g in enumerate(active):
            in_flight = asynchronous and i == len(active) - 1
            works += [comm.all_reduce(t, g, async_op=in_flight) for t in parts]
        if asynchronous:
            # Deferred even without a group, so async means the same thing at every world size.
            self._pending = (works, parts)
        else:
            self._apply_stats(parts)

    @torch.no_grad()
    def finish_pending(self) -> None:
        """Waits for an in-flight async update and applies it (no-op otherwise)."""
        if self._pending is not None:
            works, parts = self._pending
            self._pending = None
            for work in works:
                if work is not None:
                    work.wait()
            self._apply_stats(parts)

    def _apply_stats(self, parts: List[torch.Tensor]) -> None:
        stats_E_D1 = torch.cat([t.float() for t in parts], dim=1)
        D = self.defaults_ED.shape[1]
        weight_E = stats_E_D1[:, D]
        # A non-finite statistic (an expert output overflowed somewhere in the DP group) never
        # enters the defaults: that expert keeps its D this step. Counted without a host sync
        # unless asked to raise.
        finite_E = torch.isfinite(stats_E_D1).all(dim=1)
        if self.nonfinite == "raise" and not bool(finite_E.all()):
            bad = (~finite_E).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite expert outputs for expert(s) {bad} in MoE layer {self.name or '(unnamed)'} at EMA update "
                f"{self.num_updates + 1} (MoEConfig.nonfinite='raise'; 'skip' keeps those experts' defaults instead)"
            )
        self.nonfinite_skips += (~finite_E).sum()
        seen_E = (weight_E > 0) & finite_E
        mean_ED = torch.nan_to_num(stats_E_D1[:, :D] / weight_E.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        new_ED = self.beta * self.defaults_ED + (1.0 - self.beta) * mean_ED
        # In place: the buffer object stays the one engines and optimisers may hold.
        self.defaults_ED.copy_(torch.where(seen_E[:, None], new_ED, self.defaults_ED))
        self.num_updates += 1
        self.last_batch_mean_ED, self.last_seen_E = mean_ED, seen_E

    def _apply(self, fn, *args, **kwargs):
        # Follow device moves but stay fp32: a bf16 EMA would lose the small (1 - beta) updates.
        # The fp32 originals are moved, never converted and back (that would round D).
        self.finish_pending()
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, *args, **kwargs)
        for n, b in fp32.items():
            moved = self._buffers[n]
            if moved.dtype != torch.float32:
                self._buffers[n] = b.to(device=moved.device)
        if self._accum is not None:
            self._accum = self._accum.to(device=self.defaults_ED.device)
        self._snapshots.apply(lambda D: D.to(device=self.defaults_ED.device))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.finish_pending()  # a checkpoint holds every update launched so far
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "defaults_ED"
        if key not in state_dict:
            # A checkpoint from before Default MoE was switched on: start from zero defaults (the
            # paper's initialisation) instead of failing a strict load; said, never silent, since
            # the same absence is what a filter that dropped D on the way looks like.
            warnings.warn(
                f"{key} is not in the loaded state: Default MoE starts from zero defaults. Right for a checkpoint "
                "written before Default MoE was switched on; if it was written with Default MoE, D was filtered out on "
                "the way (DeepSpeed engines restore it from default_moe_defaults.pt)", stacklevel=3)
            state_dict[key] = torch.zeros_like(self.defaults_ED)
        # Statistics accumulated toward an `ema_sync_every` sync belong to the replaced state.
        self._accum, self._accum_count = None, 0
        if self._pending is not None:
            for work in self._pending[0]:
                if work is not None:
                    work.wait()
            self._pending = None  # superseded by the loaded defaults
        self._snapshots.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        E, D = self.defaults_ED.shape
        return (f"num_experts={E}, hidden_size={D}, beta={self.beta}, weighting={self.weighting}, sync={self.sync_mode}, "
                f"stats_dtype={self.stats_dtype}, sync_every={self.sync_every}, nonfinite={self.nonfinite}")
