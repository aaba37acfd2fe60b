"""Default MoE in a loaded HuggingFace MoE model, in place, for any trainer (tested: plain DDP,
DeepSpeed ZeRO 2 and 3, the HF Trainer; FSDP2 not tested); experts replicated (no expert
parallelism; for EP use AutoEP, `integrations/autoep.py`).

    from default_moe.integrations import hf
    model = AutoModelForCausalLM.from_pretrained(path)
    hf.convert(model, router="default", beta=0.9, state_from=path)   # state_from: restore saved D

Blocks are recognised by structure (transformers 5.x): a router child (`gate` or `router`)
returning (logits, top-k weights, top-k indices) and experts called as `experts(x, idx, weights)`,
of a family listed in `FAMILIES` (one line each: how its router weights the selected experts).
Each block keeps its router, experts, parameters and names: the model still saves and loads in HF
format. Added per block: a `defaults` submodule (`ExpertDefaults`, buffer `defaults_ED` [E, H],
so `...mlp.defaults.defaults_ED` is in the state dict), a forward hook on the router that keeps
its logits, and a pre/post forward hook pair on the experts: the experts run once per (token,
slot) with unit weights — the same expert computations as HF's, one row per slot — so their raw
outputs feed the EMA; the block output is

    y_S + s sum_{i not selected} w_i D_i              (the family's gate not renormalised)
    y_S + sum_{i not selected} w_i (s D_i - y_S)      (renormalised over the selected experts)

(y_S = sum_k g_k E_{i_k}(x), w the dense weights of the family's scores in fp32, s its route
scale; derived in docs/method.md; experts whose D is still zero are skipped in the second form),
with g = the model's own top-k weights by default (`normalize_topk=None`), so a pretrained model
converted at D = 0 computes exactly what it did; `normalize_topk=False`/`True` override the
renormalisation. Sigmoid families put the term in the backward only unless `default_in_forward`.

A converted model's config records the settings (`config.default_moe`), so `save_pretrained`
writes them with D; `convert` on a model loaded from a local folder restores D from there
(`_load_own_defaults`), says when there is none, and refuses settings that change what D means.

The step contract (`default_moe.defaults`): D changes only at optimizer steps; training forwards
accumulate statistics (tokens whose `attention_mask` is 0 do not count: the model's
`attention_mask` is recorded at its forward), and the step of any torch optimizer holding the
block's parameters commits them over the data-parallel group (`group`, default: the whole world
when torch.distributed is initialised), so every replica holds the same D; under DeepSpeed the
engine's step does. Limit: with reentrant activation checkpointing (not transformers' default)
the statistics are taken in the recompute, which sees the mask of the latest model forward: two
forwards of differently padded batches before one backward need non-reentrant checkpointing.
Shared experts and HF's router aux loss are untouched. Router "topk" converts nothing (HF's outputs exactly).

Under ZeRO-3 the experts' parameters are gathered by DeepSpeed's own module hooks around the
experts' forward, which is where the raw outputs are computed, so the EMA sees full outputs.
Refused by name: the families in `REFUSED` (with the reason), a fused-shape block whose family
has no entry, routers other than default/topk, and models HF itself shards with tensor or expert
parallelism (`distributed_config`: tp/ep plans; the hooks would see local expert ids and partial
outputs).

Legend: T tokens, K top-k, E experts, H hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from default_moe.config import MoEConfig, check_adapter_settings, check_overrides
from default_moe.defaults import DefaultsForward, ExpertDefaults, GateForm, dense_scores, ran_mask


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF MoE family's router weights the experts it selects (read from its modeling
    code), as `defaults.GateForm` needs it. Selection itself (expert bias such as
    `e_score_correction_bias`, expert groups) is never re-done: the selected experts and their
    weights are taken from the experts' call.

    Attributes:
        score: "softmax" or "sigmoid" of the router logits.
        renormalizes: the selected weights are renormalised over the selected experts: True,
            False, or the name of the config attribute that says so (e.g. "norm_topk_prob").
        scale: the config attribute holding the route scale (e.g. "routed_scaling_factor").
    """

    score: str = "softmax"
    renormalizes: Any = True
    scale: Optional[str] = None

    def gate_form(self, config, normalize_topk: Optional[bool]) -> GateForm:
        """The family's gate on `config`, or with `normalize_topk` overriding the renormalisation."""
        renorm = self.model_renormalizes(config) if normalize_topk is None else bool(normalize_topk)
        scale = float(getattr(config, self.scale, None) or 1.0) if self.scale else 1.0
        return GateForm(self.score, renorm, scale)

    def model_renormalizes(self, config) -> bool:
        r = self.renormalizes
        return r if isinstance(r, bool) else bool(getattr(config, r, False))


