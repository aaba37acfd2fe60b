"""Default MoE in a loaded HuggingFace MoE model, in place, for any trainer (tested: plain DDP,
DeepSpeed ZeRO 2 and 3, the HF Trainer; FSDP2 not tested); experts replicated (no expert
parallelism; for EP use AutoEP, `integrations/autoep.py`).

    from default_moe.integrations import hf
    model = AutoModelForCausalLM.from_pretrained(path)
    hf.convert(model, router="default", beta=0.9, state_from=path)   # state_from: restore saved D

Supported blocks (transformers 5.x): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. Each keeps its own
router (`gate`: logits, top-k weights, top-k indices) and experts (`experts(x, idx, weights)`),
parameters and names: the model still saves and loads in HF format. Added per block: a `defaults`
submodule (`ExpertDefaults`, buffer `defaults_ED` [E, H], so `...mlp.defaults.defaults_ED` is in
the state dict), a forward hook on the router that keeps its logits, and a pre/post forward hook
pair on the experts: the experts run once per (token, slot) with unit weights — the same expert
computations as HF's, one row per slot — so their raw outputs feed the EMA; the block output is

    sum_{k} g_k E_{i_k}(x) + sum_{i not selected} pi_i D_i,     pi = softmax(router logits) in fp32

with g = the model's own top-k weights by default (`normalize_topk=None`: Mixtral renormalises
over the selected experts, Qwen2/Qwen3-MoE and OLMoE follow `norm_topk_prob`), so a pretrained
model converted at D = 0 computes exactly what it did; `normalize_topk=False` is the paper's raw
pi (changes a renormalising model's function at step 0), `True` forces renormalisation.

The step contract (`default_moe.defaults`): D changes only at optimizer steps; training forwards
accumulate statistics (tokens whose `attention_mask` is 0 do not count: the model's
`attention_mask` is recorded at its forward), and the step of any torch optimizer holding the
block's parameters commits them over the data-parallel group (`group`, default: the whole world
when torch.distributed is initialised), so every replica holds the same D; under DeepSpeed the
engine's step does. Limit: with reentrant activation checkpointing (not transformers' default)
the statistics are taken in the recompute, which sees the mask of the latest model forward: two
forwards of differently padded batches before one backward need non-reentrant checkpointing. Shared experts (Qwen2-MoE)
and HF's router aux loss are untouched. Router "topk" converts nothing (HF's outputs exactly).

Under ZeRO-3 the experts' parameters are gathered by DeepSpeed's own module hooks around the
experts' forward, which is where the raw outputs are computed, so the EMA sees full outputs.
Refused by name: other MoE blocks (e.g. DeepSeek-V3's sigmoid router: the default term would add
~0.5 D_i for every unselected expert), routers other than default/topk, and models HF itself
shards with tensor or expert parallelism (`distributed_config`: tp/ep plans; the hooks would see
local expert ids and partial outputs).

Legend: T tokens, K top-k, E experts, H hidden.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from default_moe.config import MoEConfig, check_overrides, drop_legacy
from default_moe.defaults import DefaultsForward, ExpertDefaults, dense_softmax, ran_mask

# HF block class -> its config's (experts, top-k, renormalise-top-k) attributes (True: always
# renormalises). All four route with a softmax.
SUPPORTED = {
    "MixtralSparseMoeBlock": ("num_local_experts", "num_experts_per_tok", True),
    "Qwen2MoeSparseMoeBlock": ("num_experts", "num_experts_per_tok", "norm_topk_prob"),
    "Qwen3MoeSparseMoeBlock": ("num_experts", "num_experts_per_tok", "norm_topk_prob"),
    "OlmoeSparseMoeBlock": ("num_experts", "num_experts_per_tok", "norm_topk_prob"),
}
HF_ROUTERS = ("default", "topk")
SETTINGS = ("router", "beta", "ema_weighting", "ema_stats_dtype", "nonfinite", "default_in_forward", "normalize_topk",
            "ema_sync", "ema_sync_every")  # the last two: removed, accepted with a warning


def check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"default_moe.integrations.hf: unknown setting(s) {unknown}; allowed: {list(SETTINGS)}")
    router = settings.get("router", "default")
    if router not in HF_ROUTERS:
        raise ValueError(f"router {router!r} is not available for in-place HF conversion (supported: {list(HF_ROUTERS)}; "
                         "the others run through AutoEP, DeepSpeed-MoE, Megatron or default_moe.MoELayer)")
    settings = drop_legacy(settings, "default_moe.integrations.hf")
    if settings.get("normalize_topk") not in (None, True, False):
        raise ValueError(f"default_moe.integrations.hf: normalize_topk must be None (as the model), true or false, "
                         f"got {settings['normalize_topk']!r}")
    check_overrides({k: v for k, v in settings.items() if not (k == "normalize_topk" and v is None)})
    return settings


@dataclasses.dataclass
class _Call:
    """One block forward's state between the router hook and the experts' hooks."""

    fwd: Optional[DefaultsForward] = None
    logits_TE: Optional[torch.Tensor] = None
    idx_TK: Optional[torch.Tensor] = None
    weights_TK: Optional[torch.Tensor] = None


class _MaskSlot:
    """The model's latest `attention_mask` (recorded by a pre-hook on the model's forward)."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None

    def hook(self, module, args, kwargs) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def tokens(self, T: int) -> Optional[torch.Tensor]:
        """[T] bool of the tokens that count, when the recorded mask covers T tokens."""
        if self.mask is None or self.mask.numel() != T:
            return None
        return self.mask.reshape(-1) != 0


