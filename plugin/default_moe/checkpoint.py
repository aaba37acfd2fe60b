"""Checkpoints that reshard: the whole model with every MoE layer's experts gathered into global
[E, ...] tensors, loadable at any `ep_size` (each rank keeps its slice).

    default_moe.checkpoint.save(model, "ckpt.pt", extra={"step": 100})   # every rank calls it
    extra = default_moe.checkpoint.load(model, "ckpt.pt")                # at any ep_size

The file is written by global rank 0 to a temporary name, fsynced and renamed (the folder fsynced
too): a kill or crash at any instant leaves the previous file or the new one, whole. Loading checks that every MoE layer's config matches the checkpoint's
(all fields but `ep_size`) and names the fields that differ.

`convert_deepspeed` (CLI: `default-moe convert-deepspeed`) turns a DeepSpeed checkpoint written
with the "default_moe" section at any ep_size (module states + one expert file per EP rank) into
this format offline, without a process group: the weights and defaults then load at any ep_size.
Optimizer states are not converted (they are partitioned by ZeRO for one layout).

Trust: a checkpoint is a pickle, and unpickling can run code. Nothing here unpickles a file
without the caller saying they trust it:
- this format holds only tensors and plain containers (configs and `extra` are JSON values,
  checked at save) and is read with `torch.load(weights_only=True)`; a file that needs more is
  refused with `UntrustedCheckpointError` unless `trust_pickle=True` (CLI: `checkpoint-upgrade
  --trust-pickle OLD NEW` rewrites such a file once into the safe form);
- DeepSpeed checkpoints (`convert_deepspeed`, the main job's resume) are checked before anything
  unpickles them: every `.pt` file's globals must be in `DEEPSPEED_SAFE_GLOBALS`, the plain types
  DeepSpeed writes (read without executing anything, `get_unsafe_globals_in_checkpoint`).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from default_moe import comm, manifest
from default_moe.experts import upgrade_expert_state_dict
from default_moe.layer import MoELayer

FORMAT = "default-moe-checkpoint-v1"
# Config fields that change how the layer runs or trains from here on, not the shapes or the meaning
# of its saved state (a difference is reported, not refused). Every other field (sizes, activation,
# router and its settings, top_k, normalize_topk, ema_weighting: what D averages) is refused.
_RUNTIME_ONLY = (
    "ep_size",
    "experts_backend",
    "beta",
    "ema_stats_dtype",
    "nonfinite",
    "default_in_forward",
    "init_std",
    "aux_loss_coeff",
    "z_loss_coeff",
    "capacity_factor",
    "drop_policy",
)


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


class UntrustedCheckpointError(ValueError):
    """A file would need arbitrary unpickling (it could run code) and the caller did not trust it."""


# Globals DeepSpeed 0.19 writes into its checkpoint files besides tensors and builtins: plain data
# types whose unpickling runs no user code. Anything else in a file refuses it.
DEEPSPEED_SAFE_GLOBALS = {
    "collections.OrderedDict",
    "collections.defaultdict",
    "torch.Size",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch.serialization._get_layout",
    "torch.device",
    "torch.FloatStorage",
    "torch.LongStorage",
    "torch.BFloat16Storage",
    "torch.HalfStorage",
    "torch.IntStorage",
    "torch.BoolStorage",
    "torch.ByteStorage",
    "torch.DoubleStorage",
    "argparse.Namespace",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "torch.float32",
    "torch.bfloat16",
    "torch.float16",
    "torch.int64",
    "torch.bool",
    "builtins.set",
    "_codecs.encode",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float64DType",
    "numpy.dtypes.Int64DType",
}


# The files default-moe adds to a DeepSpeed checkpoint tag (written by integrations/deepspeed.py):
# each EP rank's experts, and D (identical on every rank; filtered out of DeepSpeed's module state
# for DeepSpeed-MoE blocks).
EXPERT_FILE = "default_moe_experts_ep{ep_size}_rank{ep_rank}.pt"
DEFAULTS_FILE = "default_moe_defaults.pt"


def unsafe_globals(path: str, allowed=frozenset()) -> List[str]:
    """The globals of a torch file outside torch's weights-only set and `allowed` (read without unpickling)."""
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(allowed))


