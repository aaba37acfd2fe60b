"""Mixed precision with an agreed skip: `GradScaler`, a drop-in `torch.amp.GradScaler`.

Why: with expert parallelism the experts' gradients are not reduced across EP ranks, so an fp16
overflow can be local to one rank. torch's GradScaler then skips the step on that rank only: its
`optimizer.step()` (and the D commit, a collective) never runs while the other ranks commit, and
their all-reduce pairs with the skipping rank's next all-to-all — every rank waits for the
collective timeout. megatron-core agrees on `found_inf` across its model-parallel group for the
same reason. This scaler all-reduces found_inf (max) over a group (default: all ranks) before
deciding, so every rank skips together, and a skipped step's Default MoE statistics are dropped:
the statistics of a step that did not happen do not count (as at a DeepSpeed overflow skip).

    scaler = default_moe.amp.GradScaler("cuda")   # instead of torch.amp.GradScaler("cuda")
    scaler.scale(loss).backward()
    scaler.step(optimizer)                         # agreed skip; D committed at the step, dropped at a skip
    scaler.update()
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.amp.grad_scaler import OptState

from default_moe.step_state import discard_pending, states_owned_by


class GradScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` whose skip is agreed over `group` and drops the skipped step's
    statistics.

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

    def _agreed_found_inf(self, found: dict) -> torch.Tensor:
        """found_inf summed over this rank's devices, then the max over the group."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.agree_group) > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.agree_group) == "nccl" else "cpu"
        else:
            dev = next(iter(found.values())).device if found else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=dev)
        for v in found.values():
            total += v.to(device=dev, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.agree_group) > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.agree_group)
        return total

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        if not self.is_enabled():
            return super().step(optimizer, *args, **kwargs)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        found = state["found_inf_per_device"]
        agreed = self._agreed_found_inf(found)
        # torch's step and update() read these: each device's flag becomes the group's verdict.
        for v in found.values():
            v.copy_(agreed.to(v.device))
        if not found:
            found[agreed.device] = agreed
        if float(agreed) > 0:  # torch's step syncs here too (found_inf.item())
            self.skipped_steps += 1
            discard_pending(states_owned_by(optimizer))
        return super().step(optimizer, *args, **kwargs)
