"""State that changes only at optimizer steps: Default MoE's D (`defaults.ExpertDefaults`) and the
aux-loss-free expert bias (`routing.expert_bias.ExpertBias`).

The step contract. Between two optimizer steps every forward and every activation-checkpoint
recompute sees the same committed state, so a recompute needs no record of its forward. A
training forward only accumulates local statistics (on the device: no collective, no host sync),
and counts when its backward reaches the layer (a one-shot hook on a tensor the layer's output
depends on), so each micro-batch that trains counts exactly once: a forward whose backward never
runs counts nothing, two forwards in one backward count twice, a reentrant checkpoint counts in
its recompute's backward and a non-reentrant one in the original forward's, no-grad and eval
forwards count nothing, and a layer with no trainable parameter collects nothing.

`commit_step_state(modules)` commits every such state in `modules` at the optimizer step: their
accumulators travel in one all-reduce per reduction group and dtype, then each applies its
update. Who calls it: a process-wide `torch.optim` step post-hook, for the layers whose owner parameter
(`owner_parameter`: the first trainable one) the stepping optimizer holds (`committed_by ==
"optimizer"`), so several optimizers splitting a model commit each layer once per step, an engine's own step hook otherwise
(DeepSpeed's `engine.step`, megatron's `finalize_model_grads`), or the user once per step.
"""

from __future__ import annotations

import copy
import threading
import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from default_moe import comm
from default_moe.layer_utils import state_frozen

Groups = Union[None, dist.ProcessGroup, Sequence[Optional[dist.ProcessGroup]]]
# Micro-batches of statistics without a commit before a state warns once.
PENDING_WARN_AFTER = 1024


def _as_groups(groups: Groups) -> List[Optional[dist.ProcessGroup]]:
    if groups is None or isinstance(groups, dist.ProcessGroup):
        return [groups]
    return list(groups)


# Every StepState ever built, in construction order (the same order on every rank, so the
# process-wide optimizer hook commits them in the same order everywhere).
_LIVE: List["weakref.ref[StepState]"] = []
_LIVE_LOCK = threading.Lock()