# HF MoE families (the text config's model_type) whose blocks have the transformers 5.x shape:
# a router child (`gate` or `router`) returning (logits, top-k weights, top-k indices) and fused
# experts called as experts(hidden, top_k_index, top_k_weights). A new family of that shape needs
# one entry here.
FAMILIES: Dict[str, Family] = {
    "mixtral": Family("softmax", True),
    "qwen2_moe": Family("softmax", "norm_topk_prob"),
    "qwen3_moe": Family("softmax", "norm_topk_prob"),
    "qwen3_next": Family("softmax", "norm_topk_prob"),
    "qwen3_5_moe_text": Family("softmax", True),
    "olmoe": Family("softmax", "norm_topk_prob"),
    "flex_olmo": Family("softmax", "norm_topk_prob"),
    "minimax": Family("softmax", True),
    "ernie4_5_moe": Family("softmax", True),  # moe_statics: a selection-only bias
    "deepseek_v2": Family("softmax", False, "routed_scaling_factor"),
    "hunyuan_v1_moe": Family("softmax", True),
    "gpt_oss": Family("softmax", True),  # softmax over the top-k logits == renormalised softmax
    "granitemoe": Family("softmax", True),  # softmax over the top-k logits
    "granitemoeshared": Family("softmax", True),
    "granitemoehybrid": Family("softmax", True),
    "deepseek_v3": Family("sigmoid", "norm_topk_prob", "routed_scaling_factor"),
    "glm4_moe": Family("sigmoid", "norm_topk_prob", "routed_scaling_factor"),
}
# Families refused by name, with the reason (about the method or the block, not a missing entry).
REFUSED: Dict[str, str] = {
    "jetmoe": "its MoE blocks (a mixture of attention heads, JetMoeMoA, and JetMoeMoE with parallel experts) are not "
    "a router and experts(hidden, index, weights)",
    "dbrx": "its selected weights are divided by their Lp norm (moe_normalize_expert_weights), not a gate a_i / Z of "
    "the derivation (docs/method.md) unless p = 1",
    "phimoe": "its router is SparseMixer-v2 (sampled experts, masked-softmax multipliers), not a score gate; run "
    "Phi-3.5-MoE through AutoEP or MoELayer with router 'sparsemixer'",
}
HF_ROUTERS = ("default", "topk")
SETTINGS = (
    "router",
    "beta",
    "ema_weighting",
    "ema_stats_dtype",
    "nonfinite",
    "default_in_forward",
    "stale_defaults",
    "normalize_topk",
    "ema_sync",
    "ema_sync_every",
)  # the last two: removed, accepted with a warning


