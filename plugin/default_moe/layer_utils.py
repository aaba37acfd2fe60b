"""Small helpers shared by the layer, the routers and the diagnostics."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

# Process-wide, not thread-local: on CUDA autograd runs backward (and activation-checkpoint
# recomputation) on its own worker threads, which must see the same setting as the caller.
_FROZEN = [0]
_LOCK = threading.Lock()


def in_backward() -> bool:
    """True while the autograd engine runs, i.e. when activation checkpointing recomputes a layer."""
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
