"""Configuration of one MoE layer.

`MoEConfig` is the single source of truth for every knob of the layer; the DeepSpeed section and
the Megatron arguments (later integrations) are translated into it. Every field is validated in
`__post_init__`, so a bad value fails with a `ValueError` naming the field and the allowed values
before any process group is touched or any weight is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

ACTIVATIONS = ("swiglu", "gelu")
EMA_WEIGHTINGS = ("mean", "prob")
EMA_STATS_DTYPES = ("float32", "bfloat16")
NONFINITE_MODES = ("skip", "raise")
STALE_DEFAULTS = ("keep", "zero", "mean")
DROP_POLICIES = ("probs", "position")
EXPERTS_BACKENDS = ("auto", "loop", "grouped_mm")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
# Routers that pick experts from the linear router's scores (the modern-routing options apply).
SCORE_ROUTERS = ("topk", "default")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MoEConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float, hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"MoEConfig.{name} must be a number in [{lo}, {hi}{bracket}, got {value!r}")


def _did_you_mean(value: Any, allowed) -> str:
    if not isinstance(value, str):
        return ""
    lowered = {a.lower(): a for a in allowed if isinstance(a, str)}
    match = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
    return f"; did you mean {lowered[match[0]]!r}?" if match else ""


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{name} must be one of {list(allowed)}, got {value!r}{_did_you_mean(value, allowed)}")


SPARSEMIXER_VERSIONS = ("auto", "v1", "v2")


@dataclass
class SparseMixerConfig:
    """SparseMixer (Liu et al. 2023; v2 from GRIN-MoE) settings.

    Args:
        version: "v1" (top-1, mid-point estimator, learnable omega), "v2" (top-2, Heun-style
            scale) or "auto" (v1 for top_k=1, v2 for top_k=2).
        jitter_eps: the masking threshold epsilon; None: 0.1 for v1 (SparseMixer's recipe), 0.01
            for v2 (Phi-3.5-MoE's router_jitter_noise).
    """

    version: str = "auto"
    jitter_eps: Optional[float] = None

    def __post_init__(self) -> None:
        if self.version not in SPARSEMIXER_VERSIONS:
            raise ValueError(f"MoEConfig.sparsemixer.version must be one of {list(SPARSEMIXER_VERSIONS)}, got {self.version!r}")
        if self.jitter_eps is not None:
            ok = isinstance(self.jitter_eps, (int, float)) and not isinstance(self.jitter_eps, bool)
            if not ok or not (0.0 <= self.jitter_eps < 1.0):
                raise ValueError(f"MoEConfig.sparsemixer.jitter_eps must be a number in [0, 1), got {self.jitter_eps!r}")

    def resolved(self, top_k: int) -> "tuple[str, float]":
        version = self.version if self.version != "auto" else {1: "v1", 2: "v2"}.get(top_k, "v2")
        eps = self.jitter_eps if self.jitter_eps is not None else (0.1 if version == "v1" else 0.01)
        return version, eps


@dataclass
class StableMoEConfig:
    """StableMoE (Dai et al. 2022) settings.

    Args:
        vocab_size: size of the token-id vocabulary of the distilled router's embedding (required).
        router_dim: width of the distilled router (paper: 50).
        balance_coeff: weight of the stage-1 balance loss (paper/README: 0.3).
        distill_coeff: weight of the stage-1 distillation loss (README: 0.3).
        stage2_step: training forwards (micro-batches) after which routing is frozen to the
            distilled router (paper: 10% of training). Required.
    """

    vocab_size: Optional[int] = None
    router_dim: int = 50
    balance_coeff: float = 0.3
    distill_coeff: float = 0.3
    stage2_step: Optional[int] = None

    def check(self) -> None:
        for name in ("vocab_size", "stage2_step"):
            v = getattr(self, name)
            if v is None:
                raise ValueError(f"MoEConfig.stablemoe.{name} is required with router 'stablemoe'")
        _check_int("stablemoe.vocab_size", self.vocab_size, 1)
        _check_int("stablemoe.router_dim", self.router_dim, 1)
        _check_int("stablemoe.stage2_step", self.stage2_step, 0)
        _check_float("stablemoe.balance_coeff", self.balance_coeff, 0.0, math.inf, hi_open=True)
        _check_float("stablemoe.distill_coeff", self.distill_coeff, 0.0, math.inf, hi_open=True)


def _nested(name: str, value: Any, cls: type):
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig.{name} field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**value)
    raise ValueError(f"MoEConfig.{name} must be a mapping of its fields, got {type(value).__name__}")


@dataclass
class MoEConfig:
    """Everything one MoE layer needs to know.

    Args:
        hidden_size: model width D (input and output of the layer).
        num_experts: total number of experts E across all expert-parallel ranks.
        ffn_hidden_size: hidden width F of each expert MLP.
        top_k: experts activated per token K.
        router: routing method; one of the registered routers ("topk", "default").
        activation: expert MLP type, "swiglu" or "gelu".
        normalize_topk: renormalise the K selected probabilities to sum to 1. Off by default: the
            Default MoE paper combines with the raw softmax probabilities pi. On, Default MoE's
            term becomes sum_{i not run} w_i (s D_i - y_S) (`defaults.GateForm`).
        ep_size: expert-parallel group size; E must divide by it and the world size by it.
        capacity_factor: None for dropless routing; a positive number caps each expert at
            ceil(capacity_factor * T * K / E) token slots per rank and drops the rest.
        drop_policy: which slots survive when an expert is over capacity: the highest-probability
            ones ("probs") or the earliest tokens ("position").
        aux_loss_coeff: Switch load-balancing loss coefficient (token counts reduced over DP).
        z_loss_coeff: router z-loss coefficient.
        beta: EMA decay of the expert default vectors, in [0, 1).
        ema_weighting: "mean" (plain mean of raw expert outputs) or "prob" (pi-weighted mean).
        ema_stats_dtype: dtype of the all-reduced EMA statistics, "float32" or "bfloat16" (half
            the bytes; D itself stays fp32). D is committed once per optimizer step (see
            `default_moe.defaults`); the removed `ema_sync`/`ema_sync_every` are accepted with a
            warning and ignored.
        default_in_forward: add the default term to the forward output (the paper). False keeps
            the exact TopK forward and only adds the term's gradient (the dense router gradient,
            e.g. d y / d pi_j = D_j for unselected j), separating it from D acting as a bias in the
            forward. None (auto): True for softmax scores, False for sigmoid scores (their dense
            mixture gives most of its mass to the unselected experts; `defaults.GateForm`).
        stale_defaults: what the default D_i of an expert that received no token in a step does at
            that step's commit: "keep" (the paper: D_i stays), "zero" (decays toward zero at the EMA
            rate, D_i <- beta D_i) or "mean" (toward the mean of the other experts' D). A kept D of
            an expert the router stopped using is a bias every token still receives through
            pi_i D_i (docs/measurements.md, the collapse study).
        nonfinite: what a non-finite router probability or expert output does: "skip" (that
            expert's D keeps its value this step, counted) or "raise" (FloatingPointError naming
            the layer and step; costs a host sync per forward).
        score_function: router scores, "softmax" over all experts or "sigmoid" per expert
            (DeepSeek-V3, GLM-4.5). Default MoE derives its term per gate form
            (`defaults.GateForm`; docs/method.md).
        route_scale: multiplies the selected gates (after `normalize_topk`), megatron-core's
            `moe_router_topk_scaling_factor`, torchtitan's `route_scale`.
        expert_bias: aux-loss-free load balancing: a per-expert bias added to the scores for
            selection only, updated once per optimizer step from the load over the data-parallel
            group (`routing.expert_bias`).
        expert_bias_update_rate: its step (megatron-core's `moe_router_bias_update_rate`).
        num_expert_groups / group_topk: group-limited routing (DeepSeek-V3's node-limited routing):
            experts in `num_expert_groups` equal groups; each token picks `group_topk` groups by the
            sum of its top-(top_k / group_topk) scores in each group, then its top-k inside them.
        shared_expert_ffn_hidden_size: width of a dense shared expert beside the routed ones (0:
            none), added to every token's output; `shared_expert_gate` scales it by
            sigmoid(w . x) per token (Qwen2-MoE, megatron-core's `moe_shared_expert_gate`).
        init_std: std of the normal initialisation of router and expert weights.
        experts_backend: how the local experts' GEMMs run: "loop" (one GEMM per expert),
            "grouped_mm" (`torch._grouped_mm`, one grouped GEMM for all local experts) or "auto"
            (grouped_mm for bf16/fp16 on CUDA where torch has it, else loop).
    """

    hidden_size: int
    num_experts: int
    ffn_hidden_size: int
    top_k: int = 2
    router: str = "default"
    activation: str = "swiglu"
    normalize_topk: bool = False
    ep_size: int = 1
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    beta: float = 0.9
    ema_weighting: str = "mean"
    ema_stats_dtype: str = "float32"
    nonfinite: str = "skip"
    stale_defaults: str = "keep"
    default_in_forward: Optional[bool] = None
    score_function: str = "softmax"
    route_scale: float = 1.0
    expert_bias: bool = False
    expert_bias_update_rate: float = 1e-3
    num_expert_groups: Optional[int] = None
    group_topk: Optional[int] = None
    shared_expert_ffn_hidden_size: int = 0
    shared_expert_gate: bool = False
    init_std: float = 0.02
    experts_backend: str = "auto"
    sparsemixer: SparseMixerConfig = dataclasses.field(default_factory=SparseMixerConfig)
    stablemoe: StableMoEConfig = dataclasses.field(default_factory=StableMoEConfig)

    def __post_init__(self) -> None:
        # Imported here: the router registry imports this module.
        from default_moe.routing import registered_routers

        self.sparsemixer = _nested("sparsemixer", self.sparsemixer, SparseMixerConfig)
        self.stablemoe = _nested("stablemoe", self.stablemoe, StableMoEConfig)

        _check_int("hidden_size", self.hidden_size, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("ffn_hidden_size", self.ffn_hidden_size, 1)
        _check_int("top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k must be <= num_experts ({self.num_experts}), got {self.top_k}")
        _check_choice("router", self.router, tuple(registered_routers()))
        _check_choice("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.normalize_topk, bool):
            raise ValueError(f"MoEConfig.normalize_topk must be true or false, got {self.normalize_topk!r}")
        _check_int("ep_size", self.ep_size, 1)
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"MoEConfig.num_experts ({self.num_experts}) must be divisible by MoEConfig.ep_size ({self.ep_size})"
            )
        if self.capacity_factor is not None:
            _check_float("capacity_factor", self.capacity_factor, 0.0, math.inf, hi_open=True)
            if self.capacity_factor <= 0:
                raise ValueError(f"MoEConfig.capacity_factor must be None (dropless) or > 0, got {self.capacity_factor!r}")
        _check_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _check_float("aux_loss_coeff", self.aux_loss_coeff, 0.0, math.inf, hi_open=True)
        _check_float("z_loss_coeff", self.z_loss_coeff, 0.0, math.inf, hi_open=True)
        _check_float("beta", self.beta, 0.0, 1.0, hi_open=True)
        _check_choice("ema_weighting", self.ema_weighting, EMA_WEIGHTINGS)
        _check_choice("ema_stats_dtype", self.ema_stats_dtype, EMA_STATS_DTYPES)
        _check_choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        _check_choice("stale_defaults", self.stale_defaults, STALE_DEFAULTS)
        if self.default_in_forward is not None and not isinstance(self.default_in_forward, bool):
            raise ValueError(f"MoEConfig.default_in_forward must be true, false or null (auto), got {self.default_in_forward!r}")
        self._check_modern_routing()
        _check_float("init_std", self.init_std, 0.0, math.inf, hi_open=True)
        _check_choice("experts_backend", self.experts_backend, EXPERTS_BACKENDS)
        if self.experts_backend == "grouped_mm":
            import torch

            if not hasattr(torch, "_grouped_mm"):
                raise ValueError(
                    f"MoEConfig.experts_backend='grouped_mm' needs torch._grouped_mm, which torch "
                    f"{torch.__version__} lacks; use 'loop' or 'auto'"
                )
        if self.router == "sparsemixer":
            version, _ = self.sparsemixer.resolved(self.top_k)
            need = {"v1": 1, "v2": 2}[version]
            if self.top_k != need:
                raise ValueError(
                    f"MoEConfig.top_k must be {need} for SparseMixer {version} (sparsemixer.version="
                    f"{self.sparsemixer.version!r}), got {self.top_k}"
                )
        if self.router == "stablemoe":
            if self.top_k != 1:
                raise ValueError(f"MoEConfig.top_k must be 1 for router 'stablemoe' (top-1 routing), got {self.top_k}")
            self.stablemoe.check()

    def _check_modern_routing(self) -> None:
        _check_choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _check_float("route_scale", self.route_scale, 0.0, math.inf, hi_open=True)
        if self.route_scale <= 0:
            raise ValueError(f"MoEConfig.route_scale must be > 0, got {self.route_scale!r}")
        for name in ("expert_bias", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be true or false, got {getattr(self, name)!r}")
        _check_float("expert_bias_update_rate", self.expert_bias_update_rate, 0.0, math.inf, hi_open=True)
        _check_int("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size, 0)
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise ValueError("MoEConfig.shared_expert_gate needs shared_expert_ffn_hidden_size > 0")
        if (self.num_expert_groups is None) != (self.group_topk is None):
            raise ValueError(
                "MoEConfig.num_expert_groups and MoEConfig.group_topk are set together (group-limited "
                f"routing), got {self.num_expert_groups!r} and {self.group_topk!r}"
            )
        if self.num_expert_groups is not None:
            _check_int("num_expert_groups", self.num_expert_groups, 1)
            _check_int("group_topk", self.group_topk, 1)
            if self.num_experts % self.num_expert_groups:
                raise ValueError(
                    f"MoEConfig.num_experts ({self.num_experts}) must be divisible by "
                    f"MoEConfig.num_expert_groups ({self.num_expert_groups})"
                )
            if self.group_topk > self.num_expert_groups or self.top_k % self.group_topk:
                raise ValueError(
                    f"MoEConfig.group_topk must be <= num_expert_groups ({self.num_expert_groups}) and "
                    f"divide top_k ({self.top_k}), got {self.group_topk}"
                )
            if self.top_k // self.group_topk > self.num_experts // self.num_expert_groups:
                raise ValueError(
                    f"MoEConfig.top_k / group_topk ({self.top_k // self.group_topk}) must be <= the experts "
                    f"per group ({self.num_experts // self.num_expert_groups})"
                )
        modern = (
            self.score_function != "softmax" or self.route_scale != 1.0 or self.expert_bias or self.num_expert_groups is not None
        )
        if modern and self.router not in SCORE_ROUTERS:
            raise ValueError(
                f"MoEConfig.router {self.router!r} chooses experts itself: score_function, route_scale, "
                f"expert_bias and expert groups apply to routers {list(SCORE_ROUTERS)}"
            )

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> "MoEConfig":
        """Builds a config from a mapping (e.g. a JSON section), rejecting unknown keys."""
        if not isinstance(values, Mapping):
            raise ValueError(f"MoE config must be a mapping of field names to values, got {type(values).__name__}")
        merged = drop_legacy({**values, **overrides})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; allowed fields: {sorted(known)}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in merged
        ]
        if missing:
            raise ValueError(f"MoEConfig is missing required field(s) {missing}")
        return cls(**merged)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def needs_token_ids(self) -> bool:
        return self.router in ("stablemoe", "hash")


# Fields that no longer exist, still accepted (old checkpoints, configs, sections) with a warning.
LEGACY_FIELDS = {
    "ema_sync": "D is committed once per optimizer step with one bucketed all-reduce for all layers",
    "ema_sync_every": "D is committed once per optimizer step (every micro-batch of the step counts)",
}


def drop_legacy(values: Mapping[str, Any], where: str = "MoEConfig") -> dict:
    """`values` without the removed fields, warning once per call for each one present."""
    out = dict(values)
    for name, why in LEGACY_FIELDS.items():
        if name in out:
            out.pop(name)
            warnings.warn(f"{where}.{name} was removed and is ignored: {why}", FutureWarning, stacklevel=3)
    return out


def _named_fields_only(cls):
    """Unknown keyword arguments fail like bad values do (ValueError naming them, allowed fields,
    a close match), not with dataclass's bare TypeError."""
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        kwargs = drop_legacy(kwargs, cls.__name__)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            hint = "".join(_did_you_mean(u, known) for u in unknown[:1])
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed fields: {sorted(known)}{hint}")
        init(self, *args, **kwargs)

    cls.__init__ = checked_init
    return cls


MoEConfig = _named_fields_only(MoEConfig)


def check_adapter_settings(settings: Mapping[str, Any], allowed, routers, where: str, elsewhere: str) -> dict:
    """The part every engine adapter's settings check shares: unknown keys and an unsupported
    router refused naming the allowed values, removed fields dropped with a warning. The adapter
    then checks its own limits and calls `check_overrides`.

    Args:
        allowed: the adapter's setting names; routers: the routers it runs.
        where: the adapter, as named in errors ("default_moe.integrations.hf").
        elsewhere: where the other routers run, for the error.
    """
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; allowed: {list(allowed)}")
    router = settings.get("router", "default")
    if router not in routers:
        raise ValueError(f"{where}: router must be one of {list(routers)}, got {router!r} ({elsewhere})")
    return drop_legacy(settings, where)


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Validates a partial config (an engine section: no sizes) against shapes it can fit.

    Sizes come from the model later; top-k is tried at its given value or at 1 and 2 (a router
    may require either), so only values that fit no shape are refused here. Raises the
    `ValueError` of the first attempt, naming the field.
    """
    first_error = None
    for top_k in [overrides["top_k"]] if "top_k" in overrides else [1, 2]:
        num_experts = 1
        for v in (top_k, overrides.get("ep_size", 1)):
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                num_experts *= v
        try:
            MoEConfig(hidden_size=1, ffn_hidden_size=1, num_experts=num_experts, **{**overrides, "top_k": top_k})
            return
        except (ValueError, TypeError) as e:
            first_error = first_error or e
    raise ValueError(str(first_error)) from None