class StepState(nn.Module):
    """Base of the states committed at optimizer steps. Subclasses own an fp32 accumulator
    buffer and implement `reduce_parts` (flat tensors to all-reduce) and `commit_parts`."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name
        self.num_updates = 0  # commits
        self._pending = 0  # micro-batches accumulated since the last commit (counted in backward)
        # The same count for forwards run under torch.compile (a device counter: no host sync).
        self.register_buffer("pending_compiled", torch.zeros((), dtype=torch.long), persistent=False)
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

    # ---- binding ----

    def bind(self, layer: Optional[nn.Module] = None, reduce_over: Union[Groups, Callable[[], Groups]] = None):
        """Tells the state its layer and the group(s) its statistics are summed over.

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

    # ---- collecting ----

    def collects(self, training: bool) -> bool:
        """A training forward with grad enabled, not frozen (diagnostics), of a layer that has a
        trainable parameter. A recompute collects too: only the forward whose backward reaches
        the layer counts."""
        if not (training and torch.is_grad_enabled() and not state_frozen()):
            return False
        layer = self.layer()
        return layer is None or any(p.requires_grad for p in layer.parameters())

    def collect_on_backward(
        self, stats: torch.Tensor, *anchors: Optional[torch.Tensor], carrier: Optional[torch.Tensor] = None
    ) -> Optional[torch.Tensor]:
        """Adds `stats` to the accumulator when the backward reaches the first anchor that needs
        a gradient (it must be a tensor the layer's output depends on).

        Args:
            carrier: optional tensor the caller goes on computing with (replacing it with the
                return value), on the path from the anchor to the layer's output. Under
                torch.compile the statistics then ride through an autograd Function on it instead
                of a tensor hook, which dynamo cannot trace (a graph break).

        Returns:
            The carrier to use from here on (the same tensor, except under torch.compile).
        """
        target = next((t for t in anchors if t is not None and t.requires_grad), None)
        if target is None:
            return carrier  # no backward can reach this forward: nothing trains through it
        if carrier is not None and carrier.requires_grad and torch.compiler.is_compiling():
            return _CollectInBackward.apply(carrier, stats, self.accumulator(), self.pending_compiled)
        fired = [False]

        def hook(grad):
            # Once per forward, also when a graph is backpropagated twice (retain_graph).
            if not fired[0]:
                fired[0] = True
                self._accumulate(stats)

        target.register_hook(hook)
        return carrier

    @property
    def pending(self) -> int:
        """Micro-batches accumulated since the last commit (reading it syncs with the device)."""
        return self._pending + int(self.pending_compiled)

    def accumulator(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def _accumulate(self, stats: torch.Tensor) -> None:
        # Autograd may run this on its device threads (CUDA): one writer at a time.
        with self._lock:
            acc = self.accumulator()
            acc.add_(stats.to(acc.device))
            self._pending += 1
            warn = self._pending >= PENDING_WARN_AFTER and not self._warned_pending
            self._warned_pending |= warn
        if warn:
            warnings.warn(
                f"{type(self).__name__} of MoE layer {self.name or '(unnamed)'}: statistics of {self.pending} micro-batches "
                "are pending without a commit. It changes only at optimizer steps: step a torch optimizer that holds the "
                "layer's parameters, use an engine adapter (DeepSpeed initialize, megatron finalize_model_grads), or call "
                "default_moe.commit_defaults(model) once per optimizer step",
                stacklevel=2,
            )

    # ---- committing ----

    def reduce_parts(self) -> List[torch.Tensor]:  # pragma: no cover - interface
        """Flat tensors to all-reduce (any dtype; same-dtype parts of a bucket travel together)."""
        raise NotImplementedError

    def commit_parts(self, parts: List[torch.Tensor]) -> None:  # pragma: no cover - interface
        """Applies the all-reduced parts (same shapes as `reduce_parts`) and clears."""
        raise NotImplementedError

    def _clear(self) -> None:
        with self._lock:
            self.accumulator().zero_()
            self.pending_compiled.zero_()
            self._pending, self._warned_pending = 0, False

    # ---- copies, state dicts ----

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lock"], state["_layer"], state["_reduce_over"] = None, None, None  # process-local
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        with _LIVE_LOCK:
            _LIVE.append(weakref.ref(self))

    def __deepcopy__(self, memo) -> "StepState":
        # A copy of a whole layer (an EMA or reference model, a policy copy in RL) is bound to the
        # copied layer (deepcopy registers the new parent in `memo` before copying its children)
        # and shares the reduction group(s); a copy of the module alone is bound to no layer.
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
                f"{type(self).__name__} of MoE layer {self.name or prefix or '(unnamed)'}: the statistics of {self.pending} "
                "micro-batches since the last optimizer step are not in this state dict (it is committed at the step; "
                "save after it)",
                stacklevel=3,
            )
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Statistics accumulated since the last commit belong to the replaced state.
        self._clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _CollectInBackward(torch.autograd.Function):
    """Identity on `anchor`; its backward adds `stats` to `acc` and 1 to `count` (device tensors,
    traceable by torch.compile). The tensors ride on ctx, not `save_for_backward`: the backward
    mutates `acc`, which a saved-tensor version check would refuse on a second backward.
    Without the eager hook's once-flag: a compiled graph backpropagated twice (retain_graph,
    which compiled backward refuses unless `donated_buffer` is off) counts twice."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, stats: torch.Tensor, acc: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        ctx.stats, ctx.acc, ctx.count = stats, acc, count
        return anchor.view_as(anchor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.acc.add_(ctx.stats.to(ctx.acc.device))
        ctx.count.add_(1)
        return grad, None, None, None


def step_states_in(modules: Union[nn.Module, Iterable[nn.Module]], kind: type = StepState) -> List[StepState]:
    """The `kind` states of `modules` (a module, or several: pipeline chunks), in module order."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    found: Dict[int, StepState] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, kind):
                found.setdefault(id(m), m)
    return list(found.values())


@torch.no_grad()
def commit_step_state(modules: Union[nn.Module, Iterable[nn.Module]]) -> int:
    """Commits every step state (D, expert bias) in `modules`: call once per optimizer step, on
    every rank of their reduction groups (a collective), or let a step hook call it.

    The accumulators of all states sharing a reduction group travel in one all-reduce per dtype
    (fp32; plus bf16 with `ema_stats_dtype="bfloat16"`). Returns the number of states.
    """
    return _commit(step_states_in(modules))


