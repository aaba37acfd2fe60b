"""Checkpoints that reshard: the whole model with every MoE layer's experts gathered into global
[E, ...] tensors, loadable at any `ep_size` (each rank keeps its slice).

    default_moe.checkpoint.save(model, "ckpt.pt", extra={"step": 100})   # every rank calls it
    extra = default_moe.checkpoint.load(model, "ckpt.pt")                # at any ep_size

The file is written by global rank 0 to a temporary name and renamed: a crash mid-save leaves the
previous checkpoint intact. Loading checks that every MoE layer's config matches the checkpoint's
(all fields but `ep_size`) and names the fields that differ.

`convert_deepspeed` (CLI: `default-moe convert-deepspeed`) turns a DeepSpeed checkpoint written
with the "default_moe" section at any ep_size (module states + one expert file per EP rank) into
this format offline, without a process group: the weights and defaults then load at any ep_size.
Optimizer states are not converted (they are partitioned by ZeRO for one layout).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from default_moe import comm
from default_moe.experts import upgrade_expert_state_dict
from default_moe.layer import MoELayer

FORMAT = "default-moe-checkpoint-v1"
# Config fields that change how the layer runs, not what its saved state means.
_LAYOUT_ONLY = ("ep_size", "experts_backend")


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


def _atomic_save(payload: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(payload, tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # atomic on POSIX: the old file stays valid until this point


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
        _atomic_save(payload, path)
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
        diffs = sorted(k for k in mine if k not in _LAYOUT_ONLY and saved_cfgs[name].get(k) != mine[k])
        if diffs:
            raise ValueError(
                f"checkpoint {path} was written with a different config for MoE layer {name!r}: "
                + ", ".join(f"{k}={saved_cfgs[name].get(k)!r} (model: {mine[k]!r})" for k in diffs)
            )
        prefix = f"{name}." if name else ""
        upgrade_expert_state_dict(sd, f"{prefix}experts.")  # written with separate w1/w3
        ids = list(layer.local_expert_ids)
        for pname, _ in layer.experts.named_parameters():
            key = f"{prefix}experts.{pname}"
            sd[key] = sd[key][ids[0] : ids[-1] + 1]
    model.load_state_dict(sd)
    return payload["extra"]


def convert_deepspeed(ckpt_dir: str, out_path: str, tag: Optional[str] = None) -> Dict[str, Any]:
    """Converts a DeepSpeed checkpoint of a default_moe model into a resharding checkpoint.

    Args:
        ckpt_dir: the directory given to `engine.save_checkpoint`.
        out_path: the resharding checkpoint to write (atomically).
        tag: the checkpoint tag (default: the one in `ckpt_dir/latest`).

    Returns:
        The written payload's `extra`: {"source", "tag", "saved_ep_size"}.
    """
    import glob
    import re

    from default_moe.integrations.deepspeed import EXPERT_FILE

    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.exists(latest):
            raise FileNotFoundError(f"{ckpt_dir} has no 'latest' file: pass the checkpoint tag explicitly")
        with open(latest) as f:
            tag = f.read().strip()
    tag_dir = os.path.join(ckpt_dir, str(tag))
    module_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(module_file):
        raise FileNotFoundError(f"{module_file} does not exist: not a DeepSpeed checkpoint directory/tag "
                                "(ZeRO-3 checkpoints are not supported)")
    pattern = EXPERT_FILE.format(ep_size="*", ep_rank="*")
    expert_files = sorted(glob.glob(os.path.join(tag_dir, pattern)))
    if not expert_files:
        raise FileNotFoundError(f"{tag_dir} has no {pattern} files: it was not written with the default_moe section")
    layouts = {}
    for path in expert_files:
        m = re.search(r"_ep(\d+)_rank(\d+)\.pt$", path)
        layouts.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    if len(layouts) != 1:
        raise ValueError(f"{tag_dir} mixes expert files of several ep_sizes {sorted(layouts)}")
    (ep_size, files), = layouts.items()
    if sorted(files) != list(range(ep_size)):
        raise ValueError(f"{tag_dir}: expert files for EP ranks {sorted(files)} of ep_size {ep_size}; some are missing")
    parts = [torch.load(files[r], map_location="cpu", weights_only=True) for r in range(ep_size)]
    if "moe_configs" not in parts[0]:
        raise ValueError(f"{files[0]} predates the MoE configs in expert files; re-save it with this version")
    module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    sd = {k: v.detach().cpu().clone() for k, v in module.items()}
    configs = parts[0]["moe_configs"]
    for name, params in parts[0]["experts"].items():
        prefix = f"{name}." if name else ""
        for pname in params:
            sd[f"{prefix}experts.{pname}"] = torch.cat([part["experts"][name][pname] for part in parts], dim=0)
    payload = {"format": FORMAT, "model": sd, "moe_configs": configs,
               "extra": {"source": os.path.abspath(tag_dir), "tag": str(tag), "saved_ep_size": ep_size}}
    _atomic_save(payload, out_path)
    return payload["extra"]