def check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    settings = check_adapter_settings(
        settings,
        SETTINGS,
        HF_ROUTERS,
        "default_moe.integrations.hf",
        "in-place HF conversion; the others run through AutoEP, DeepSpeed-MoE, Megatron or default_moe.MoELayer",
    )
    if settings.get("normalize_topk") not in (None, True, False):
        raise ValueError(
            f"default_moe.integrations.hf: normalize_topk must be None (as the model), true or false, "
            f"got {settings['normalize_topk']!r}"
        )
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
    """The hooks of one converted block (kept on the block as `_default_moe`).

    Args:
        gate: the gate form the block combines with (`Family.gate_form`).
        model_weights: combine with the model's own top-k weights (the gate form is the family's);
            else with the scores recomputed in fp32 for the overridden form.
    """

    def __init__(
        self,
        block: nn.Module,
        router: nn.Module,
        gate: GateForm,
        model_weights: bool,
        group,
        name: str,
        masks: Optional[_MaskSlot] = None,
    ) -> None:
        self.block, self.gate, self.model_weights, self.group, self.name = block, gate, model_weights, group, name
        self.masks = masks
        self.call = _Call()
        self.handles = [
            router.register_forward_hook(self._router_out),
            block.experts.register_forward_pre_hook(self._experts_in),
            block.experts.register_forward_hook(self._experts_out),
        ]

    def _router_out(self, module, args, out) -> None:
        self.call = _Call(logits_TE=out[0] if isinstance(out, (tuple, list)) else out)

    def _experts_in(self, module, args):
        if len(args) < 3:
            raise RuntimeError(
                f"{self.name}: default-moe expects the experts to be called as experts(hidden, top_k_index, "
                f"top_k_weights) with positional arguments (got {len(args)})"
            )
        x_TH, idx_TK, weights_TK = args[:3]
        if self.call.logits_TE is None:
            raise RuntimeError(
                f"{self.name}: the experts ran without the router's logits (default-moe expects the "
                "block to call its router, then its experts)"
            )
        T, K = idx_TK.shape
        mask_T = self.masks.tokens(T) if self.masks is not None else None
        self.call.fwd = self.block.defaults.begin_forward(self.block.training, "hf convert", mask_T=mask_T)
        self.call.idx_TK, self.call.weights_TK = idx_TK, weights_TK
        # One row per (token, slot), unit weight: the experts return each slot's raw output.
        x_NH = x_TH.unsqueeze(1).expand(T, K, x_TH.shape[-1]).reshape(T * K, -1)
        return (x_NH, idx_TK.reshape(T * K, 1), torch.ones(T * K, 1, dtype=weights_TK.dtype, device=weights_TK.device))

    def _experts_out(self, module, args, raw_NH):
        call, self.call = self.call, _Call()
        defaults, gate = self.block.defaults, self.gate
        idx_TK = call.idx_TK.long()
        T, K = idx_TK.shape
        y_TKH = raw_NH.reshape(T, K, -1)
        scores_TE = dense_scores(call.logits_TE.reshape(T, -1), gate.score_function)
        scores_TK = scores_TE.gather(1, idx_TK)
        if self.model_weights:
            gates_TK = call.weights_TK.float()  # the model's own: converted at D = 0 == unconverted
        else:
            gates_TK = scores_TK / scores_TK.sum(-1, keepdim=True) if gate.renormalized else scores_TK
            gates_TK = gates_TK * gate.scale
        defaults.observe(call.fwd, y_TKH, idx_TK, scores_TK, None, anchor=scores_TE)
        with torch.autocast(device_type=y_TKH.device.type, enabled=False):
            out_TH = (y_TKH.float() * gates_TK.unsqueeze(-1)).sum(1)
        out_TH = out_TH + defaults.default_term(call.fwd, scores_TE, ran_mask(scores_TE.shape[1], idx_TK), routed_TD=out_TH)
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
            "Load it unsharded and use DeepSpeed (AutoEP for expert parallelism) or DDP/FSDP2"
        )


