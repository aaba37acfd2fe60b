"""Checkpoints that reshard: the whole model with every MoE layer's experts gathered into global
[E, ...] tensors, loadable at any `ep_size` (each rank keeps its slice).

    default_moe.checkpoint.save(model, "ckpt.pt", extra={"step": 100})   # every rank calls it
    extra = default_moe.checkpoint.load(model, "ckpt.pt")                # at any ep_size

The file is written by global rank 0 to a temporary name and renamed: a crash mid-save leaves the
previous checkpoint intact. Loading checks that every MoE layer's config matches the checkpoint's
(all fields but `ep_size`) and names the fields that differ.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from default_moe import comm
from default_moe.layer import MoELayer

FORMAT = "default-moe-checkpoint-v1"


def _moe_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def _gather_experts(layer: MoELayer, local: torch.Tensor) -> torch.Tensor:
    if layer.groups.ep_size == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(layer.groups.ep_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=layer.groups.ep_group)
    return torch.cat(parts, dim=0)


def consolidated_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict with global expert tensors (collective over each EP group)."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, layer in _moe_layers(model):
        prefix = f"{name}." if name else ""
        for pname, p in layer.experts.named_parameters():
            sd[f"{prefix}experts.{pname}"] = _gather_experts(layer, p).cpu()
    return sd


def save(model: nn.Module, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes a resharding checkpoint (all ranks must call it; rank 0 writes atomically)."""
    sd = consolidated_state_dict(model)
    rank = dist.get_rank() if comm.is_distributed() else 0
    if rank == 0:
        payload = {
            "format": FORMAT,
            "model": sd,
            "moe_configs": {name: layer.config.to_dict() for name, layer in _moe_layers(model)},
            "extra": extra or {},
        }
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            torch.save(payload, tmp)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)  # atomic on POSIX: the old file stays valid until this point
    if comm.is_distributed():
        dist.barrier()


def read(path: str) -> Dict[str, Any]:
    """Loads and checks a checkpoint file (clear errors for missing, corrupt or foreign files)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise ValueError(f"checkpoint {path} is not readable (corrupt or not a torch file): {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a default-moe checkpoint (expected format {FORMAT!r})")
    return payload


def load(model: nn.Module, path: str) -> Dict[str, Any]:
    """Loads a checkpoint written by `save` at any ep_size; returns its `extra` dict."""
    payload = read(path)
    saved_cfgs = payload["moe_configs"]
    layers = _moe_layers(model)
    missing = sorted(set(saved_cfgs) - {n for n, _ in layers})
    if missing or len(saved_cfgs) != len(layers):
        raise ValueError(f"checkpoint {path} has MoE layers {sorted(saved_cfgs)}, the model {[n for n, _ in layers]}")
    sd = dict(payload["model"])
    for name, layer in layers:
        mine = layer.config.to_dict()
        diffs = sorted(k for k in mine if k != "ep_size" and saved_cfgs[name].get(k) != mine[k])
        if diffs:
            raise ValueError(
                f"checkpoint {path} was written with a different config for MoE layer {name!r}: "
                + ", ".join(f"{k}={saved_cfgs[name].get(k)!r} (model: {mine[k]!r})" for k in diffs)
            )
        prefix = f"{name}." if name else ""
        ids = list(layer.local_expert_ids)
        for pname, _ in layer.experts.named_parameters():
            key = f"{prefix}experts.{pname}"
            sd[key] = sd[key][ids[0] : ids[-1] + 1]
    model.load_state_dict(sd)
    return payload["extra"]