@torch.no_grad()
def _commit(members: Sequence[StepState]) -> int:
    buckets: Dict[tuple, tuple] = {}
    for m in members:
        groups = m.reduction_groups()
        key = (tuple(id(g) for g in groups), m.accumulator().device)
        buckets.setdefault(key, (groups, []))[1].append(m)
    errors = []
    for groups, bucket in buckets.values():
        parts = [m.reduce_parts() for m in bucket]
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
        for ps in parts:
            for p in ps:
                by_dtype.setdefault(p.dtype, []).append(p)
        flats = {dt: torch.cat(ts) for dt, ts in by_dtype.items()}
        # Over each group in turn: sums over orthogonal groups = the sum over their product.
        for g in groups:
            for flat in flats.values():
                comm.all_reduce(flat, g)
        offsets = {dt: 0 for dt in flats}
        for m, ps in zip(bucket, parts):
            reduced = []
            for p in ps:
                o = offsets[p.dtype]
                reduced.append(flats[p.dtype][o : o + p.numel()])
                offsets[p.dtype] = o + p.numel()
            try:
                m.commit_parts(reduced)
            except FloatingPointError as e:  # every state commits before the first error is raised
                errors.append(e)
    if errors:
        raise errors[0]
    return len(members)


# The optimizer whose step is running on this thread (and its parameter ids): an optimizer that
# wraps others (torchtitan's OptimizersContainer is a torch Optimizer whose step calls each inner
# optimizer's step) commits once, at the outer step; the inner steps find it running and skip.
_STEPPING = threading.local()


def owner_parameter(layer: nn.Module) -> Optional[nn.Parameter]:
    """The parameter whose optimizer commits the layer's step states: the layer's first trainable
    parameter (the router's weight, unless frozen). One per layer, the same on every rank, so a
    model whose parameters several optimizers split (router and experts at different learning
    rates, Muon + AdamW) commits each layer once per training step, with no communication."""
    return next((p for p in layer.parameters() if p.requires_grad), None)


def states_owned_by(optimizer: torch.optim.Optimizer) -> List[StepState]:
    """The live step states (committed_by="optimizer") whose layer's owner parameter this
    optimizer holds, in construction order (the same on every rank)."""
    if not _LIVE:
        return []
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with _LIVE_LOCK:
        _LIVE[:] = [r for r in _LIVE if r() is not None]
        live = [r() for r in _LIVE]
    mine = []
    for m in live:
        if m is None or m.committed_by != "optimizer":
            continue
        layer = m.layer()
        owner = owner_parameter(layer) if layer is not None else None
        if owner is not None and id(owner) in ids:
            mine.append(m)
    return mine


def discard_pending(states: Sequence[StepState]) -> None:
    """Drops the statistics accumulated since the last commit: the step they belong to did not
    happen (a GradScaler or DeepSpeed overflow skip). Local, no collective: the skip decision
    is the group's (an agreed found_inf), so every rank drops alike."""
    for m in states:
        m._clear()


def _optimizer_step_pre_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Marks the outermost optimizer step running on this thread (see `_optimizer_step_post_hook`)."""
    if not _LIVE:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    outer = getattr(_STEPPING, "outer", None)
    outer = outer() if outer is not None else None
    if outer is not None and outer is not optimizer and ids <= _STEPPING.ids:
        return  # inside a wrapping optimizer's step, which commits
    # (Its own earlier step that raised before its post-hook is not "running": it is this one.)
    _STEPPING.outer, _STEPPING.ids = weakref.ref(optimizer), ids


def _optimizer_step_post_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Commits the step states this optimizer owns (`owner_parameter`), after its step: a step
    that runs forward and backward inside `step(closure)` (LBFGS, SAM) commits what its closure
    collected; a step that never ran (a GradScaler skip) commits nothing."""
    outer = getattr(_STEPPING, "outer", None)
    if outer is None or outer() is not optimizer:
        return  # an inner optimizer of a wrapping one: the outer step commits
    _STEPPING.outer = None
    mine = states_owned_by(optimizer)
    if mine:
        _commit(mine)


_HOOK: list = [None]


def attach_to_optimizers() -> None:
    """Installs the process-wide optimizer step hooks (idempotent; done at import)."""
    if not _HOOK[0]:
        _HOOK[0] = (
            register_optimizer_step_pre_hook(_optimizer_step_pre_hook),
            register_optimizer_step_post_hook(_optimizer_step_post_hook),
        )


attach_to_optimizers()