class _BlockHooks:
    """The hooks of one converted block (kept on the block as `_default_moe`)."""

    def __init__(self, block: nn.Module, normalize_topk: bool, group, name: str, masks: Optional[_MaskSlot] = None) -> None:
        self.block, self.normalize_topk, self.group, self.name = block, normalize_topk, group, name
        self.masks = masks
        self.call = _Call()
        self.handles = [
            block.gate.register_forward_hook(self._router_out),
            block.experts.register_forward_pre_hook(self._experts_in),
            block.experts.register_forward_hook(self._experts_out),
        ]

    def _router_out(self, module, args, out) -> None:
        self.call = _Call(logits_TE=out[0])

    def _experts_in(self, module, args):
        if len(args) < 3:
            raise RuntimeError(f"{self.name}: default-moe expects the experts to be called as experts(hidden, top_k_index, "
                               f"top_k_weights) with positional arguments (got {len(args)})")
        x_TH, idx_TK, weights_TK = args[:3]
        if self.call.logits_TE is None:
            raise RuntimeError(f"{self.name}: the experts ran without the router's logits (default-moe expects the "
                               "block to call its gate, then its experts, as HF's Mixtral/Qwen/OLMoE blocks do)")
        T, K = idx_TK.shape
        mask_T = self.masks.tokens(T) if self.masks is not None else None
        self.call.fwd = self.block.defaults.begin_forward(self.block.training, "hf convert", mask_T=mask_T)
        self.call.idx_TK, self.call.weights_TK = idx_TK, weights_TK
        # One row per (token, slot), unit weight: the experts return each slot's raw output.
        x_NH = x_TH.unsqueeze(1).expand(T, K, x_TH.shape[-1]).reshape(T * K, -1)
        return (x_NH, idx_TK.reshape(T * K, 1), torch.ones(T * K, 1, dtype=weights_TK.dtype, device=weights_TK.device))

    def _experts_out(self, module, args, raw_NH):
        call, self.call = self.call, _Call()
        defaults = self.block.defaults
        idx_TK = call.idx_TK.long()
        T, K = idx_TK.shape
        y_TKH = raw_NH.reshape(T, K, -1)
        probs_TE = dense_softmax(call.logits_TE.reshape(T, -1))
        probs_TK = probs_TE.gather(1, idx_TK)
        gates_TK = call.weights_TK.float() if self.normalize_topk else probs_TK
        defaults.observe(call.fwd, y_TKH, idx_TK, probs_TK, None, anchor=probs_TE)
        with torch.autocast(device_type=y_TKH.device.type, enabled=False):
            out_TH = (y_TKH.float() * gates_TK.unsqueeze(-1)).sum(1)
        out_TH = out_TH + defaults.default_term(call.fwd, probs_TE, ran_mask(probs_TE.shape[1], idx_TK))
        return out_TH.to(raw_NH.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _data_parallel_group(group):
    if group is not None:
        return group
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


def check_not_sharded_by_hf(model: nn.Module) -> None:
    """Refuses models HF's own tensor/expert parallel plans shard (local ids, partial outputs)."""
    config = getattr(model, "config", None)
    dc = getattr(config, "distributed_config", None)
    if dc is None:
        return
    tp, ep = getattr(dc, "tp_size", None) or 1, getattr(dc, "ep_size", None) or 1
    if tp > 1 or ep > 1 or getattr(dc, "enable_expert_parallel", False) or getattr(dc, "tp_plan", None):
        raise ValueError(
            f"default-moe cannot convert a model sharded by HF's own parallel plans (distributed_config: tp_size={tp}, "
            f"ep_size={ep}, enable_expert_parallel={getattr(dc, 'enable_expert_parallel', False)}, "
            f"tp_plan={getattr(dc, 'tp_plan', None)!r}): the hooks would see local expert ids and partial outputs. "
            "Load it unsharded and use DeepSpeed (AutoEP for expert parallelism) or DDP/FSDP2")


def moe_blocks(model: nn.Module) -> List[tuple]:
    """(qualified name, block) of the model's sparse MoE blocks; unsupported ones refused by name."""
    found, refused = [], []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in SUPPORTED:
            found.append((name, module))
        elif ("Moe" in cls or "MoE" in cls) and hasattr(module, "experts") and hasattr(module, "gate"):
            refused.append(f"{name} ({cls})")
    if refused:
        raise ValueError(f"default-moe cannot convert MoE block(s) {refused[:4]}{' ...' if len(refused) > 4 else ''}: "
                         f"supported: {sorted(SUPPORTED)} (softmax routers with gate/experts; sigmoid routers such as "
                         "DeepSeek-V3's are refused: the default term would add ~0.5 D_i per unselected expert)")
    return found


def convert(model: nn.Module, router: str = "default", group=None, state_from: Optional[str] = None,
            **settings: Any) -> nn.Module:
    """Converts every supported sparse MoE block of `model` in place; returns `model`.

    Args:
        router: "default" (Default MoE) or "topk" (no change: HF's own blocks).
        group: the data-parallel process group the EMA statistics are summed over (default: the
            world, looked up at each forward, so converting before init_process_group is fine).
        state_from: a `save_pretrained` folder (or a .safetensors / .bin file) to restore the
            blocks' `defaults_ED` from (`from_pretrained` drops keys the HF model does not have).
        settings: beta, ema_weighting, ema_stats_dtype, nonfinite, default_in_forward,
            normalize_topk (None, the default: as the model's own block; see the module docstring).
    """
    settings = check_settings({"router": router, **settings})
    check_not_sharded_by_hf(model)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no supported sparse MoE block ({sorted(SUPPORTED)})")
    if router == "topk":
        return model
    normalize_setting = settings.pop("normalize_topk", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    masks = getattr(model, "_default_moe_masks", None)
    if masks is None:
        masks = _MaskSlot()
        model._default_moe_masks = masks
        model._default_moe_mask_hook = model.register_forward_pre_hook(masks.hook, with_kwargs=True)
    for name, block in blocks:
        if getattr(block, "_default_moe", None) is not None:
            raise ValueError(f"{name} is already converted")
        experts_attr, topk_attr, renorm = SUPPORTED[type(block).__name__]
        E, K, H = getattr(config, experts_attr), getattr(config, topk_attr), config.hidden_size
        normalize_topk = normalize_setting
        if normalize_topk is None:  # as the model's own block: converted at D = 0 == unconverted
            normalize_topk = renorm if isinstance(renorm, bool) else bool(getattr(config, renorm, False))
        moe_config = MoEConfig(hidden_size=H, num_experts=E, ffn_hidden_size=1, top_k=K, aux_loss_coeff=0.0,
                               normalize_topk=bool(normalize_topk), **settings)
        device = block.gate.weight.device
        block.defaults = ExpertDefaults.from_config(moe_config, E, H, name=name).to(device)
        block.defaults.bind(block, functools.partial(_data_parallel_group, group))
        block._default_moe = _BlockHooks(block, bool(normalize_topk), group, name, masks)
    if state_from is not None:
        load_defaults(model, state_from)
    return model


def load_defaults(model: nn.Module, path: str) -> List[str]:
    """Restores the converted blocks' `defaults_ED` from a saved HF checkpoint; returns the keys.

    Raises if the checkpoint has none of them (D would silently start from zeros)."""
    want = {f"{name}.defaults.defaults_ED": block for name, block in moe_blocks(model)
            if getattr(block, "defaults", None) is not None}
    found = _read_keys(Path(path), set(want))
    if not found:
        raise ValueError(f"{path}: no default-moe defaults (keys like {next(iter(want), '...')}) in this checkpoint; "
                         "it was saved before conversion, or D was filtered out")
    missing = sorted(set(want) - set(found))
    if missing:
        raise ValueError(f"{path}: defaults missing for {missing[:4]} (the checkpoint holds {len(found)} of {len(want)})")
    with torch.no_grad():
        for key, value in found.items():
            want[key].defaults.defaults_ED.copy_(value)
    return sorted(found)


def _read_keys(path: Path, keys: set) -> Dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    found = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k in keys:
                        found[k] = sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in sd.items() if k in keys})
    return found


def unconvert(model: nn.Module) -> nn.Module:
    """Removes the hooks and the `defaults` submodules (the HF model as it was)."""
    for _, block in moe_blocks(model):
        hooks = getattr(block, "_default_moe", None)
        if hooks is not None:
            hooks.remove()
            del block._default_moe
            del block.defaults
    handle = getattr(model, "_default_moe_mask_hook", None)
    if handle is not None:
        handle.remove()
        del model._default_moe_mask_hook, model._default_moe_masks
    return model
