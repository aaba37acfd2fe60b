"""Default MoE's one mechanism: the default term, the EMA defaults and the step contract. Every
adapter (our `MoELayer`, DeepSpeed-MoE, AutoEP, megatron-core, HF) calls it with tensors it
already has and adds the returned term; none re-implements any of it.

    fwd = defaults.begin_forward(training)                               # may this forward collect?
    defaults.observe(fwd, y_TKD, idx_TK, probs_TK, keep_TK)              # statistics, on the device
    (or observe_rows(fwd, y_ND, expert_N, probs_N) for per-expert rows)
    out += defaults.default_term(probs_TE, ran_TE)                       # (probs_TE * ~ran_TE) @ D
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
pi-weighted); experts that received no token keep D_i. Where it is called:
- any `torch.optim.Optimizer` step (a process-wide step pre-hook) commits the layers whose
  parameters that optimizer holds, unless an engine hook owns the layer (plain loops, DDP,
  FSDP2, accelerate and the HF Trainer without DeepSpeed);
- DeepSpeed engines built by our `initialize`: `engine.step()` at the accumulation boundary;
- megatron-core: `finalize_model_grads`, where megatron-core updates its router expert bias;
- anything else: `commit_defaults(model)` once per optimizer step, on every rank of the group.
Statistics pending for `PENDING_WARN_AFTER` micro-batches without a commit warn (a forgotten
step hook never fails silently); a state dict saved with pending statistics warns that they
are not in it (save after the optimizer step).

- `dense_softmax(logits)`: pi = softmax over ALL experts in fp32, autocast off;
  `check_score_function(name, where)` refuses anything else (sigmoid scores would add ~0.5 D_i
  for every unselected expert) by name.
- Non-finite statistics (`nonfinite`): "skip" leaves that expert's D unchanged at the commit
  (counted in `nonfinite_skips`); "raise" raises FloatingPointError naming the layer and experts.

Every tensor the module holds is a buffer (the accumulator and counters non-persistent), so
`.to(device)` moves all of it; D stays fp32 through `.to(dtype)` without a round trip through the
lower precision.

Legend: T tokens, K top-k, E experts, D hidden, S token slots.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from default_moe import comm
from default_moe.layer_utils import state_frozen

Groups = Union[None, dist.ProcessGroup, Sequence[Optional[dist.ProcessGroup]]]
# Micro-batches of statistics without a commit before `ExpertDefaults` warns once.
PENDING_WARN_AFTER = 1024


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

    # A training forward with grad enabled, not frozen, of a layer with a trainable parameter: its
    # statistics are accumulated when its backward reaches the layer.
    collect: bool
    # Optional [T] bool: tokens that count (False: padding).
    mask_T: Optional[torch.Tensor] = None


def _as_groups(groups: Groups) -> List[Optional[dist.ProcessGroup]]:
    if groups is None or isinstance(groups, dist.ProcessGroup):
        return [groups]
    return list(groups)


# Every ExpertDefaults ever built, in construction order (the same order on every rank, so the
# process-wide optimizer hook commits them in the same order everywhere).
_LIVE: List["weakref.ref[ExpertDefaults]"] = []
_LIVE_LOCK = threading.Lock()


class ExpertDefaults(nn.Module):
    """Holds `defaults_ED` (committed D) and the statistics accumulated toward the next commit.

    Args:
        num_experts: E.
        hidden_size: D.
        beta: EMA decay in [0, 1).
        weighting: "mean" or "prob" (pi-weighted mean).
        stats_dtype: "float32" or "bfloat16" (dtype of the all-reduced sums; counts stay fp32).
        nonfinite: "skip" or "raise".
        name: the layer's name, for messages.
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
    ) -> None:
        super().__init__()
        self.beta, self.weighting, self.stats_dtype, self.nonfinite, self.name = beta, weighting, stats_dtype, nonfinite, name
        self.default_in_forward = True
        self.register_buffer("defaults_ED", torch.zeros(num_experts, hidden_size, dtype=torch.float32))
        # Per-expert (sum of raw outputs, weight) since the last commit: local, on the device.
        self.register_buffer("stats_ED1", torch.zeros(num_experts, hidden_size + 1, dtype=torch.float32), persistent=False)
        self.register_buffer("nonfinite_skips", torch.zeros((), dtype=torch.long), persistent=False)
        # The last commit's batch means and which experts it saw (diagnostics only).
        self.register_buffer("last_batch_mean_ED", None, persistent=False)
        self.register_buffer("last_seen_E", None, persistent=False)
        self.num_updates = 0  # commits that applied statistics
        self.pending = 0  # micro-batches accumulated since the last commit (counted in backward)
        self._warned_pending = False
        self._lock = threading.Lock()
        # Set by the adapter (`bind`): the layer (trainable check, optimizer matching), the
        # reduction group(s) or a function returning them, and who commits ("optimizer": any torch
        # optimizer holding the layer's parameters; an engine name: that engine's hook).
        self._layer: Optional[Callable[[], Optional[nn.Module]]] = None
        self._reduce_over: Union[Groups, Callable[[], Groups]] = None
        self.committed_by = "optimizer"
        with _LIVE_LOCK:
            _LIVE.append(weakref.ref(self))

    @classmethod
    def from_config(cls, config, num_experts: Optional[int] = None, hidden_size: Optional[int] = None,
                    name: str = "") -> "ExpertDefaults":
        """From a `MoEConfig` (sizes may come from the host model, e.g. Megatron's config)."""
        self = cls(num_experts or config.num_experts, hidden_size or config.hidden_size, config.beta,
                   config.ema_weighting, name=name)
        self.configure(config)
        return self

    def configure(self, config) -> None:
        """Applies a (re)config's EMA settings; the defaults themselves are kept."""
        self.beta, self.weighting = config.beta, config.ema_weighting
        self.stats_dtype, self.nonfinite = config.ema_stats_dtype, config.nonfinite
        self.default_in_forward = config.default_in_forward

    def bind(self, layer: Optional[nn.Module] = None, reduce_over: Union[Groups, Callable[[], Groups]] = None) -> "ExpertDefaults":
        """Tells the mechanism its layer and the group(s) its statistics are summed over.

        Args:
            layer: the MoE layer (its parameters decide whether it trains, and which optimizer's
                step commits it). Held weakly.
            reduce_over: a process group, a sequence of groups (summed over each in turn: the
                sum over their product), or a function returning either, called at each commit.
        """
        if layer is not None:
            self._layer = weakref.ref(layer)
        self._reduce_over = reduce_over
        return self

    def layer(self) -> Optional[nn.Module]:
        return self._layer() if self._layer is not None else None

    def reduction_groups(self) -> List[Optional[dist.ProcessGroup]]:
        """The groups with more than one rank the statistics are summed over, in order."""
        groups = self._reduce_over() if callable(self._reduce_over) else self._reduce_over
        return [g for g in _as_groups(groups) if comm.group_size(g) > 1]

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
        if caller:
            ExpertDefaults.callers.add(caller)
        collect = training and torch.is_grad_enabled() and not state_frozen()
        if collect:
            layer = self.layer()
            collect = layer is None or any(p.requires_grad for p in layer.parameters())
        return DefaultsForward(collect=collect, mask_T=mask_T)

    def observe(self, fwd: DefaultsForward, y_TKD: torch.Tensor, idx_TK: torch.Tensor, probs_TK: torch.Tensor,
                keep_TK: Optional[torch.Tensor], groups: Groups = None, anchor: Optional[torch.Tensor] = None) -> None:
        """Statistics of the raw outputs per (token, slot), accumulated when the backward reaches
        `anchor` (a tensor the layer's output depends on: the router probabilities, or the full
        expert outputs), else `y_TKD`, whichever needs a gradient.

        Args:
            groups: if given, the reduction group(s) from now on (as `bind`).
        """
        if groups is not None:
            self._reduce_over = groups
        if not fwd.collect:
            return
        if fwd.mask_T is not None:
            mask_TK = fwd.mask_T.reshape(-1, 1).to(idx_TK.device).expand_as(idx_TK)
            keep_TK = mask_TK if keep_TK is None else keep_TK & mask_TK
        self._collect_on_backward(self.local_statistics(y_TKD, idx_TK, probs_TK, keep_TK), y_TKD, anchor)

    def observe_rows(self, fwd: DefaultsForward, y_ND: torch.Tensor, expert_N: torch.Tensor,
                     probs_N: torch.Tensor, groups: Groups = None, count_weights: bool = True,
                     keep_N: Optional[torch.Tensor] = None, anchor: Optional[torch.Tensor] = None) -> None:
        """As `observe`, from raw output rows with their (global) expert ids.

        Args:
            count_weights: False on a rank whose rows another rank of the group also holds as
                partial sums (expert tensor parallelism: every expert-TP rank holds the same rows,
                each a partial sum of the output). The sums then add up to the full outputs and
                the weights (counts) are contributed once, by the rank that passes True.
            keep_N: optional [N] bool, rows that count (False: padding).
        """
        if groups is not None:
            self._reduce_over = groups
        if not fwd.collect:
            return
        keep = keep_N[:, None] if keep_N is not None else None
        stats_E_D1 = self.local_statistics(y_ND[:, None], expert_N[:, None], probs_N[:, None], keep)
        if not count_weights:
            stats_E_D1[:, -1] = 0
        self._collect_on_backward(stats_E_D1, y_ND, anchor)

    def default_term(self, fwd: Optional[DefaultsForward], probs_TE: torch.Tensor, ran_TE: torch.Tensor) -> torch.Tensor:
        """sum over experts that did not process the token of pi_i * D_i: [T, D] fp32, with the
        committed D (the same in every forward and recompute until the next optimizer step).

        Args:
            probs_TE: pi, the fp32 softmax over all experts (differentiable).
            ran_TE: bool, the experts that processed each token.
        """
        with torch.autocast(device_type=probs_TE.device.type, enabled=False):
            term_TD = (probs_TE.float() * ~ran_TE) @ self.defaults_ED
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
            keep_TK: slots that count (reached their expert, not padding; None: all).
        """
        E, D = self.defaults_ED.shape
        y_SD = y_TKD.detach().reshape(-1, D).float()
        idx_S = idx_TK.reshape(-1)
        if self.weighting == "prob":
            w_S = probs_TK.detach().reshape(-1).float()
            if keep_TK is not None:
                w_S = w_S * keep_TK.reshape(-1)
        elif keep_TK is not None:
            w_S = keep_TK.reshape(-1).float()
        else:
            w_S = None
        # Sums and weights in one scatter: [S, D+1] rows (weighted output, weight).
        if w_S is None:
            rows_SD1 = torch.cat([y_SD, y_SD.new_ones(idx_S.numel(), 1)], dim=1)
        else:
            rows_SD1 = torch.cat([y_SD * w_S[:, None], w_S[:, None]], dim=1)
        return torch.zeros(E, D + 1, dtype=torch.float32, device=y_TKD.device).index_add_(0, idx_S, rows_SD1)

    def _collect_on_backward(self, stats_E_D1: torch.Tensor, y: torch.Tensor, anchor: Optional[torch.Tensor]) -> None:
        # The anchor first: it must be a tensor the layer's output depends on (a slice of the
        # outputs taken for the statistics is not, and its hook would never fire).
        target = next((t for t in (anchor, y) if t is not None and t.requires_grad), None)
        if target is None:
            return  # no backward can reach this forward: nothing trains through it
        fired = [False]

        def hook(grad):
            # Once per forward, also when a graph is backpropagated twice (retain_graph).
            if not fired[0]:
                fired[0] = True
                self._accumulate(stats_E_D1)

        target.register_hook(hook)

    @torch.no_grad()
    def _accumulate(self, stats_E_D1: torch.Tensor) -> None:
        # Autograd may run this on its device threads (CUDA): one writer at a time.
        with self._lock:
            self.stats_ED1.add_(stats_E_D1.to(self.stats_ED1.device))
            self.pending += 1
            warn = self.pending >= PENDING_WARN_AFTER and not self._warned_pending
            self._warned_pending |= warn
        if warn:
            warnings.warn(
                f"Default MoE layer {self.name or '(unnamed)'}: statistics of {self.pending} micro-batches are pending "
                "without a commit. D changes only at optimizer steps: step a torch optimizer that holds the layer's "
                "parameters, use an engine adapter (DeepSpeed initialize, megatron finalize_model_grads), or call "
                "default_moe.commit_defaults(model) once per optimizer step", stacklevel=2)

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
        # In place: the buffer object stays the one engines and optimisers may hold.
        self.defaults_ED.copy_(torch.where(seen_E[:, None], new_ED, self.defaults_ED))
        self.num_updates += 1
        self.last_batch_mean_ED, self.last_seen_E = mean_ED, seen_E
        self._clear()

    def _clear(self) -> None:
        with self._lock:
            self.stats_ED1.zero_()
            self.pending, self._warned_pending = 0, False

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

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"], state["_layer"], state["_reduce_over"] = None, None, None  # process-local
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        with _LIVE_LOCK:
            _LIVE.append(weakref.ref(self))

    def __deepcopy__(self, memo) -> "ExpertDefaults":
        # A copy of a whole layer (an EMA or reference model, a policy copy in RL) is bound to the
        # copied layer (deepcopy registers the new parent in `memo` before copying its children)
        # and shares the reduction group(s); a copy of the module alone is bound to no layer.
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        skip = ("_lock", "_layer", "_reduce_over")
        state = {k: (copy.deepcopy(v, memo) if k not in skip else None) for k, v in self.__dict__.items()}
        new.__setstate__(state)
        old_layer = self.layer()
        new_layer = memo.get(id(old_layer)) if old_layer is not None else None
        new._layer = weakref.ref(new_layer) if isinstance(new_layer, nn.Module) else None
        new._reduce_over = self._reduce_over
        return new

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.pending:
            warnings.warn(
                f"Default MoE layer {self.name or prefix or '(unnamed)'}: the statistics of {self.pending} micro-batches "
                "since the last optimizer step are not in this state dict (D is committed at the step; save after it)",
                stacklevel=3)
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
        # Statistics accumulated since the last commit belong to the replaced state.
        self._clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        E, D = self.defaults_ED.shape
        return (f"num_experts={E}, hidden_size={D}, beta={self.beta}, weighting={self.weighting}, "
                f"stats_dtype={self.stats_dtype}, nonfinite={self.nonfinite}, committed_by={self.committed_by}")


# ---- the commit: once per optimizer step, every layer, one bucketed all-reduce per group ----


def defaults_in(modules: Union[nn.Module, Iterable[nn.Module]]) -> List[ExpertDefaults]:
    """The `ExpertDefaults` of `modules` (a module, or several: pipeline chunks), in module order."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    found: Dict[int, ExpertDefaults] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, ExpertDefaults):
                found.setdefault(id(m), m)
    return list(found.values())


