"""Mixed precision with an agreed skip, for torch's own `torch.amp.GradScaler` and for ours.

Why: with expert parallelism the experts' gradients are not reduced across EP ranks, so an fp16
overflow can be local to one rank. A plain GradScaler then skips the step on that rank only: its
`optimizer.step()` (and the D commit, a collective) never runs while the other ranks commit, and
their all-reduce pairs with the skipping rank's next all-to-all — every rank waits for the
collective timeout. megatron-core agrees on `found_inf` across its model-parallel group for the
same reason.

So, at import, this module hooks torch's GradScaler (the one place that names its seams, see
`_TORCH`): for an optimizer that commits Default MoE statistics (`states_owned_by`), found_inf is agreed
(max) over the groups the commit reduces over before the skip is decided, and a skipped step's
statistics are dropped — the statistics of a step that did not happen do not count, as at a
DeepSpeed overflow skip. Other optimizers keep torch's behaviour. A script that already uses
`torch.amp.GradScaler` needs no change.

`default_moe.amp.GradScaler` also agrees for every optimizer it steps, over a group you choose
(default: all ranks) — for models whose non-MoE parameters must skip together as well:

    scaler = default_moe.amp.GradScaler("cuda")   # or torch.amp.GradScaler("cuda")
    scaler.scale(loss).backward()
    scaler.step(optimizer)                         # agreed skip; D committed at the step, dropped at a skip
    scaler.update()
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist

from default_moe.step_state import discard_pending, states_owned_by


def _groups_with_peers(groups: Iterable[Optional[dist.ProcessGroup]]) -> List[Optional[dist.ProcessGroup]]:
    if not (dist.is_available() and dist.is_initialized()):
        return []
    out, seen = [], set()
    for g in groups:
        if id(g) not in seen and dist.get_world_size(g) > 1:
            seen.add(id(g))
            out.append(g)
    return out


def agree_found_inf(found: Sequence[torch.Tensor], groups: Iterable[Optional[dist.ProcessGroup]]) -> torch.Tensor:
    """This rank's found_inf values summed, then the max over each group in turn (= the max over
    their product): a 0-dim float32 tensor, the same on every rank of the groups. No host sync."""
    groups = _groups_with_peers(groups)
    if any(dist.get_backend(g) == "nccl" for g in groups):
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = found[0].device if found and not groups else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for v in found:
        total += v.to(device=dev, dtype=torch.float32)
    for g in groups:
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=g)
    return total


def _commit_groups(states) -> List[Optional[dist.ProcessGroup]]:
    return [g for m in states for g in m.reduction_groups()]


def _agree_in_place(found: dict, groups) -> torch.Tensor:
    """Every device's flag of `found` (a GradScaler's found_inf_per_device) becomes the verdict."""
    agreed = agree_found_inf(list(found.values()), groups)
    for v in found.values():
        v.copy_(agreed.to(v.device))
    return agreed


# ---- torch.amp.GradScaler: the hook (its seams are named only here) ----

# torch's own methods, wrapped below: `unscale_` (public; GradScaler.step calls it unless the
# user did, on the unfused path) and `_check_inf_per_device` (private; the path of optimizers
# with their own scale handling, `fused=True`, whose kernel skips where `optimizer.found_inf`).
# Both fill the optimizer's `found_inf_per_device`, which then decides the step (torch's
# `_maybe_opt_step`, or the fused kernel) and the scale's backoff (`update`).
_TORCH: dict = {}


def _agree_for(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """Agrees the optimizer's found_inf over the groups its Default MoE commit reduces over (and,
    for our GradScaler, its `agree_group`); a skip drops the step's statistics."""
    if not scaler.is_enabled():
        return
    owned = states_owned_by(optimizer)
    groups = _commit_groups(owned)
    if isinstance(scaler, GradScaler):
        groups = [scaler.agree_group, *groups]
    elif not owned:
        return  # torch's behaviour: no collective follows this optimizer's step
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    agreed = _agree_in_place(found, groups)
    if not found:
        # No gradient on this rank (it ran no forward): it still joined the agreement, and steps
        # or skips with the others instead of torch's "No inf checks were recorded".
        found[agreed.device] = agreed
    if float(agreed) > 0:  # torch's step syncs here too (found_inf.item())
        if isinstance(scaler, GradScaler):
            scaler.skipped_steps += 1
        discard_pending(owned)


def _unscale_(self, optimizer):
    _TORCH["unscale_"](self, optimizer)
    _agree_for(self, optimizer)


def _check_inf_per_device(self, optimizer):
    found = _TORCH["_check_inf_per_device"](self, optimizer)
    _agree_for(self, optimizer)
    return found


def hook_torch_grad_scaler() -> bool:
    """Installs the agreed skip into torch's GradScaler (idempotent; done at import). False, with a
    warning, where this torch lacks a seam (then a rank-local skip is not agreed)."""
    if _TORCH:
        return True
    seams = {"unscale_": _unscale_, "_check_inf_per_device": _check_inf_per_device}
    missing = [name for name in seams if not callable(getattr(torch.amp.GradScaler, name, None))]
    if missing:
        warnings.warn(
            f"torch {torch.__version__}: torch.amp.GradScaler has no {missing}; a rank-local fp16 overflow "
            "under expert parallelism is not agreed (ranks may wait for the collective timeout)",
            stacklevel=2,
        )
        return False
    for name, hooked in seams.items():
        _TORCH[name] = getattr(torch.amp.GradScaler, name)
        setattr(torch.amp.GradScaler, name, hooked)
    return True


class GradScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` whose skip is agreed over `group` for every optimizer it steps (not
    only those that commit Default MoE statistics), counting the skips.

    Args:
        device: as torch's ("cuda", "cpu").
        group: the ranks that must skip together (None: every rank of the default group, when
            torch.distributed is initialised). Every rank of it calls `step` the same number of times.
        **kwargs: torch.amp.GradScaler's (init_scale, growth_factor, backoff_factor, ...).
    """

    def __init__(self, device: str = "cuda", *, group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(device, **kwargs)
        self.agree_group = group
        self.skipped_steps = 0


hook_torch_grad_scaler()
