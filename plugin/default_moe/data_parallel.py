"""Data parallelism for models with expert-parallel `MoELayer`s in plain PyTorch.

Expert parameters differ between EP ranks, so the usual "average every gradient over all ranks"
is wrong for them: an expert's gradient is summed over the ranks that hold the same experts (the
expert-data-parallel group) and divided by the data-parallel size, dense parameters are averaged
over the data-parallel group. Plain `torch.nn.parallel.DistributedDataParallel` gets this wrong
silently (it broadcasts rank 0's experts over the others at construction and averages different
experts' gradients). Three supported ways:

- `reduce_gradients(model)` once per optimizer step, after the step's last `loss.backward()`,
  in a hand-written loop (it reduces the accumulated gradients: calling it after every
  micro-batch of gradient accumulation would reduce the earlier ones again);
- `wrap_ddp(model, **ddp_kwargs)`: DDP over the dense parameters only; expert parameters (and
  the MoE layers' buffers, kept identical by the EMA commit) are excluded from DDP's buckets and
  broadcasts; each backward reduces the incoming expert gradients over the expert-data-parallel
  group before they accumulate, and under DDP's `no_sync()` they accumulate locally and are
  reduced together at the next synchronising backward, as DDP does with the dense ones;
- `fully_shard_moe(model)`: FSDP2 (`fully_shard`) with every `MoELayer`'s experts sharded over
  the expert-data-parallel group (gradients summed there, divided by the data-parallel size) and
  the rest over the data-parallel group, as torchtitan does for EP.

Every way equals the float64 reference of the union batch (tests/test_data_parallel.py).
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from default_moe import comm
from default_moe.layer import MoELayer
from default_moe.parallel import ParallelGroups


def _moe_layers(model: nn.Module) -> List[Tuple[str, MoELayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def model_groups(model: nn.Module) -> ParallelGroups:
    """The process groups of the model's MoE layers (all layers must use the same EP layout)."""
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("the model has no default_moe.MoELayer: use plain DDP/FSDP")
    first = layers[0][1].groups
    for name, layer in layers[1:]:
        g = layer.groups
        if (g.ep_group, g.expert_dp_group, g.dp_group) != (first.ep_group, first.expert_dp_group, first.dp_group):
            raise ValueError(f"MoE layer {name!r} uses other process groups than {layers[0][0]!r}")
    return first


def split_parameters(model: nn.Module) -> Tuple[Dict[str, nn.Parameter], Dict[str, nn.Parameter]]:
    """(expert parameters, dense parameters) by name; experts are those marked `expert_parallel`."""
    experts, dense = {}, {}
    for name, p in model.named_parameters():
        (experts if getattr(p, "expert_parallel", False) else dense)[name] = p
    return experts, dense


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: Optional[ParallelGroups] = None) -> None:
    """Averages gradients over data-parallel ranks for an EP model, in place (call after backward).

    Dense gradients: all-reduced over the data-parallel group, divided by its size. Expert
    gradients: all-reduced over the expert-data-parallel group, divided by the data-parallel size.
    The result is the gradient of the mean of the ranks' losses (what DDP computes for dense models).
    """
    groups = groups or model_groups(model)
    dp = groups.dp_size
    experts, dense = split_parameters(model)
    for params, group in ((dense, groups.dp_group), (experts, groups.expert_dp_group)):
        grads = [p.grad for p in params.values() if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per kind
        if comm.group_size(group) > 1:
            comm.all_reduce(flat, group)
        flat /= dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def wrap_ddp(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """`DistributedDataParallel` done right for an EP model (see the module docstring).

    Args:
        model: the model (its MoE layers built with their groups).
        **ddp_kwargs: passed to DDP (`process_group` is the MoE layers' data-parallel group).
    """
    groups = model_groups(model)
    if "process_group" in ddp_kwargs:
        raise ValueError("wrap_ddp: process_group is the MoE layers' data-parallel group; do not pass one")
    experts, _ = split_parameters(model)
    ignore = list(experts)
    for name, layer in _moe_layers(model):
        prefix = f"{name}." if name else ""
        ignore += [prefix + b for b, _ in layer.named_buffers()]  # D is kept identical by its all-reduce
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    dp, expert_dp = groups.dp_size, groups.expert_dp_group
    wrapped: List[nn.parallel.DistributedDataParallel] = []
    # Gradients accumulated under no_sync(), not reduced yet (what DDP's buckets hold for the dense).
    unreduced: Dict[int, torch.Tensor] = {}

    def reduce_incoming(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        # On the incoming gradient, before it accumulates into p.grad: reducing the accumulated
        # p.grad would reduce (and scale) every earlier micro-batch again.
        with torch.no_grad():
            local = unreduced.pop(id(p), None)
            if wrapped and not wrapped[0].require_backward_grad_sync:  # inside no_sync()
                unreduced[id(p)] = grad.clone() if local is None else local + grad
                return grad
            total = grad if local is None else local + grad
            reduced = total.clone()
            if comm.group_size(expert_dp) > 1:
                comm.all_reduce(reduced, expert_dp)
            reduced /= dp
            # p.grad already holds `local`: add what makes it the reduced sum.
            return reduced if local is None else reduced - local

    for p in experts.values():
        p.register_hook(functools.partial(reduce_incoming, p))
    ddp = nn.parallel.DistributedDataParallel(model, process_group=groups.dp_group, **ddp_kwargs)
    wrapped.append(ddp)
    return ddp


_SINGLETONS: Dict[int, dist.ProcessGroup] = {}


def _singleton_group() -> dist.ProcessGroup:
    """This rank alone (a collective call: every rank makes its own, together)."""
    world = dist.get_world_size()
    if world not in _SINGLETONS:
        _SINGLETONS[world], _ = dist.new_subgroups(group_size=1)
    return _SINGLETONS[world]


def fully_shard_moe(model: nn.Module, device_type: Optional[str] = None, **fsdp_kwargs) -> nn.Module:
    """FSDP2 for an EP model: experts sharded over the expert-data-parallel group, the rest over DP.

    Args:
        model: the model; every `MoELayer`'s `experts` becomes its own FSDP unit.
        device_type: "cuda" or "cpu" (default: where the parameters are).
        **fsdp_kwargs: passed to every `fully_shard` call (e.g. `mp_policy`, `reshard_after_forward`).

    Returns:
        The model (sharded in place).
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    groups = model_groups(model)
    if groups.dp_group is None and not comm.is_distributed():
        raise ValueError("fully_shard_moe needs an initialised process group")
    device_type = device_type or next(model.parameters()).device.type
    dp_group = groups.dp_group or dist.group.WORLD
    expert_dp = groups.expert_dp_group if comm.group_size(groups.expert_dp_group) > 1 else _singleton_group()
    expert_mesh, dp_mesh = DeviceMesh.from_group(expert_dp, device_type), DeviceMesh.from_group(dp_group, device_type)
    dp = comm.group_size(dp_group)
    for _, layer in _moe_layers(model):
        fully_shard(layer.experts, mesh=expert_mesh, **fsdp_kwargs)
        # Summed over the ranks holding these experts, divided by the data-parallel size. NCCL does
        # it in the reduce-scatter (PreMulSum); gloo has no PreMulSum: SUM plus a separate scaling.
        layer.experts.set_gradient_divide_factor(float(dp))
        # (A one-rank group runs no collective and divides once by itself: leave it alone there.)
        if dist.get_backend(expert_dp) == "gloo" and comm.group_size(expert_dp) > 1:
            layer.experts.set_force_sum_reduction_for_comms(True)
    fully_shard(model, mesh=dp_mesh, **fsdp_kwargs)
    return model