def latest_tag(ckpt_dir: str, universal: bool = False) -> Optional[str]:
    """The tag DeepSpeed's `latest` file (`latest_universal` when DeepSpeed loads universal
    checkpoints) names in a checkpoint directory (None without one)."""
    path = os.path.join(ckpt_dir, "latest_universal" if universal else "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def deepspeed_safe_globals() -> List[Any]:
    """The objects of `DEEPSPEED_SAFE_GLOBALS` that import here (for `torch.serialization.safe_globals`)."""
    import importlib

    objs = []
    for name in sorted(DEEPSPEED_SAFE_GLOBALS):
        module, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):  # e.g. numpy's other major version, DeepSpeed absent
            continue
        if hasattr(obj, "__qualname__"):  # torch dtypes are not classes: the unpickler knows them
            objs.append(obj)
    return objs


def load_deepspeed_file(path: str, map_location="cpu") -> Any:
    """Loads a file DeepSpeed wrote with the weights-only unpickler and the allow-list of globals
    DeepSpeed writes: the check and the load are one step (a file swapped after a check cannot
    run code)."""
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UntrustedCheckpointError(
            f"checkpoint file {path} holds Python objects DeepSpeed does not write; loading it could run code, so it is "
            f"refused ({str(e).splitlines()[0][:200]}). Only load checkpoints you wrote or trust (default-moe "
            "convert-deepspeed --trust-pickle loads one you trust)"
        ) from None


def check_deepspeed_files(tag_dir: str) -> None:
    """Refuses a DeepSpeed checkpoint folder any of whose `.pt` files — at any depth: ZeRO and
    universal checkpoints keep theirs in subfolders (`zero/<param>/fp32.pt`) — holds a global
    DeepSpeed does not write (a crafted pickle); nothing is unpickled by the check."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "**", "*.pt"), recursive=True)):
        try:
            bad = unsafe_globals(path, DEEPSPEED_SAFE_GLOBALS)
        except Exception as e:  # noqa: BLE001 - unreadable means refuse, with the reason
            raise ValueError(
                f"checkpoint file {path} is not readable (corrupt or not a torch file): {type(e).__name__}: {e}"
            ) from None
        if bad:
            raise UntrustedCheckpointError(
                f"checkpoint file {path} holds Python objects DeepSpeed does not write ({', '.join(bad[:5])}); "
                "loading it could run code, so it is refused. Only load checkpoints you wrote or trust "
                "(default-moe convert-deepspeed --trust-pickle loads one you trust)"
            )


def _json_problem(value: Any, where: str) -> Optional[str]:
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r}"
            problem = _json_problem(v, f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    return f"{where} is a {type(value).__name__}"


def check_extra(extra: Any) -> None:
    """`extra` must be JSON values (dict/list/str/int/float/bool/None), so the file loads as data."""
    if not isinstance(extra, dict):
        raise ValueError(f"checkpoint extra must be a dict of JSON values, got {type(extra).__name__}")
    problem = _json_problem(extra, "extra")
    if problem:
        raise ValueError(f"checkpoint extra must hold JSON values only (dict, list, str, int, float, bool, None): {problem}")


def _atomic_save(payload: Dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the checkpoint
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # atomic on POSIX: the old file stays valid until this point
    manifest.fsync_dir(os.path.dirname(os.path.abspath(path)))  # the rename itself survives a crash


def save(model: nn.Module, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes a resharding checkpoint (all ranks must call it; rank 0 writes atomically)."""
    check_extra(extra or {})  # before any collective: every rank fails alike
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


