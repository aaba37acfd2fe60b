"""Default MoE's one mechanism: the default term, the EMA defaults and the step contract. Every
adapter (our `MoELayer`, DeepSpeed-MoE, AutoEP, megatron-core, HF) calls it with tensors it
already has and adds the returned term; none re-implements any of it.

    fwd = defaults.begin_forward(training)                               # may this forward collect?
    defaults.observe(fwd, y_TKD, idx_TK, probs_TK, keep_TK)              # statistics, on the device
    (or observe_rows(fwd, y_ND, expert_N, probs_N) for per-expert rows)
    out += defaults.default_term(fwd, scores_TE, ran_TE, routed_TD=out)   # per the gate form
    ...
    commit_defaults(model)        # at the optimizer step: one bucketed all-reduce, D committed

**The step contract.** D changes only at optimizer steps. Between two steps every forward and
every activation-checkpoint recompute uses the same committed D, so a recompute needs no record
of its forward. A training forward only *accumulates* per-expert statistics (sum, weight) into a
device buffer — no collective, no host sync — and it does so when its backward reaches the layer
(a hook on the raw outputs), so each micro-batch that trains counts exactly once:
- a forward whose backward never runs (skipped loss, validation in train mode) counts nothing;
- two forwards in one backward count twice; gradient accumulation counts every micro-batch;
- a reentrant checkpoint (first forward under no_grad) counts in its recompute's backward, a
  non-reentrant one in the original forward's backward: the same statistics either way;
- no-grad forwards in train mode (`generate()`, reference log-probs) and eval count nothing and
  run no collective, so ranks decoding different lengths cannot desynchronise;
- a layer with no trainable parameter (frozen, e.g. below LoRA adapters) keeps its D and
  collects nothing; masked tokens (padding) contribute nothing.

At the optimizer step, `commit_defaults(modules)` all-reduces the statistics of all layers in
one bucketed collective per reduction group (two with `ema_stats_dtype="bfloat16"`: bf16 sums,
fp32 counts) and commits D_i <- beta D_i + (1 - beta) m_i, m_i the mean of expert i's raw
(pre-gate) outputs over the step's token slots routed to it across the group (optionally
pi-weighted); experts that received no token keep D_i (`stale_defaults="keep"`, the paper) or
decay toward zero or the other experts' mean ("zero", "mean"). Where it is called:
- any `torch.optim.Optimizer` step (a process-wide step pre-hook) commits the layers whose
  parameters that optimizer holds, unless an engine hook owns the layer (plain loops, DDP,
  FSDP2, accelerate and the HF Trainer without DeepSpeed);
- DeepSpeed engines built by our `initialize`: `engine.step()` at the accumulation boundary;
- megatron-core: `finalize_model_grads`, where megatron-core updates its router expert bias;
- anything else: `commit_defaults(model)` once per optimizer step, on every rank of the group.
Statistics pending for `step_state.PENDING_WARN_AFTER` micro-batches without a commit warn (a forgotten
step hook never fails silently); a state dict saved with pending statistics warns that they
are not in it (save after the optimizer step).

- `GateForm`: the router's gate g_i = scale * a_i / Z (softmax or sigmoid scores, Z over all or
  over the selected experts); the default term is derived per form (see `GateForm`);
  `dense_scores(logits, score_function)`: the fp32 scores of all experts, autocast off.
- Non-finite statistics (`nonfinite`): "skip" leaves that expert's D unchanged at the commit
  (counted in `nonfinite_skips`); "raise" raises FloatingPointError naming the layer and experts.

Every tensor the module holds is a buffer (the accumulator and counters non-persistent), so
`.to(device)` moves all of it; D stays fp32 through `.to(dtype)` without a round trip through the
lower precision.

Legend: T tokens, K top-k, E experts, D hidden, S token slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Union

import torch
from torch import nn

from default_moe.step_state import StepState, commit_step_state, step_states_in


SCORE_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class GateForm:
    """How a router weights the experts it selects: g_i = scale * a_i / Z, the one description of a
    gate the default term needs (the derivation: docs/method.md).

    Attributes:
        score_function: "softmax" (a_i = exp z_i, so the scores are pi = a / sum_all a) or
            "sigmoid" (a_i = sigmoid(z_i)).
        renormalized: Z is the sum over the selected experts (Mixtral, Qwen3 `norm_topk_prob`,
            DeepSeek-V3, GPT-OSS's softmax over the top-k logits, megatron-core without
            pre-softmax); False: the score's own normaliser (softmax: all experts; sigmoid: 1).
        scale: the route scale s (megatron-core's `moe_router_topk_scaling_factor`, torchtitan's
            `route_scale`).

    The dense output (every expert selected) is s * sum_i w_i E_i(x) with the dense weights
    w_i = a_i / sum_j a_j when the gate normalises (softmax, or renormalised) and w_i = a_i when it
    does not (plain sigmoid). Default MoE stands D_i in for E_i(x) of the experts that did not run:

        not renormalised:  y = y_S + s * sum_{i not run} w_i D_i                  (the paper)
        renormalised:      y = y_S + sum_{i not run} w_i (s D_i - y_S)

    (y_S: the model's own routed output.) The second is the first written for a gate whose Z is
    over the selected experts: it equals s * sum_i w_i E^_i exactly, and it is zero when
    s D_i = y_S, the default renormalisation implicitly assumes. An expert with no committed D
    yet (its row still zero) keeps that implicit default, so a renormalising model converted at
    D = 0 computes what it did.
    """

    score_function: str = "softmax"
    renormalized: bool = False
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"GateForm.score_function must be one of {list(SCORE_FUNCTIONS)}, got {self.score_function!r}")

    @classmethod
    def from_config(cls, config) -> "GateForm":
        return cls(config.score_function, bool(config.normalize_topk), float(config.route_scale))

    @property
    def forward_default(self) -> bool:
        """Whether the default term is in the forward when `default_in_forward` is None (auto):
        yes for softmax gates (the paper); no for sigmoid gates, whose dense mixture gives the
        unselected experts most of the mass (with 256 experts and top-8 the selected ones hold a
        few percent of sum_j sigmoid(z_j)), so the term would replace the model's output by D."""
        return self.score_function == "softmax"

    def dense_weights(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32 w_i from the router scores (pi, or sigmoid(z); any per-token factor of a
        renormalised gate's scores cancels)."""
        w_TE = scores_TE.float()
        if self.renormalized:
            w_TE = w_TE / w_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return w_TE


def dense_scores(logits_TE: torch.Tensor, score_function: str = "softmax") -> torch.Tensor:
    """The router scores of ALL experts in fp32 with autocast off (routing is precision
    sensitive): pi = softmax(logits), or sigmoid(logits)."""
    with torch.autocast(device_type=logits_TE.device.type, enabled=False):
        if score_function == "softmax":
            return torch.softmax(logits_TE.float(), dim=-1)
        if score_function == "sigmoid":
            return torch.sigmoid(logits_TE.float())
    raise ValueError(f"score function must be one of {list(SCORE_FUNCTIONS)}, got {score_function!r}")


def dense_softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    """pi = softmax over ALL experts, fp32, outside autocast."""
    return dense_scores(logits_TE, "softmax")


def ran_mask(num_experts: int, idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, E] bool: the experts that processed each token (selected and not dropped over capacity)."""
    if keep_TK is None:  # dropless: one scatter (two ops where counting takes four)
        return torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.bool, device=idx_TK.device).scatter_(1, idx_TK, True)
    # Counted, not scattered: a dropped route may share its (placeholder) expert id with a kept one.
    ran = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.int32, device=idx_TK.device).scatter_add(
        1, idx_TK, keep_TK.to(torch.int32)
    )
    return ran > 0


class _DenseRouterGradient(torch.autograd.Function):
    """Identity on the layer output; the backward gives the default term's weights their gradient:
    dL/dw_TE = grad_TD @ sD_ED^T, and for a renormalised gate dL/dwY_TE = -grad . routed (the
    weights of the experts not selected, whose y_S the term replaces)."""

    @staticmethod
    def forward(ctx, out_TD, w_TE, sD_ED, routed_TD, wY_TE):
        # wY_TE None with routed_TD: the y_S part's weights are w_TE's (dropless; one tensor
        # passed once: dynamo refuses the same tensor as two inputs of a Function).
        ctx.wY_is_w = wY_TE is None
        ctx.save_for_backward(sD_ED, routed_TD)
        return out_TD.view_as(out_TD)

    @staticmethod
    def backward(ctx, grad_TD):
        sD_ED, routed_TD = ctx.saved_tensors
        grad_w = grad_wY = None
        g = grad_TD.float()
        minus_gy = None if routed_TD is None else -(g * routed_TD.float()).sum(-1, keepdim=True)
        if ctx.needs_input_grad[1]:
            grad_w = g @ sD_ED.t()
            if minus_gy is not None and ctx.wY_is_w:  # dropless: the same experts in both parts
                grad_w = grad_w + minus_gy
        if minus_gy is not None and not ctx.wY_is_w and ctx.needs_input_grad[4]:
            grad_wY = minus_gy.expand(-1, sD_ED.shape[0])
        return grad_TD, grad_w, None, None, grad_wY


@dataclass
class DefaultsForward:
    """What one forward may do (from `ExpertDefaults.begin_forward`)."""

    # A training forward with grad enabled, not frozen, of a layer with a trainable parameter: its
    # statistics are accumulated when its backward reaches the layer.
    collect: bool
    # Optional [T] bool: tokens that count (False: padding).
    mask_T: Optional[torch.Tensor] = None


class ExpertDefaults(StepState):
    """Holds `defaults_ED` (committed D) and the statistics accumulated toward the next commit.

    Args:
        num_experts: E.
        hidden_size: D.
        beta: EMA decay in [0, 1).
        weighting: "mean" or "prob" (pi-weighted mean).
        stats_dtype: "float32" or "bfloat16" (dtype of the all-reduced sums; counts stay fp32).
        nonfinite: "skip" or "raise".
        name: the layer's name, for messages.
        stale_defaults: "keep", "zero" or "mean": what D_i of an expert that received no token
            does at a commit (see `MoEConfig.stale_defaults`).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        beta: float,
        weighting: str,
        stats_dtype: str = "float32",
        nonfinite: str = "skip",
        name: str = "",
        stale_defaults: str = "keep",
    ) -> None:
        super().__init__(name)
        self.beta, self.weighting, self.stats_dtype, self.nonfinite = beta, weighting, stats_dtype, nonfinite
        self.stale_defaults = stale_defaults
        self.gate = GateForm()
        self.default_in_forward = True
        self.register_buffer("defaults_ED", torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        # Per-expert (sum of raw outputs, weight) since the last commit: local, on the device.
        self.register_buffer("stats_ED1", torch.zeros(num_experts, hidden_size + 1, dtype=torch.float32), persistent=False)
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)
        # Consecutive commits at which each expert received no token (diagnostics: which part of
        # the default term comes from experts the router stopped using).
        self.register_buffer("idle_commits_E", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        # The last commit's batch means and which experts it saw (diagnostics only).
        self.register_buffer("last_batch_mean_ED", None, persistent=False)
        self.register_buffer("last_seen_E", None, persistent=False)
        # The default term's weight in the forward (D annealing, `set_forward_scale`): 1 the
        # paper's term, 0 its router gradient only. A buffer, so a changing value recompiles nothing.
        self.register_buffer("forward_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self._annealing = False

    @classmethod
    def from_config(
        cls,
        config,
        num_experts: Optional[int] = None,
        hidden_size: Optional[int] = None,
        name: str = "",
        gate: Optional[GateForm] = None,
    ) -> "ExpertDefaults":
        """From a `MoEConfig` (sizes may come from the host model, e.g. Megatron's config; the
        gate form from the host router where it differs from the config's)."""
        self = cls(
            num_experts or config.num_experts, hidden_size or config.hidden_size, config.beta, config.ema_weighting, name=name
        )
        self.configure(config, gate)
        return self

    def configure(self, config, gate: Optional[GateForm] = None) -> None:
        """Applies a (re)config's EMA settings and gate form; the defaults themselves are kept."""
        self.beta, self.weighting = config.beta, config.ema_weighting
        self.stats_dtype, self.nonfinite = config.ema_stats_dtype, config.nonfinite
        self.stale_defaults = config.stale_defaults
        self.gate = gate if gate is not None else GateForm.from_config(config)
        in_forward = config.default_in_forward
        self.default_in_forward = self.gate.forward_default if in_forward is None else in_forward

    # ---- the mechanism every adapter calls ----

    # Which adapters went through the mechanism (class names), for the test that each one does.
    callers: "set[str]" = set()

    def begin_forward(self, training: bool, caller: str = "", mask_T: Optional[torch.Tensor] = None) -> DefaultsForward:
        """Whether this forward collects statistics: a training forward with grad enabled, not
        frozen (diagnostics), of a layer that has a trainable parameter. A recompute collects too:
        only the forward whose backward reaches the layer counts (see the module docstring).

        Args:
            mask_T: optional [T] bool, False for tokens that must not count (padding).
        """
        # A Python set mutated under torch.compile is a graph break on torch 2.11 ("Unsupported
        # method call", set.__setitem__): record eager calls only (the record is for tests).
        if caller and not torch.compiler.is_compiling():
            ExpertDefaults.callers.add(caller)
        return DefaultsForward(collect=self.collects(training), mask_T=mask_T)

    def observe(
        self,
        fwd: DefaultsForward,
        y_TKD: torch.Tensor,
        idx_TK: torch.Tensor,
        probs_TK: torch.Tensor,
        keep_TK: Optional[torch.Tensor],
        anchor: Optional[torch.Tensor] = None,
        carrier: Optional[torch.Tensor] = None,
        counts_E: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """Statistics of the raw outputs per (token, slot), accumulated when the backward reaches
        `anchor` (a tensor the layer's output depends on: the router probabilities, or the full
        expert outputs), else `y_TKD`, whichever needs a gradient. The reduction group is the one
        the adapter bound (`bind`). Returns `carrier` to go on with (see
        `StepState.collect_on_backward`: under torch.compile, the statistics ride on it).
        `counts_E`: optional kept slots per expert the caller already counted (the dispatcher's),
        the weights of weighting="mean" without a padding mask (saves a count)."""
        if not fwd.collect:
            return carrier
        mask_TK = None
        if fwd.mask_T is not None:
            mask_TK = fwd.mask_T.reshape(-1, 1).to(idx_TK.device).expand_as(idx_TK)
        stats_E_D1 = self.local_statistics(y_TKD, idx_TK, probs_TK, keep_TK, mask_TK, counts_E)
        return self.collect_on_backward(stats_E_D1, anchor, y_TKD, carrier=carrier)

    def observe_rows(
        self,
        fwd: DefaultsForward,
        y_ND: torch.Tensor,
        expert_N: torch.Tensor,
        probs_N: torch.Tensor,
        count_weights: bool = True,
        keep_N: Optional[torch.Tensor] = None,
        anchor: Optional[torch.Tensor] = None,
        carrier: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """As `observe`, from raw output rows with their (global) expert ids.

        Args:
            count_weights: False on a rank whose rows another rank of the group also holds as
                partial sums (expert tensor parallelism: every expert-TP rank holds the same rows,
                each a partial sum of the output). The sums then add up to the full outputs and
                the weights (counts) are contributed once, by the rank that passes True.
            keep_N: optional [N] bool, rows that count (False: padding).
            carrier: as in `observe`; returned.
        """
        if not fwd.collect:
            return carrier
        mask = keep_N[:, None] if keep_N is not None else None
        stats_E_D1 = self.local_statistics(y_ND[:, None], expert_N[:, None], probs_N[:, None], None, mask)
        if not count_weights:
            stats_E_D1[:, -1] = 0
        return self.collect_on_backward(stats_E_D1, anchor, y_ND, carrier=carrier)

    def default_term(
        self,
        fwd: Optional[DefaultsForward],
        scores_TE: torch.Tensor,
        ran_TE: torch.Tensor,
        routed_TD: Optional[torch.Tensor] = None,
        selected: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The default term for this layer's gate form (`GateForm`), [T, D] fp32, with the
        committed D (the same in every forward and recompute until the next optimizer step):

            s * sum_{i not run} w_i D_i                 (gates not renormalised: the paper)
            s * sum_{i not run} w_i D_i - sum_{i not selected} w_i routed_TD
                                                        (renormalised; experts without D skipped)

        A renormalised gate's Z is over the *selected* experts, dropped ones included, so y_S
        already carries their share of the normaliser: only the unselected experts' w_i y_S is
        replaced (with drops, "not run" and "not selected" differ; without, they are the same).

        Args:
            scores_TE: the router scores of all experts (pi, or sigmoid(z)), differentiable.
            ran_TE: bool, the experts that processed each token.
            routed_TD: the routed output y_S (selected experts times their gates, route scale
                included; no shared experts); needed by renormalised gates.
            selected: the experts selected before capacity drops, [T, K] ids or a [T, E] bool
                map; needed by a renormalised gate whose layer drops (None: `ran_TE` stands for
                the selection).
        """
        if self.gate.renormalized and routed_TD is None:
            raise ValueError("a renormalised gate's default term needs the routed output (routed_TD)")
        if routed_TD is not None and not self.default_in_forward:
            routed_TD = routed_TD.detach()
        term_TD = self.term(scores_TE, ran_TE, routed_TD, selected_TK=selected)
        if not self.default_in_forward:
            term_TD = term_TD - term_TD.detach()  # zero in the forward, the router's dense gradient
        elif self._annealing:
            term_TD = self._annealed(term_TD)
        return term_TD

    def set_forward_scale(self, scale: float) -> None:
        """D annealing: the default term enters the forward with weight `scale` in [0, 1] (its
        router gradient unchanged), for a model trained with D in the forward that should end as
        the plain top-k model a serving runtime computes (at 0 the forward adds exactly zero)."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"the default term's forward scale must be in [0, 1], got {scale!r}")
        self.forward_scale.fill_(scale)
        self._annealing = scale < 1.0

    def _annealed(self, term_TD: torch.Tensor) -> torch.Tensor:
        # Value scale * term, gradient the term's: term - (1 - scale) * term.detach().
        return term_TD - (1.0 - self.forward_scale) * term_TD.detach()

    def term_in_forward(self) -> bool:
        """Whether this layer's forward output includes the default term now (D in the forward, a
        nonzero D, not annealed to 0). Reads the device (a host sync)."""
        return bool(self.default_in_forward and self.defaults_ED.ne(0).any() and float(self.forward_scale) > 0)

    def add_default_term(
        self,
        out_TD: torch.Tensor,
        scores_TE: torch.Tensor,
        ran_TE: Optional[torch.Tensor],
        routed_TD: Optional[torch.Tensor] = None,
        selected_TK: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`out_TD + default_term(...)` in `out_TD`'s dtype. With the term out of the forward
        (`default_in_forward` false) no [T, D] term is made: `out_TD` passes through a Function
        whose backward gives the weights their gradient, grad . (s D_i - routed) (one GEMM; the
        difference `term - term.detach()` costs a GEMM and two [T, D] passes more).

        Args:
            ran_TE: bool, the experts that processed each token; or None with `selected_TK`, the
                [T, K] experts of a dropless layer (they all ran: one scatter, no [T, E] mask).
        """
        if self.gate.renormalized and routed_TD is None:
            raise ValueError("a renormalised gate's default term needs the routed output (routed_TD)")
        if self.default_in_forward:
            term_TD = self.term(scores_TE, ran_TE, routed_TD, selected_TK=selected_TK)
            if self._annealing:
                term_TD = self._annealed(term_TD)
            return out_TD + term_TD.to(out_TD.dtype)
        with torch.autocast(device_type=scores_TE.device.type, enabled=False):
            w_TE = self._masked_weights(scores_TE, ran_TE, selected_TK=selected_TK)
            # Renormalised with drops: the y_S part's own weights; dropless: w_TE's (None here).
            wY_TE = None
            if self.gate.renormalized and ran_TE is not None:
                wY_TE = self._unselected_weights(scores_TE, ran_TE, selected_TK)
        routed = routed_TD.detach() if self.gate.renormalized else None
        return _DenseRouterGradient.apply(out_TD, w_TE, self.defaults_ED * self.gate.scale, routed, wY_TE)

    def _unselected_weights(
        self,
        scores_TE: torch.Tensor,
        ran_TE: Optional[torch.Tensor],
        selected_TK: Optional[torch.Tensor],
        only_E: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """A renormalised gate's [T, E] weights of the experts whose y_S the term replaces: not
        selected (dropped ones are selected: Z counts them), with a committed D (and in `only_E`)."""
        if selected_TK is None:  # no drops known: the experts that ran are the selected ones
            return self._masked_weights(scores_TE, ran_TE, only_E)
        if selected_TK.dtype == torch.bool:  # a [T, E] selection map (megatron's routing map)
            return self._masked_weights(scores_TE, selected_TK, only_E)
        return self._masked_weights(scores_TE, None, only_E, selected_TK)

    def _masked_weights(
        self,
        scores_TE: torch.Tensor,
        ran_TE: Optional[torch.Tensor],
        only_E: Optional[torch.Tensor] = None,
        selected_TK: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The term's [T, E] fp32 weights: w of the experts that did not run (and have a D, for
        renormalised gates; of `only_E` when given). The experts that ran: `ran_TE`, or when it is
        None, `selected_TK` (dropless)."""
        w_TE = self.gate.dense_weights(scores_TE)
        w_TE = w_TE.scatter(1, selected_TK, 0.0) if ran_TE is None else w_TE.masked_fill(ran_TE, 0.0)
        if self.gate.renormalized:
            # Experts without a committed D keep the default renormalisation assumes (y_S).
            w_TE = w_TE * self.defaults_ED.ne(0).any(dim=1)
        if only_E is not None:
            w_TE = w_TE * only_E
        return w_TE

    def term(
        self,
        scores_TE: torch.Tensor,
        ran_TE: Optional[torch.Tensor],
        routed_TD: Optional[torch.Tensor],
        only_E: Optional[torch.Tensor] = None,
        selected_TK: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The gate form's term as a value, [T, D] fp32 (`default_term` without the
        `default_in_forward` handling; diagnostics call it too).

        Args:
            only_E: optional [E] bool, the experts whose part is wanted (None: all).
            selected_TK: the experts that ran when `ran_TE` is None (`_masked_weights`).
        """
        gate = self.gate
        with torch.autocast(device_type=scores_TE.device.type, enabled=False):
            w_TE = self._masked_weights(scores_TE, ran_TE, only_E, selected_TK)
            term_TD = w_TE @ self.defaults_ED
            if gate.scale != 1.0:
                term_TD = term_TD * gate.scale
            if gate.renormalized:
                # Dropless (ran_TE None) or no selection known: the experts that ran are the selected.
                wY_TE = w_TE if ran_TE is None else self._unselected_weights(scores_TE, ran_TE, selected_TK, only_E)
                term_TD = term_TD - wY_TE.sum(-1, keepdim=True) * routed_TD.float()
        return term_TD

    def local_statistics(
        self,
        y_TKD: torch.Tensor,
        idx_TK: torch.Tensor,
        probs_TK: torch.Tensor,
        keep_TK: Optional[torch.Tensor],
        mask_TK: Optional[torch.Tensor] = None,
        counts_E: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Per-expert weighted sums of raw outputs and the weights, as one [E, D+1] fp32 tensor.

        Args:
            y_TKD: raw expert outputs per token and slot.
            idx_TK: the slots' experts.
            probs_TK: the slots' router probabilities pi (weights when weighting="prob").
            keep_TK: slots that reached their expert (None: all); a dropped slot's output is 0.
            mask_TK: slots of tokens that count (None: all); a masked (padding) slot's output is
                not 0, so it is zeroed.
            counts_E: optional kept slots per expert; with weighting="mean" and no mask they are
                the weights (no second scatter).
        """
        E, D = self.defaults_ED.shape
        y_SD = y_TKD.detach().reshape(-1, D).float()
        idx_S = idx_TK.reshape(-1)
        if counts_E is not None and self.weighting == "mean" and mask_TK is None:
            # The weights are the kept slots per expert; dropped slots' outputs are already 0.
            sums_ED = torch.zeros(E, D, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, y_SD)
            return torch.cat([sums_ED, counts_E.to(torch.float32)[:, None]], dim=1)
        w_S = probs_TK.detach().reshape(-1).float() if self.weighting == "prob" else y_SD.new_ones(idx_S.numel())
        for m in (keep_TK, mask_TK):
            if m is not None:
                w_S = w_S * m.reshape(-1)
        # The outputs are scaled (a copy of y) only when a weight can be other than 0/1 on a
        # nonzero row: pi weighting, or padding; dropped slots are already 0.
        if self.weighting == "prob" or mask_TK is not None:
            y_SD = y_SD * w_S[:, None]
        # Accumulate into contiguous tensors (a strided [:, :D] view makes index_add ~5x slower).
        sums_ED = torch.zeros(E, D, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, y_SD)
        weight_E = torch.zeros(E, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, w_S)
        return torch.cat([sums_ED, weight_E[:, None]], dim=1)

    def accumulator(self) -> torch.Tensor:
        return self.stats_ED1

    def reduce_parts(self) -> List[torch.Tensor]:
        if self.stats_dtype == "bfloat16":
            # Sums rounded even without a group, so the setting means the same thing at every
            # world size; the counts stay fp32 (bf16 is exact only up to 256).
            return [self.stats_ED1[:, :-1].reshape(-1).to(torch.bfloat16), self.stats_ED1[:, -1].clone()]
        return [self.stats_ED1.reshape(-1).clone()]

    def commit_parts(self, parts: List[torch.Tensor]) -> None:
        E, D1 = self.stats_ED1.shape
        if len(parts) == 2:
            stats = torch.cat([parts[0].float().view(E, D1 - 1), parts[1].view(E, 1)], dim=1)
        else:
            stats = parts[0].view(E, D1)
        self.commit(stats)

    @torch.no_grad()
    def commit(self, stats_E_D1: torch.Tensor) -> None:
        """Commits all-reduced statistics: D <- beta D + (1 - beta) mean, for experts that saw
        tokens (and finite outputs); clears the accumulator. Called by `commit_defaults`."""
        D = self.defaults_ED.shape[1]
        weight_E = stats_E_D1[:, D]
        # A non-finite statistic (an expert output overflowed somewhere in the group) never
        # enters the defaults: that expert keeps its D. Counted without a host sync unless asked
        # to raise.
        finite_E = torch.isfinite(stats_E_D1).all(dim=1)
        if self.nonfinite == "raise" and not bool(finite_E.all()):
            bad = (~finite_E).nonzero().flatten().tolist()
            self._clear()
            raise FloatingPointError(
                f"non-finite expert outputs for expert(s) {bad} in MoE layer {self.name or '(unnamed)'} at EMA commit "
                f"{self.num_updates + 1} (MoEConfig.nonfinite='raise'; 'skip' keeps those experts' defaults instead)"
            )
        self.nonfinite_skips += (~finite_E).sum()
        seen_E = (weight_E > 0) & finite_E
        mean_ED = torch.nan_to_num(stats_E_D1[:, :D] / weight_E.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
        new_ED = self.beta * self.defaults_ED + (1.0 - self.beta) * mean_ED
        if self.gate.renormalized:
            # A renormalised gate's default starts at the first mean, not at beta * 0 + ...: a
            # zero D would pull the output toward zero where the model assumed y_S.
            new_ED = torch.where(self.defaults_ED.ne(0).any(dim=1, keepdim=True), new_ED, mean_ED)
        kept_ED = self.defaults_ED
        if self.stale_defaults != "keep":
            # An expert that received no token (and no non-finite output) moves toward its target
            # at the EMA rate instead of keeping a D that no longer describes any routed token.
            idle_E = (weight_E == 0) & finite_E
            if self.stale_defaults == "zero":
                target_ED = torch.zeros_like(self.defaults_ED)
            else:  # the mean of the other experts' defaults
                E = self.defaults_ED.shape[0]
                total_D = self.defaults_ED.sum(0, keepdim=True)
                target_ED = (total_D - self.defaults_ED) / max(E - 1, 1)
            decayed_ED = self.beta * self.defaults_ED + (1.0 - self.beta) * target_ED
            kept_ED = torch.where(idle_E[:, None], decayed_ED, self.defaults_ED)
        # A commit with no statistics anywhere in the group (an optimizer step with no training
        # forward since the last one) is no step of this layer: nothing decays, nothing is idle.
        # Decided on the device from the reduced weights (the same on every rank; no host sync).
        empty = (weight_E.sum() == 0) & finite_E.all()
        kept_ED = torch.where(empty, self.defaults_ED, kept_ED)
        # In place: the buffer object stays the one engines and optimisers may hold.
        self.defaults_ED.copy_(torch.where(seen_E[:, None], new_ED, kept_ED))
        idle_E = torch.where(weight_E > 0, torch.zeros_like(self.idle_commits_E), self.idle_commits_E + 1)
        self.idle_commits_E.copy_(torch.where(empty, self.idle_commits_E, idle_E))
        self.num_updates += 1
        self.last_batch_mean_ED, self.last_seen_E = mean_ED, seen_E
        self._clear()

    def _apply(self, fn, *args, **kwargs):
        # Follow device moves but stay fp32: a bf16 EMA would lose the small (1 - beta) updates.
        # The fp32 originals are moved, never converted and back (that would round D).
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.dtype == torch.float32}
        super()._apply(fn, *args, **kwargs)
        for n, b in fp32.items():
            moved = self._buffers[n]
            if moved.dtype != torch.float32:
                self._buffers[n] = b.to(device=moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "defaults_ED"
        if key not in state_dict:
            # A checkpoint from before Default MoE was switched on: start from zero defaults (the
            # paper's initialisation) instead of failing a strict load; said, never silent, since
            # the same absence is what a filter that dropped D on the way looks like.
            warnings.warn(
                f"{key} is not in the loaded state: Default MoE starts from zero defaults. Right for a checkpoint "
                "written before Default MoE was switched on; if it was written with Default MoE, D was filtered out on "
                "the way (DeepSpeed engines restore it from default_moe_defaults.pt)",
                stacklevel=3,
            )
            state_dict[key] = torch.zeros_like(self.defaults_ED)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        E, D = self.defaults_ED.shape
        return (
            f"num_experts={E}, hidden_size={D}, beta={self.beta}, weighting={self.weighting}, gate={self.gate}, "
            f"default_in_forward={self.default_in_forward}, stale_defaults={self.stale_defaults}, "
            f"stats_dtype={self.stats_dtype}, nonfinite={self.nonfinite}, committed_by={self.committed_by}"
        )


# ---- the commit: once per optimizer step, every layer, one bucketed all-reduce per group ----


def defaults_in(modules: Union[nn.Module, Iterable[nn.Module]]) -> List[ExpertDefaults]:
    """The `ExpertDefaults` of `modules` (a module, or several: pipeline chunks), in module order."""
    return step_states_in(modules, ExpertDefaults)


def commit_defaults(modules: Union[nn.Module, Iterable[nn.Module]]) -> int:
    """Commits the EMA of every Default MoE layer in `modules` — and every other step state there
    (the aux-loss-free expert bias): call once per optimizer step, on every rank of the layers'
    reduction groups (a collective), or let a step hook call it (see the module docstring).

    The statistics of all layers sharing a reduction group travel in one all-reduce (fp32), or
    two with `ema_stats_dtype="bfloat16"` (bf16 sums, fp32 counts). Returns the number of states.
    """
    return commit_step_state(modules)