def _router_of(block: nn.Module) -> Optional[nn.Module]:
    for attr in ("gate", "router"):
        child = getattr(block, attr, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _router_weight(router: nn.Module) -> Optional[torch.Tensor]:
    """The router's [E, H] weight (its first 2-D parameter: `weight`, or `wg.weight`; under ZeRO-3
    the partitioned parameter's full shape)."""
    return next((p for p in router.parameters() if len(_full_shape(p)) == 2), None)


def _full_shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


def _has_fused_shape(block: nn.Module) -> bool:
    """A router child with an [E, H] weight and experts called as experts(hidden, index, weights)."""
    router, experts = _router_of(block), getattr(block, "experts", None)
    if router is None or not isinstance(experts, nn.Module) or _router_weight(router) is None:
        return False
    try:
        params = [
            p
            for p in inspect.signature(experts.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", "") or ""


def moe_blocks(model: nn.Module) -> List[tuple]:
    """(qualified name, block) of the model's sparse MoE blocks, recognised by structure (see
    `FAMILIES`); MoE blocks of a refused or unknown family are refused by name."""
    kind = model_type(model)
    found, other = [], []
    for name, module in model.named_modules():
        if getattr(module, "_default_moe", None) is not None or (_has_fused_shape(module) and kind in FAMILIES):
            found.append((name, module))
        elif _has_fused_shape(module) or (
            ("Moe" in type(module).__name__ or "MoE" in type(module).__name__) and hasattr(module, "experts")
        ):
            other.append(f"{name} ({type(module).__name__})")
    if other:
        where = f"{other[:4]}{' ...' if len(other) > 4 else ''}"
        if kind in REFUSED:
            raise ValueError(f"default-moe cannot convert {kind!r} MoE block(s) {where}: {REFUSED[kind]}")
        raise ValueError(
            f"default-moe cannot convert MoE block(s) {where} of model_type {kind!r}: no entry in "
            f"default_moe.integrations.hf.FAMILIES (its router's score function, renormalisation and scale). Blocks with "
            f"a router returning (logits, weights, index) and experts(hidden, index, weights) need one entry; "
            f"converted: {sorted(FAMILIES)}"
        )
    return found


def family_table() -> str:
    """The table of HF families in docs/hf.md, from `FAMILIES` and `REFUSED`."""
    rows = ["| model_type | status | router scores | selected weights | route scale |", "|---|---|---|---|---|"]
    for kind, fam in sorted(FAMILIES.items()):
        renorm = {True: "renormalised", False: "raw"}.get(fam.renormalizes, f"config `{fam.renormalizes}`")
        rows.append(f"| `{kind}` | converted | {fam.score} | {renorm} | {f'config `{fam.scale}`' if fam.scale else '1'} |")
    for kind, why in sorted(REFUSED.items()):
        rows.append(f"| `{kind}` | refused: {why} | | | |")
    return "\n".join(rows)


# The settings a converted model's config records (`config.default_moe`); a later conversion with
# different values of the first three would change what D means or how it enters, so it is refused.
RECORDED = ("router", "normalize_topk", "ema_weighting", "default_in_forward", "beta")
MEANING = ("router", "normalize_topk", "ema_weighting")


def convert(
    model: nn.Module, router: str = "default", group=None, state_from: Optional[str] = None, **settings: Any
) -> nn.Module:
    """Converts every sparse MoE block of `model` in place (the families in `FAMILIES`); returns
    `model`.

    Args:
        router: "default" (Default MoE) or "topk" (no change: HF's own blocks).
        group: the data-parallel process group the EMA statistics are summed over (default: the
            world, looked up at each forward, so converting before init_process_group is fine).
        state_from: a `save_pretrained` folder (or a .safetensors / .bin file) to restore the
            blocks' `defaults_ED` from. None: the folder the model was loaded from
            (`config._name_or_path`) when it is a local one; its D is used when present, and its
            absence is said (zeros: right for a model never trained with Default MoE).
        settings: beta, ema_weighting, ema_stats_dtype, nonfinite, default_in_forward,
            normalize_topk (None, the default: as the model's own block; see the module docstring).
    """
    settings = check_settings({"router": router, **settings})
    check_not_sharded_by_hf(model)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no sparse MoE block of a supported family ({sorted(FAMILIES)})")
    if router == "topk":
        return model
    normalize_setting = settings.pop("normalize_topk", None)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    family = FAMILIES[model_type(model)]
    gate = family.gate_form(config, normalize_setting)
    _check_recorded(model, {**settings, "normalize_topk": gate.renormalized})
    masks = getattr(model, "_default_moe_masks", None)
    if masks is None:
        masks = _MaskSlot()
        model._default_moe_masks = masks
        model._default_moe_mask_hook = model.register_forward_pre_hook(masks.hook, with_kwargs=True)
    for name, block in blocks:
        if getattr(block, "_default_moe", None) is not None:
            raise ValueError(f"{name} is already converted")
        gate_module = _router_of(block)
        E, H = _full_shape(_router_weight(gate_module))
        K = getattr(gate_module, "top_k", None) or config.num_experts_per_tok
        moe_config = MoEConfig(
            hidden_size=H,
            num_experts=E,
            ffn_hidden_size=1,
            top_k=K,
            aux_loss_coeff=0.0,
            normalize_topk=gate.renormalized,
            score_function=gate.score_function,
            route_scale=gate.scale,
            **settings,
        )
        device = _router_weight(gate_module).device
        block.defaults = ExpertDefaults.from_config(moe_config, E, H, name=name, gate=gate).to(device)
        block.defaults.bind(block, functools.partial(_data_parallel_group, group))
        model_weights = gate.renormalized == family.model_renormalizes(config)
        block._default_moe = _BlockHooks(block, gate_module, gate, model_weights, group, name, masks)
    _record(model, {**settings, "normalize_topk": gate.renormalized})
    if state_from is not None:
        load_defaults(model, state_from)
    else:
        _load_own_defaults(model)
    return model


def _record(model: nn.Module, settings: Dict[str, Any]) -> None:
    """Writes the settings into the model's config, so `save_pretrained` keeps them."""
    record = {k: settings.get(k) for k in RECORDED}
    record["router"] = settings.get("router", "default")
    model.config.default_moe = record


def _check_recorded(model: nn.Module, settings: Dict[str, Any]) -> None:
    recorded = getattr(model.config, "default_moe", None)
    if not isinstance(recorded, dict):
        return
    wanted = {k: settings.get(k, "default" if k == "router" else None) for k in MEANING}
    wanted["ema_weighting"] = wanted["ema_weighting"] or "mean"
    saved = {k: recorded.get(k) if recorded.get(k) is not None else ("mean" if k == "ema_weighting" else None) for k in MEANING}
    diff = {k: (saved[k], wanted[k]) for k in MEANING if saved[k] != wanted[k]}
    if diff:
        raise ValueError(
            f"this model was saved converted with other Default MoE settings ({', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in diff.items())}): "
            "its D would mean something else. Convert with the saved settings (config.default_moe), or delete "
            "model.config.default_moe to start over from zero defaults"
        )


def _load_own_defaults(model: nn.Module) -> None:
    """D from the local folder the model was loaded from, when it has them (from_pretrained drops
    keys the unconverted model does not have)."""
    source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    path = Path(source) if source else None
    if path is None or not path.is_dir():
        if getattr(model.config, "default_moe", None) is not None and source:
            warnings.warn(
                f"default-moe: {source!r} is not a local folder; the saved defaults D could not be read, "
                "Default MoE starts from zero defaults (pass state_from= to restore them)",
                stacklevel=3,
            )
        return
    want = [f"{name}.defaults.defaults_ED" for name, _ in moe_blocks(model)]
    if _read_keys(path, set(want)):
        load_defaults(model, str(path))
    else:
        warnings.warn(
            f"default-moe: {path} has no saved defaults (keys like {want[0]}): Default MoE starts from zero "
            "defaults — right for a model never trained with Default MoE",
            stacklevel=3,
        )


def load_defaults(model: nn.Module, path: str) -> List[str]:
    """Restores the converted blocks' `defaults_ED` from a saved HF checkpoint; returns the keys.

    Raises if the checkpoint has none of them (D would silently start from zeros)."""
    want = {
        f"{name}.defaults.defaults_ED": block for name, block in moe_blocks(model) if getattr(block, "defaults", None) is not None
    }
    found = _read_keys(Path(path), set(want))
    if not found:
        raise ValueError(
            f"{path}: no default-moe defaults (keys like {next(iter(want), '...')}) in this checkpoint; "
            "it was saved before conversion, or D was filtered out"
        )
    missing = sorted(set(want) - set(found))
    if missing:
        raise ValueError(f"{path}: defaults missing for {missing[:4]} (the checkpoint holds {len(found)} of {len(want)})")
    with torch.no_grad():
        for key, value in found.items():
            want[key].defaults.defaults_ED.copy_(value)
    return sorted(found)


SUFFIX = ".defaults.defaults_ED"


def _read_keys(path: Path, keys: set) -> Dict[str, torch.Tensor]:
    """The saved `defaults_ED` tensors for `keys` (model names). `save_pretrained` may write a
    family's legacy names (MiniMax: `block_sparse_moe` for `mlp`): a saved key whose layer numbers
    equal a wanted key's stands for it when the names differ only there."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    saved = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if k.endswith(SUFFIX):
                        saved[k] = sf.get_tensor(k)
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            saved.update({k: v for k, v in sd.items() if k.endswith(SUFFIX)})
    found = {k: saved[k] for k in keys if k in saved}
    by_numbers: Dict[tuple, List[str]] = {}
    for k in saved:
        by_numbers.setdefault(_layer_numbers(k), []).append(k)
    for k in set(keys) - set(found):
        candidates = by_numbers.get(_layer_numbers(k), [])
        if len(candidates) == 1 and candidates[0] not in keys:
            found[k] = saved[candidates[0]]
    return found


def _layer_numbers(key: str) -> tuple:
    return tuple(int(part) for part in key.split(".") if part.isdigit())


def unconvert(model: nn.Module) -> nn.Module:
    """Removes the hooks and the `defaults` submodules (the HF model as it was)."""
    for _, block in moe_blocks(model):
        hooks = getattr(block, "_default_moe", None)
        if hooks is not None:
            hooks.remove()
            del block._default_moe
            del block.defaults
    if hasattr(model.config, "default_moe"):
        del model.config.default_moe
    handle = getattr(model, "_default_moe_mask_hook", None)
    if handle is not None:
        handle.remove()
        del model._default_moe_mask_hook, model._default_moe_masks
    return model
