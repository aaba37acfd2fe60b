"""Thin collective wrappers and the collective counter.

Every collective the plugin issues goes through this module, so `count_collectives()` sees all
of them: that is how the tests prove that Default MoE's dense router gradient costs no extra
communication over TopK (same all-to-alls with the same byte counts, plus one all-reduce of the
E x (D+1) EMA statistics).

Legend: N rows exchanged, D hidden size.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective call: its kind, payload bytes sent by this rank, dtype and group size."""

    op: str
    nbytes: int
    numel: int
    dtype: torch.dtype
    group_size: int


class CollectiveCounter:
    """Collects `CollectiveRecord`s while active; see `count_collectives`."""

    def __init__(self) -> None:
        self.records: List[CollectiveRecord] = []

    def of(self, op: str) -> List[CollectiveRecord]:
        return [r for r in self.records if r.op == op]

    def summary(self) -> dict:
        """{op: (calls, bytes)} over all recorded collectives."""
        out: dict = {}
        for r in self.records:
            calls, nbytes = out.get(r.op, (0, 0))
            out[r.op] = (calls + 1, nbytes + r.nbytes)
        return out


# Process-wide, not thread-local: backward collectives may run on autograd's worker threads.
_ACTIVE: List[CollectiveCounter] = []
_LOCK = threading.Lock()


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveCounter]:
    """Records every collective issued by the plugin (forward and backward) inside the block."""
    counter = CollectiveCounter()
    with _LOCK:
        _ACTIVE.append(counter)
    try:
        yield counter
    finally:
        with _LOCK:
            _ACTIVE.remove(counter)


def _record(op: str, tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> None:
    if not _ACTIVE:
        return
    for counter in list(_ACTIVE):
        counter.records.append(
            CollectiveRecord(
                op=op,
                nbytes=tensor.numel() * tensor.element_size(),
                numel=tensor.numel(),
                dtype=tensor.dtype,
                group_size=group_size(group),
            )
        )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    if group is None or not is_distributed():
        return 1
    return dist.get_world_size(group)


def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    output_split_sizes: Optional[Sequence[int]],
    input_split_sizes: Optional[Sequence[int]],
    group: Optional[dist.ProcessGroup],
) -> None:
    """`dist.all_to_all_single` with uneven splits (the list form fails on gloo with uneven shapes)."""
    _record("all_to_all", input, group)
    dist.all_to_all_single(
        output,
        input.contiguous(),
        output_split_sizes=list(output_split_sizes) if output_split_sizes is not None else None,
        input_split_sizes=list(input_split_sizes) if input_split_sizes is not None else None,
        group=group,
    )


def all_reduce(tensor: torch.Tensor, group: Optional[dist.ProcessGroup], async_op: bool = False):
    """In-place SUM all-reduce; returns the work handle when `async_op`."""
    _record("all_reduce", tensor, group)
    return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all whose backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x_ND, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = x_ND.new_empty((sum(output_splits),) + tuple(x_ND.shape[1:]))
        all_to_all_single(out, x_ND, output_splits, input_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad_ND):
        grad_in = grad_ND.new_empty((sum(ctx.input_splits),) + tuple(grad_ND.shape[1:]))
        all_to_all_single(grad_in, grad_ND.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(
    x_ND: torch.Tensor,
    output_splits: List[int],
    input_splits: List[int],
    group: Optional[dist.ProcessGroup],
) -> torch.Tensor:
    """Autograd-aware uneven all-to-all of the rows of `x_ND`."""
    return _AllToAll.apply(x_ND, output_splits, input_splits, group)