def read(path: str, trust_pickle: bool = False) -> Dict[str, Any]:
    """Loads and checks a checkpoint file (clear errors for missing, corrupt, foreign or unsafe files).

    Args:
        trust_pickle: also unpickle arbitrary objects (files written before checkpoints were data
            only). Only for files you wrote or trust: unpickling can run code.

    Raises:
        UntrustedCheckpointError: the file needs arbitrary unpickling and `trust_pickle` is False.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            objects = unsafe_globals(path)  # reads the pickle's opcodes, runs nothing
        except Exception:  # noqa: BLE001 - not a torch zip/pickle at all
            objects = []
        if not objects:
            raise ValueError(
                f"checkpoint {path} is not readable (corrupt or not a torch file): {str(e).splitlines()[0][:200]}"
            ) from None
        if not trust_pickle:
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain data ({', '.join(objects[:5])}); "
                f"loading it could run code, so it is refused. If you wrote it (an older default-moe format) or "
                f"otherwise trust it, rewrite it once as data: default-moe checkpoint-upgrade --trust-pickle {path} NEW.pt"
            ) from None
        warnings.warn(f"unpickling {path} with trust_pickle=True: this runs any code the file holds", stacklevel=2)
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any other failure means a corrupt or foreign file
        raise ValueError(f"checkpoint {path} is not readable (corrupt or not a torch file): {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} is not a default-moe checkpoint (expected format {FORMAT!r})")
    return payload


def load(model: nn.Module, path: str, trust_pickle: bool = False) -> Dict[str, Any]:
    """Loads a checkpoint written by `save` at any ep_size; returns its `extra` dict.

    `trust_pickle` as in `read` (never needed for files this version writes).
    """
    payload = read(path, trust_pickle)
    saved_cfgs = payload["moe_configs"]
    layers = _moe_layers(model)
    missing = sorted(set(saved_cfgs) - {n for n, _ in layers})
    if missing or len(saved_cfgs) != len(layers):
        raise ValueError(f"checkpoint {path} has MoE layers {sorted(saved_cfgs)}, the model {[n for n, _ in layers]}")
    sd = dict(payload["model"])
    reported = []
    for name, layer in layers:
        mine = layer.config.to_dict()
        diffs = sorted(k for k in mine if saved_cfgs[name].get(k) != mine[k])
        refused = [k for k in diffs if k not in _RUNTIME_ONLY]
        if refused:
            raise ValueError(
                f"checkpoint {path} was written with a different config for MoE layer {name!r}: "
                + ", ".join(f"{k}={saved_cfgs[name].get(k)!r} (model: {mine[k]!r})" for k in refused)
                + " (these change the shapes or the meaning of the saved state)"
            )
        reported += [
            f"{name}: {k}={saved_cfgs[name].get(k)!r} -> {mine[k]!r}" for k in diffs if k not in ("ep_size", "experts_backend")
        ]
        prefix = f"{name}." if name else ""
        upgrade_expert_state_dict(sd, f"{prefix}experts.")  # written with separate w1/w3
        ids = list(layer.local_expert_ids)
        for pname, _ in layer.experts.named_parameters():
            key = f"{prefix}experts.{pname}"
            sd[key] = sd[key][ids[0] : ids[-1] + 1]
    model.load_state_dict(sd)
    if reported:
        warnings.warn(
            f"checkpoint {path} loaded; the model runs with other settings than it was saved with: " + "; ".join(reported),
            stacklevel=2,
        )
    return payload["extra"]


def upgrade(old_path: str, new_path: str, trust_pickle: bool = False) -> Dict[str, Any]:
    """Rewrites a checkpoint that needs arbitrary unpickling (an older format) into the data-only
    form; the caller must say they trust the old file. Returns the new file's `extra`."""
    if not trust_pickle:
        raise UntrustedCheckpointError(
            f"upgrading {old_path} unpickles it, which can run code: pass trust_pickle=True "
            "(CLI: --trust-pickle) only for a file you wrote or trust"
        )
    payload = read(old_path, trust_pickle=True)
    extra = payload.get("extra") or {}
    # Tuples become lists; objects JSON cannot hold become their str() (reported).
    stringified: List[str] = []

    def as_text(obj):
        stringified.append(type(obj).__name__)
        return str(obj)

    extra = json.loads(json.dumps(extra, default=as_text))
    if stringified:
        warnings.warn(f"{old_path}: extra values of type(s) {sorted(set(stringified))} were stored as strings", stacklevel=2)
    check_extra(extra)
    model = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in payload["model"].items()}
    bad = sorted(k for k, v in model.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{old_path}: model entries {bad[:5]} are not tensors; cannot store them as data")
    new = {"format": FORMAT, "model": model, "moe_configs": json.loads(json.dumps(payload["moe_configs"])), "extra": extra}
    _atomic_save(new, new_path)
    return extra


def convert_deepspeed(ckpt_dir: str, out_path: str, tag: Optional[str] = None, trust_pickle: bool = False) -> Dict[str, Any]:
    """Converts a DeepSpeed checkpoint of a default_moe model into a resharding checkpoint.

    Args:
        ckpt_dir: the directory given to `engine.save_checkpoint`.
        out_path: the resharding checkpoint to write (atomically).
        tag: the checkpoint tag (default: the newest complete checkpoint, `manifest.resolve_tag`).
        trust_pickle: skip the check of DeepSpeed's module file (`check_deepspeed_files`) for a
            file you trust that holds other objects (e.g. client state with your own classes).

    Returns:
        The written payload's `extra`: {"source", "tag", "saved_ep_size"}.
    """
    import re

    # The named tag if complete (a torn one is refused), else the newest complete checkpoint.
    tag = manifest.resolve_tag(ckpt_dir, tag)
    if tag is None:
        raise FileNotFoundError(
            f"{ckpt_dir} has no complete checkpoint (nor a 'latest' file): pass the checkpoint tag explicitly"
        )
    tag_dir = os.path.join(ckpt_dir, str(tag))
    module_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(module_file):
        raise FileNotFoundError(
            f"{module_file} does not exist: not a DeepSpeed checkpoint directory/tag (ZeRO-3 checkpoints are not supported)"
        )
    pattern = EXPERT_FILE.format(ep_size="*", ep_rank="*")
    expert_files = sorted(glob.glob(os.path.join(tag_dir, pattern)))
    if not expert_files:
        native = glob.glob(os.path.join(tag_dir, "*expp_rank_*")) or glob.glob(os.path.join(tag_dir, "layer_*_expert_*"))
        if native:
            raise ValueError(
                f"{tag_dir} holds DeepSpeed-MoE expert files ({os.path.basename(sorted(native)[0])}, ...): a model built "
                "with deepspeed.moe.layer.MoE keeps DeepSpeed's own checkpoint layout, which convert-deepspeed does not "
                "convert (it converts models of default_moe.MoELayer layers). Resume it with engine.load_checkpoint at "
                "the same ep_size; its defaults are in the module state"
            )
        raise FileNotFoundError(
            f"{tag_dir} has no {pattern} files: it was not written by a model of "
            "default_moe.MoELayer layers with the default_moe section"
        )
    layouts = {}
    for path in expert_files:
        m = re.search(r"_ep(\d+)_rank(\d+)\.pt$", path)
        layouts.setdefault(int(m.group(1)), {})[int(m.group(2))] = path
    if len(layouts) != 1:
        raise ValueError(f"{tag_dir} mixes expert files of several ep_sizes {sorted(layouts)}")
    ((ep_size, files),) = layouts.items()
    if sorted(files) != list(range(ep_size)):
        raise ValueError(f"{tag_dir}: expert files for EP ranks {sorted(files)} of ep_size {ep_size}; some are missing")
    parts = []
    for r in range(ep_size):
        try:
            parts.append(torch.load(files[r], map_location="cpu", weights_only=True))
        except pickle.UnpicklingError:
            raise UntrustedCheckpointError(
                f"{files[r]} holds Python objects beyond tensors and plain data (default-moe writes none there); "
                "loading it could run code, so it is refused"
            ) from None
    if "moe_configs" not in parts[0]:
        raise ValueError(f"{files[0]} predates the MoE configs in expert files; re-save it with this version")
    if trust_pickle:
        warnings.warn(f"unpickling {module_file} with trust_pickle=True: this runs any code the file holds", stacklevel=2)
    else:
        check_deepspeed_files(tag_dir)  # before anything is unpickled
    if trust_pickle:
        module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    else:
        module = load_deepspeed_file(module_file)["module"]
    sd = {k: v.detach().cpu().clone() for k, v in module.items()}
    configs = parts[0]["moe_configs"]
    for name, params in parts[0]["experts"].items():
        prefix = f"{name}." if name else ""
        for pname in params:
            sd[f"{prefix}experts.{pname}"] = torch.cat([part["experts"][name][pname] for part in parts], dim=0)
    payload = {
        "format": FORMAT,
        "model": sd,
        "moe_configs": configs,
        "extra": {"source": os.path.abspath(tag_dir), "tag": str(tag), "saved_ep_size": ep_size},
    }
    _atomic_save(payload, out_path)
    return payload["extra"]


def saved_ep_sizes(tag_dir: str) -> List[int]:
    """The ep_size(s) of the expert files in a DeepSpeed tag folder written with default_moe."""
    sizes = set()
    for path in glob.glob(os.path.join(tag_dir, EXPERT_FILE.format(ep_size="*", ep_rank="*"))):
        name = os.path.basename(path)
        try:
            sizes.add(int(name.split("_ep", 1)[1].split("_", 1)[0]))
        except (IndexError, ValueError):
            continue
    return sorted(sizes)


UNIVERSAL_EP_REFUSAL = (
    "DeepSpeed's universal checkpoint converter merges parameters as data-parallel slices, and the "
    "experts of an expert-parallel run are different tensors with the same names on each EP rank (its "
    "ds_to_universal fails on them). To change the layout of an ep_size > 1 run, convert offline with "
    "`default-moe convert-deepspeed CKPT_DIR OUT.pt` and load it with default_moe.checkpoint.load at any "
    "ep_size (model weights and D; the optimizer restarts)"
)


def to_universal(ckpt_dir: str, tag: Optional[str] = None, output_tag: Optional[str] = None) -> str:
    """Converts a DeepSpeed checkpoint of a `"default_moe"` run into DeepSpeed's universal format,
    offline: DeepSpeed's own `ds_to_universal` (with `--inject_missing_state`), then default_moe's
    files (the experts and D), which that converter does not know, carried into the universal
    folder, and `latest_universal` pointed at it. Load it with `"checkpoint": {"load_universal":
    true}` at another data-parallel size. Runs at ep_size 1 only (see `UNIVERSAL_EP_REFUSAL`).

    Returns:
        The universal folder's tag (`<tag>_universal` by default).
    """
    import shutil
    import subprocess
    import sys

    tag = manifest.resolve_tag(ckpt_dir, tag)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint to convert")
    src = os.path.join(ckpt_dir, str(tag))
    sizes = saved_ep_sizes(src)
    if not sizes:
        raise ValueError(f"{src} has no {EXPERT_FILE.format(ep_size='N', ep_rank='R')}: not a default_moe DeepSpeed checkpoint")
    if sizes != [1]:
        raise ValueError(f"{src} was written at ep_size={sizes[-1]}: {UNIVERSAL_EP_REFUSAL}")
    check_deepspeed_files(src)  # nothing the converter unpickles holds what DeepSpeed does not write
    out_tag = output_tag or f"{tag}_universal"
    dst = os.path.join(ckpt_dir, out_tag)
    if os.path.exists(dst):
        raise ValueError(f"{dst} exists: remove it or choose another output tag")
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src]
    cmd += ["--output_folder", dst, "--inject_missing_state"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        raise ValueError(f"DeepSpeed's ds_to_universal failed on {src}:\n{res.stdout[-1500:]}{res.stderr[-1500:]}")
    for name in sorted(os.listdir(src)):
        if name.startswith("default_moe_") and name.endswith(".pt"):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    manifest.atomic_write_text(os.path.join(ckpt_dir, "latest_universal"), out_tag)
    return out_tag