@torch.no_grad()
def commit_defaults(modules: Union[nn.Module, Iterable[nn.Module]]) -> int:
    """Commits the EMA of every Default MoE layer in `modules`: call once per optimizer step, on
    every rank of the layers' reduction groups (a collective), or let a step hook call it.

    The statistics of all layers sharing a reduction group travel in one all-reduce (fp32), or
    two with `ema_stats_dtype="bfloat16"` (bf16 sums, fp32 counts). Returns the number of layers.
    """
    return _commit(defaults_in(modules))


def _commit(members: Sequence[ExpertDefaults]) -> int:
    buckets: Dict[tuple, tuple] = {}
    for d in members:
        groups = d.reduction_groups()
        key = (tuple(id(g) for g in groups), d.stats_dtype, d.stats_ED1.device)
        buckets.setdefault(key, (groups, []))[1].append(d)
    for (_, stats_dtype, _), (groups, bucket) in buckets.items():
        with torch.no_grad():
            if stats_dtype == "bfloat16":
                # Sums rounded even without a group, so the setting means the same thing at every
                # world size; the counts stay fp32 (bf16 is exact only up to 256).
                parts = [torch.cat([d.stats_ED1[:, :-1].reshape(-1) for d in bucket]).to(torch.bfloat16),
                         torch.cat([d.stats_ED1[:, -1] for d in bucket])]
            else:
                parts = [torch.cat([d.stats_ED1.reshape(-1) for d in bucket])]
            # Over each group in turn: sums over orthogonal groups = the sum over their product.
            for g in groups:
                for t in parts:
                    comm.all_reduce(t, g)
            sums, counts = (parts[0].float(), parts[1]) if len(parts) == 2 else (parts[0], None)
            so, co = 0, 0
            errors = []
            for d in bucket:
                E, D1 = d.stats_ED1.shape
                if counts is None:
                    stats = sums[so:so + E * D1].view(E, D1)
                    so += E * D1
                else:
                    stats = torch.cat([sums[so:so + E * (D1 - 1)].view(E, D1 - 1), counts[co:co + E, None]], dim=1)
                    so, co = so + E * (D1 - 1), co + E
                try:
                    d.commit(stats)
                except FloatingPointError as e:  # every layer commits before the first error is raised
                    errors.append(e)
            if errors:
                raise errors[0]
    return len(members)


def _optimizer_step_pre_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Commits the Default MoE layers this optimizer trains (committed_by="optimizer")."""
    if not _LIVE:
        return
    with _LIVE_LOCK:
        _LIVE[:] = [r for r in _LIVE if r() is not None]
        live = [r() for r in _LIVE]
    candidates = [(d, d.layer()) for d in live if d is not None and d.committed_by == "optimizer"]
    candidates = [(d, layer) for d, layer in candidates if layer is not None]
    if not candidates:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    mine = [d for d, layer in candidates if any(id(p) in ids for p in layer.parameters())]
    if mine:
        _commit(mine)


def attach_to_optimizers() -> None:
    """Installs the process-wide optimizer step pre-hook (idempotent; done at import)."""
    if not _HOOK[0]:
        _HOOK[0] = register_optimizer_step_pre_hook(_optimizer_step_pre_hook)


_HOOK: list = [None]
attach_to_optimizers()
