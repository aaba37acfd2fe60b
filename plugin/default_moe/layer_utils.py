"""Small helpers shared by the layer, the routers and the diagnostics."""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

# Process-wide, not thread-local: on CUDA autograd runs backward (and activation-checkpoint
# recomputation) on its own worker threads, which must see the same setting as the caller.
_FROZEN = [0]
_LOCK = threading.Lock()


# Called with every new MoELayer: how integrations act on layer construction without the core
# importing them (the package's __init__ registers the DeepSpeed section guard).
_LAYER_BUILT_HOOKS: list = []


def on_layer_built(hook: Callable[[Any], None]) -> None:
    """Registers `hook(layer)`, run at the end of every MoELayer's construction (idempotent)."""
    if hook not in _LAYER_BUILT_HOOKS:
        _LAYER_BUILT_HOOKS.append(hook)


def layer_built(layer) -> None:
    for hook in list(_LAYER_BUILT_HOOKS):
        hook(layer)


def in_backward() -> bool:
    """True while the autograd engine runs, i.e. when activation checkpointing recomputes a layer.

    Inside a torch.compile'd region this is False: a compiled forward runs once per call (a
    checkpointed block that is compiled recomputes inside its backward graph, never through this
    Python code), and the autograd query would break the graph. Not covered: a compiled module
    recomputed from outside by a reentrant `torch.utils.checkpoint` around it (checkpoint the
    block, then compile it — torchtitan's order)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


@contextlib.contextmanager
def frozen_state() -> Iterator[None]:
    """Forwards inside change no layer state: no EMA update or pending-update application, no
    step counters, no recorded load/aux losses (used by diagnostics that run training forwards)."""
    with _LOCK:
        _FROZEN[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _FROZEN[0] -= 1


def state_frozen() -> bool:
    return _FROZEN[0] > 0


def updates_state(training: bool) -> bool:
    """Whether a forward may change training state: a training forward, not a recompute, not frozen."""
    return training and not in_backward() and not state_frozen()


class _Entry:
    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


class ForwardSnapshots:
    """Per-forward records for what is not yet a step state: token ids of engine layers and
    StableMoE's stage (D and the expert bias follow the step contract, `default_moe.step_state`,
    and need no record).

    A training forward records what it used (a StableMoE stage, token ids); an activation-
    checkpoint recompute of it — which runs in the backward, possibly after other forwards of the
    same layer (pipeline schedules run several forwards before their backwards) — replays the
    oldest record whose backward has not run, and the record is freed when the gradient reaches
    the tensor it is anchored to. Backwards of one layer run in the order of its forwards (gradient
    accumulation, 1F1B and interleaved pipeline schedules), so "oldest outstanding" is the one;
    records older than a freed one are stale and freed with it.

    Limits (known, tested as strict xfails for StableMoE): backwards out of forward order (two
    forwards in one backward) or skipped make the oldest record the wrong one; a training-mode
    forward under `torch.no_grad()` that is never recomputed cannot be told from a reentrant
    checkpoint's first forward.
    """

    def __init__(self) -> None:
        self._fifo: "collections.deque[_Entry]" = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._fifo)

    # Records belong to this object's forwards: a copy (deepcopy, pickle) starts with none.
    def __deepcopy__(self, memo) -> "ForwardSnapshots":
        return ForwardSnapshots()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, make: Callable[[], Any], record: bool) -> Tuple[Any, Optional[_Entry]]:
        """(value, entry): in a recompute the oldest outstanding record's value, else `make()`
        (recorded when `record`, i.e. a training forward that may be recomputed)."""
        if in_backward():
            with self._lock:
                entry = self._fifo[0] if self._fifo else None
            return (entry.value if entry is not None else make()), entry
        value = make()
        if not record:
            return value, None
        entry = _Entry(value)
        with self._lock:
            self._fifo.append(entry)
        return value, entry

    def release_after_backward(self, entry: Optional[_Entry], anchor: torch.Tensor) -> None:
        """Frees `entry` (and older records) when the gradient reaches `anchor`."""
        if entry is not None and anchor.requires_grad:
            anchor.register_hook(functools.partial(self._release, entry))

    def _release(self, entry: _Entry, grad=None) -> None:
        with self._lock:
            if any(e is entry for e in self._fifo):
                while self._fifo and self._fifo.popleft() is not entry:
                    pass

    def apply(self, fn: Callable[[Any], Any]) -> None:
        """Maps the recorded values (e.g. follows a module's `.to()`)."""
        with self._lock:
            for e in self._fifo:
                e.value = fn(e.value)

    def clear(self) -> None:
        with self._lock:
            self._fifo.clear()
