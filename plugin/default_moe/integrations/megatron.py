"""Megatron (megatron-core) integration: Default MoE in existing megatron-core model code.

Two ways in:

    from default_moe.integrations import megatron as dm
    spec = dm.patch_spec(get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                         router="default", beta=0.9)              # 1. patch a spec you hold
    dm.install(router="default", beta=0.9)                        # 2. every GPT spec builder emits ours

and for Megatron-LM scripts, `extra_args_provider=dm.extra_args_provider` adds
`--moe-router-type`, `--moe-default-beta`, `--moe-default-ema-weighting`, ...;
`dm.install_from_args(args)` applies them (see patches/megatron-lm-core_r0.19.0.diff and
patches/megatron-lm-core_v0.16.1.diff). Version differences live in `megatron_compat`.

What our layer keeps from megatron-core: its router (`TopKRouter`, with z-loss, aux losses,
expert bias, group-limited routing, capacity and token dropping), its token dispatchers and its
experts (SequentialMLP, TEGroupedMLP). What it adds (`DefaultMoELayer`, a `MoELayer` subclass, and
`DefaultTopKRouter`, a `TopKRouter` subclass):
- the fp32 scores of ALL experts from the same logits (softmax or sigmoid, as the router's
  `moe_router_score_function`), and megatron's gate as a `GateForm` (`gate_form`);
- the experts run with unit probabilities, so their raw outputs (fc2 bias included, when the
  experts have one) feed the EMA; the layer then scales them by the routing probabilities itself:
  megatron computes p * fc2(act(fc1 x)) + p * bias, the same p * raw output;
- per-expert statistics from the raw outputs on the expert's rank, zero rows elsewhere, one
  all-reduce of E x (H+1) over the whole pipeline stage (tensor x context x data parallel =
  expert-TP x EP x expert-DP): every token of the stage is routed from one rank, and under expert
  tensor parallelism the expert-TP ranks' partial sums add up to the outputs while the counts come
  from expert-TP rank 0 only; so every rank of the stage holds the same defaults, in any
  TP/SP/CP/EP/expert-TP/DP layout; the EMA update follows the core `ExpertDefaults`;
- the default term for that gate form (docs/method.md; pre-softmax: `s * (pi * ~routing_map) @ D`,
  megatron's other gates — softmax over the top-k logits, sigmoid renormalised over the selected
  experts — the renormalised form `sum_{not run} w_i (s D_i - y_S)`), added in `postprocess` to
  the routed output before the shared experts (routes dropped over capacity count as not run). No
  collective is added for the router gradient. Sigmoid gates default to the term in the backward
  only (`default_in_forward`); megatron-core's expert bias, groups and scaling factor stay its own.
- `defaults.defaults_ED` in the state dict and in `sharded_state_dict` (replicated).

Refused with a clear error (they hide the raw expert outputs or change the gate):
`moe_apply_probs_on_input`, `moe_pad_expert_input_to_capacity`, sinkhorn balancing (its top-1
gate is not a score the derivation covers), the fp8/fp4 routing-map padding (padded pairs would
lose their default term and enter the counts) and CUDA graphs whose scope covers the router (the
dense scores would leave the graph). Allowed: expert bias (selection only), capacity/token
dropping, z-loss, aux losses, group-limited routing, the top-k scaling factor.

The step contract (`default_moe.defaults`): training forwards accumulate statistics (tokens
marked padding in `padding_mask` do not count), D is committed in `finalize_model_grads` —
every megatron-core schedule calls it after the step's last backward, where megatron-core
updates its own router expert bias — over the pipeline stage, with one all-reduce for all layers.

Tested on CPU with megatron-core 0.16.1 and 0.19.2 through the local spec (`SequentialMLP`), in
layer, GPT-model, pipeline-schedule and real Megatron-LM `pretrain_gpt.py` runs. Also refused:
`moe_latent_size`, `overlap_dispatch_backward_with_experts_wgrad`, inference router/dispatcher
specs, NCCL-EP zero-copy expert buffers (the experts' raw outputs are not visible there). The Transformer Engine path (`TEGroupedMLP`) goes through the same
`routed_experts_compute` override and takes unit probabilities the same way, but it is not tested
here (Transformer Engine does not install on CPU).

Legend: T tokens, E experts, H hidden, N dispatched rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, Dict, Optional

import torch

from default_moe.config import MoEConfig, check_overrides, drop_legacy
from default_moe.defaults import ExpertDefaults, GateForm, commit_defaults, dense_scores
from default_moe.integrations import megatron_compat as compat
from default_moe.layer_utils import ForwardSnapshots, updates_state
from default_moe.routing import registered_routers

from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoELayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec

SETTINGS = (
    "router",
    "beta",
    "ema_weighting",
    "sparsemixer",
    "stablemoe",
    "ema_stats_dtype",
    "nonfinite",
    "default_in_forward",
    "stale_defaults",
    "ema_sync",
    "ema_sync_every",
)  # the last two: removed, accepted with a warning
MEGATRON_ROUTERS = ("topk", "default", "sparsemixer", "hash", "stablemoe")


def validate_settings(settings: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Checks the Default MoE settings (router, beta, ema_weighting, ...)."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown default_moe setting(s) {unknown}; allowed: {list(SETTINGS)}")
    router = settings.get("router", "default")
    if router not in MEGATRON_ROUTERS:
        raise ValueError(
            f"router {router!r} is not available in the megatron-core integration yet "
            f"(supported: {list(MEGATRON_ROUTERS)}; the others run in default_moe.MoELayer models)"
        )
    settings = drop_legacy(settings, "default_moe (megatron)")
    check_overrides(settings)  # the real top-k comes from the TransformerConfig
    return settings


def check_megatron_config(config) -> None:
    """Refuses megatron router settings that make no sense with Default MoE's dense softmax."""
    problems = []
    if config.moe_router_score_function not in ("softmax", "sigmoid"):
        problems.append(f"moe_router_score_function={config.moe_router_score_function!r} (softmax or sigmoid)")
    if config.moe_apply_probs_on_input:
        problems.append("moe_apply_probs_on_input=True (the raw expert outputs are needed)")
    if config.moe_pad_expert_input_to_capacity:
        problems.append("moe_pad_expert_input_to_capacity=True (padding rows would enter the EMA)")
    balancing = config.moe_router_load_balancing_type
    if "sinkhorn" in (balancing if isinstance(balancing, (list, tuple)) else [balancing]):
        problems.append(
            "moe_router_load_balancing_type='sinkhorn' (its top-1 gate is sigmoid(logit), not the "
            "softmax pi the default term weights unselected experts with)"
        )
    if getattr(config, "moe_router_padding_for_quantization", False) or getattr(config, "moe_router_padding_for_fp8", False):
        problems.append(
            "moe_router_padding_for_quantization / moe_router_padding_for_fp8 (the padded routing map "
            "adds (token, expert) pairs that lose their default term and enter the counts)"
        )
    problems += compat.cuda_graph_problems(config)
    problems += compat.unsupported_features(config)
    if problems:
        raise ValueError("Default MoE cannot run with megatron-core " + "; ".join(problems))


def gate_form(config) -> GateForm:
    """megatron-core's gate (`topk_routing_with_score_function`) as a `GateForm`: softmax over all
    experts with `moe_router_pre_softmax`, else over the top-k logits (renormalised); sigmoid
    renormalised over the selected experts when top-k > 1; times `moe_router_topk_scaling_factor`."""
    if config.moe_router_score_function == "softmax":
        renormalized = not config.moe_router_pre_softmax
    else:
        renormalized = config.moe_router_topk > 1
    return GateForm(config.moe_router_score_function, renormalized, float(config.moe_router_topk_scaling_factor or 1.0))


class DefaultTopKRouter(TopKRouter):
    """megatron-core's TopKRouter that also keeps the fp32 scores of all experts."""

    dense_probs: Optional[torch.Tensor] = None
    routing_map: Optional[torch.Tensor] = None
    # The selection before capacity drops (None: dropless, the same as routing_map).
    selected_map: Optional[torch.Tensor] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        # Same logits as the sparse path, so gradients through both reach the router weights.
        self.dense_probs = dense_scores(logits.reshape(-1, self.config.num_moe_experts), self.config.moe_router_score_function)
        compat.take_pre_drop_map()
        probs, routing_map = super().routing(logits, padding_mask)
        self.routing_map = routing_map
        self.selected_map = compat.take_pre_drop_map()
        if padding_mask is not None:
            # Padding must not enter the EMA, and the dispatched rows do not say which token they
            # came from: the padded tokens' gates travel negated (megatron's router code reads
            # padding_mask True as padding), `DefaultMoELayer.routed_experts_compute` reads the
            # sign bit back and restores the gate, so outputs and gradients are unchanged.
            probs = torch.where(padding_mask.reshape(-1, 1).to(probs.device), -probs, probs)
        return probs, routing_map


def _refuse_router_settings(config, router: str, extra_problems) -> None:
    """Routers that choose experts themselves (sparsemixer, hash, stablemoe) run dropless and
    without megatron's expert bias; refuse those settings by name."""
    problems = list(extra_problems)
    if config.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor")
    if config.moe_router_enable_expert_bias:
        problems.append("moe_router_enable_expert_bias")
    if problems:
        raise ValueError(f"router {router!r} cannot run with megatron-core " + ", ".join(problems))


class SparseMixerTopKRouter(TopKRouter):
    """megatron-core TopKRouter routed by SparseMixer (v1 top-1 / v2 top-2): sampled experts and
    SparseMixer's custom router backward, on megatron's own router weights and z-loss. The balance
    loss is SparseMixer's (sampled experts, DP-global counts) with `moe_aux_loss_coeff`, attached
    with megatron's `MoEAuxLossAutoScaler`. v1's learnable output scale `omega` is applied by
    `DefaultMoELayer.postprocess`."""

    def __init__(self, config, pg_collection=None, is_mtp_layer=False, sparsemixer=None):
        from default_moe.config import SparseMixerConfig

        super().__init__(config=config, pg_collection=pg_collection, **compat.router_kwargs(is_mtp_layer))
        extra = []
        if config.moe_router_load_balancing_type not in ("aux_loss", "none"):
            extra.append(f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r}")
        _refuse_router_settings(config, "sparsemixer", extra)
        cfg = SparseMixerConfig(**(sparsemixer or {})) if not isinstance(sparsemixer, SparseMixerConfig) else sparsemixer
        self.version, self.eps = cfg.resolved(config.moe_router_topk)
        if {"v1": 1, "v2": 2}[self.version] != config.moe_router_topk:
            raise ValueError(f"SparseMixer {self.version} needs moe_router_topk={ {'v1': 1, 'v2': 2}[self.version] }")
        self.omega = torch.nn.Parameter(torch.ones(config.hidden_size)) if self.version == "v1" else None
        self.generator = None
        self.dense_probs = self.routing_map = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from default_moe.losses import switch_load_balancing_loss
        from default_moe.routing.sparsemixer import sparsemixer_route

        E = self.config.num_moe_experts
        logits_TE = self.apply_z_loss(logits.reshape(-1, E), padding_mask=padding_mask)
        idx_TK, gates_TK, probs_TE, balance_TE = sparsemixer_route(
            logits_TE.float(), self.version, self.eps, self.training, self.generator
        )
        probs_out = torch.zeros_like(probs_TE).scatter(1, idx_TK, gates_TK)
        routing_map = torch.zeros_like(probs_TE, dtype=torch.bool).scatter(1, idx_TK, True)
        coeff = self.config.moe_aux_loss_coeff
        coeff = sum(coeff) if isinstance(coeff, (list, tuple)) else coeff
        if self.training and torch.is_grad_enabled() and coeff:
            aux = switch_load_balancing_loss(balance_TE, idx_TK, coeff, compat.stage_group())
            probs_out = MoEAuxLossAutoScaler.apply(probs_out, aux)
        self.dense_probs, self.routing_map = probs_TE, routing_map
        return probs_out, routing_map


class TokenIdTopKRouter(TopKRouter):
    """megatron-core TopKRouter routed by token id: "hash", or "stablemoe" (the router weight is
    StableMoE's expert centroids, so the affinity is megatron's own logits; the distilled router
    and the stage counter are added here). megatron-core does not pass token ids to MLP layers:
    `capture_token_ids(model)` records the model's input ids ([B, S], sequence-first here) for them.
    StableMoE's stage-1 losses are attached with megatron's `MoEAuxLossAutoScaler`."""

    def __init__(self, config, pg_collection=None, is_mtp_layer=False, kind="hash", stablemoe=None):
        from default_moe.config import StableMoEConfig
        from default_moe.routing.stablemoe import DistilledRouter

        super().__init__(config=config, pg_collection=pg_collection, **compat.router_kwargs(is_mtp_layer))
        extra = []
        if config.sequence_parallel or config.context_parallel_size > 1:
            extra.append("sequence or context parallelism (the token ids would not line up)")
        _refuse_router_settings(config, kind, extra)
        self.kind = kind
        if kind == "stablemoe":
            if config.moe_router_topk != 1:
                raise ValueError(f"router 'stablemoe' needs moe_router_topk=1, got {config.moe_router_topk}")
            sc = stablemoe if isinstance(stablemoe, StableMoEConfig) else StableMoEConfig(**(stablemoe or {}))
            sc.check()
            self.stablemoe_config = sc
            self.distill = DistilledRouter(config.num_moe_experts, sc.vocab_size, sc.router_dim)
            self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.dense_probs = self.routing_map = None
        # Per-forward token ids and StableMoE stage, replayed by a recompute (the recompute contract).
        self._records = ForwardSnapshots()

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        from default_moe import token_context
        from default_moe.routing.hash import hash_experts
        from default_moe.routing.stablemoe import stablemoe_route, stage_for

        E, K = self.config.num_moe_experts, self.config.moe_router_topk
        x_TH = input.reshape(-1, input.shape[-1])
        record, entry = self._records.get(dict, updates_state(self.training))
        ids = token_context.ids_for(record, f"router {self.kind!r}")
        ids_T = ids.t().reshape(-1).to(x_TH.device).long()  # [B, S] -> the layer's [S, B] order
        if ids_T.numel() != x_TH.shape[0]:
            raise ValueError(f"recorded token ids ({tuple(ids.shape)}) do not match the MoE input ({tuple(input.shape)})")
        if self.kind == "hash":
            idx_TK = hash_experts(ids_T, E, K)
            gates_TK = torch.full(idx_TK.shape, 1.0 / K, device=x_TH.device)
            aux = {}
        else:
            scores_TE = self.gating(input).reshape(-1, E).float()
            first = stage_for(record, self.training, self.num_steps, self.stablemoe_config.stage2_step)
            idx_T, gate_T, aux = stablemoe_route(scores_TE, ids_T, self.distill, self.stablemoe_config, first)
            idx_TK, gates_TK = idx_T[:, None], gate_T[:, None]
        probs = torch.zeros(x_TH.shape[0], E, device=x_TH.device, dtype=gates_TK.dtype).scatter(1, idx_TK, gates_TK)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx_TK, True)
        if aux and self.training and torch.is_grad_enabled():
            probs = MoEAuxLossAutoScaler.apply(probs, sum(aux.values()))
        self._records.release_after_backward(entry, input)
        self.routing_map = routing_map
        return probs, routing_map


def capture_token_ids(model: torch.nn.Module):
    """Records the model's input ids at each forward for the token-id routers (hash, StableMoE)."""
    from default_moe.token_context import capture_token_ids as capture

    return capture(model)


class DefaultMoELayer(McoreMoELayer):
    """megatron-core MoELayer with the Default MoE term and EMA defaults.

    Takes megatron-core MoELayer's arguments, plus `default_moe`: the settings dict (router, beta,
    ema_weighting, sparsemixer).
    """

    def __init__(
        self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False, name=None, default_moe=None
    ):
        settings = validate_settings(default_moe)
        uses_defaults = registered_routers()[settings.get("router", "default")].uses_defaults
        if uses_defaults:  # refused before megatron builds anything
            check_megatron_config(config)
        if submodules is not None and submodules.router not in (None, TopKRouter):
            raise ValueError(
                f"default-moe replaces megatron's TopKRouter; this MoE spec names router "
                f"{getattr(submodules.router, '__name__', submodules.router)!r} (inference specs are not supported)"
            )
        if submodules is not None:
            if settings.get("router") == "sparsemixer":
                router = functools.partial(SparseMixerTopKRouter, sparsemixer=settings.get("sparsemixer"))
            elif settings.get("router") in ("hash", "stablemoe"):
                router = functools.partial(TokenIdTopKRouter, kind=settings["router"], stablemoe=settings.get("stablemoe"))
            else:
                router = DefaultTopKRouter
            submodules = dataclasses.replace(submodules, router=router)
        super().__init__(
            config,
            submodules,
            layer_number=layer_number,
            pg_collection=pg_collection,
            **compat.moe_layer_kwargs(is_mtp_layer, name),
        )
        self.moe_config = MoEConfig(
            hidden_size=config.hidden_size,
            num_experts=config.num_moe_experts,
            ffn_hidden_size=config.moe_ffn_hidden_size or config.ffn_hidden_size,
            top_k=config.moe_router_topk,
            aux_loss_coeff=0.0,
            **settings,
        )
        self.defaults: Optional[ExpertDefaults] = None
        if uses_defaults:
            if not isinstance(self.router, DefaultTopKRouter):
                raise ValueError(f"Default MoE needs DefaultTopKRouter (a TopKRouter), got {type(self.router).__name__}")
            self.defaults = (
                ExpertDefaults.from_config(
                    self.moe_config,
                    config.num_moe_experts,
                    config.hidden_size,
                    name=f"layer {self.layer_number}",
                    gate=gate_form(config),
                )
                .to(self.router.weight.device)
                .bind(self, compat.stage_group)
            )

    def route(self, hidden_states, *args, **kwargs):
        # The first step inside megatron's (possibly checkpointed) MoE forward, so a recompute
        # (selective "moe" or full-layer) decides for itself; only the forward whose backward
        # reaches the layer counts (the step contract).
        if self.defaults is not None:
            self._fwd = self.defaults.begin_forward(self.training, "megatron DefaultMoELayer")
            if self.training:
                commit_at_finalize(self.config, self.defaults)
        return super().route(hidden_states, *args, **kwargs)

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        if self.defaults is None:
            return super().routed_experts_compute(hidden_states, probs)
        if compat.expert_buffers(self.token_dispatcher):
            raise ValueError(
                "Default MoE cannot run with zero-copy expert output buffers (NCCL-EP dispatcher): "
                "it needs the experts' raw outputs"
            )
        dispatched_N, tokens_per_expert, permuted_probs_N = self.token_dispatcher.dispatch_postprocess(hidden_states, probs)
        raw_NH, mlp_bias = self.experts(dispatched_N, tokens_per_expert, torch.ones_like(permuted_probs_N))
        assert mlp_bias is None, f"mlp_bias is not supported for {type(self.token_dispatcher)}"
        # Padded tokens' gates arrive negated (DefaultTopKRouter.routing): mask and true gate.
        keep_N = ~torch.signbit(permuted_probs_N)
        gates_N = torch.where(keep_N, permuted_probs_N, -permuted_probs_N)
        if self._fwd.collect:
            self._update_defaults(raw_NH, tokens_per_expert, gates_N, keep_N)
        expert_out_NH = raw_NH * gates_N.unsqueeze(-1).to(raw_NH.dtype)
        return self.token_dispatcher.combine_preprocess(expert_out_NH), mlp_bias

    def _update_defaults(self, raw_NH, tokens_per_expert, probs_N, keep_N) -> None:
        counts = torch.as_tensor(tokens_per_expert, dtype=torch.long).reshape(-1).to(raw_NH.device)
        local_ids = torch.tensor(self.local_expert_indices, device=raw_NH.device)
        n = int(counts.sum())
        expert_N = torch.repeat_interleave(local_ids, counts)
        # Summed over the whole pipeline stage: rows of other ranks' experts are zero here, every
        # token of the stage is routed from exactly one rank, and under expert tensor parallelism
        # each expert-TP rank holds the same rows as partial sums (they add up; the counts are
        # contributed by expert-TP rank 0 alone).
        self.defaults.observe_rows(
            self._fwd,
            raw_NH[:n],
            expert_N,
            probs_N[:n],
            count_weights=self.token_dispatcher.tp_rank == 0,
            keep_N=keep_N[:n],
            anchor=raw_NH if raw_NH.requires_grad else self.router.dense_probs,
        )

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        omega = getattr(self.router, "omega", None)
        if omega is not None:  # SparseMixer v1 scales the routed output, not the shared experts'
            output = output * omega.to(output.dtype)
        if self.defaults is None:
            return super().postprocess(output, shared_expert_output)
        routed = super().postprocess(output, None)
        # The term for megatron's gate form (`gate_form`: score function, renormalisation, the top-k
        # scaling factor s), from the routed output before the shared experts are added.
        default_TH = self.defaults.default_term(
            self._fwd,
            self.router.dense_probs,
            self.router.routing_map,
            routed_TD=routed.reshape(-1, routed.shape[-1]),
            selected=getattr(self.router, "selected_map", None),
        )
        output = routed + default_TH.view(routed.shape).to(routed.dtype)
        return output if shared_expert_output is None else output + shared_expert_output


def commit_at_finalize(config, defaults: ExpertDefaults) -> None:
    """The step contract in megatron: D is committed in `finalize_model_grads` (called by every
    megatron-core schedule after the last backward of the step, where megatron-core updates its
    router expert bias), for every Default MoE layer of the model chunks it is given. Wraps
    `config.finalize_model_grads_func` once (Megatron-LM sets it before training); without one
    (a hand-written loop) the torch optimizer's step or `commit_defaults(model)` commits."""
    fn = getattr(config, "finalize_model_grads_func", None)
    if fn is None:
        return
    if not getattr(fn, "_default_moe_commit", False):

        @functools.wraps(fn)
        def finalize_and_commit(model, *args, _original=fn, **kwargs):
            out = _original(model, *args, **kwargs)
            commit_defaults(model if isinstance(model, (list, tuple)) else [model])
            return out

        finalize_and_commit._default_moe_commit = True
        config.finalize_model_grads_func = finalize_and_commit
    defaults.committed_by = "megatron"


def _patch(spec: Any, settings: Dict[str, Any]) -> Any:
    if isinstance(spec, ModuleSpec):
        module = spec.module
        if isinstance(module, type) and issubclass(module, McoreMoELayer):
            return ModuleSpec(
                module=DefaultMoELayer,
                params={**spec.params, "default_moe": settings},
                submodules=spec.submodules,
                metainfo=dict(spec.metainfo),
            )
        if spec.submodules is not None:
            return dataclasses.replace(spec, submodules=_patch(spec.submodules, settings))
        return spec
    if isinstance(spec, functools.partial):  # megatron-core >= 0.17 specs
        if isinstance(spec.func, type) and issubclass(spec.func, McoreMoELayer):
            return functools.partial(DefaultMoELayer, *spec.args, **{**spec.keywords, "default_moe": settings})
        if "submodules" in spec.keywords:
            return functools.partial(
                spec.func, *spec.args, **{**spec.keywords, "submodules": _patch(spec.keywords["submodules"], settings)}
            )
        return spec
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _patch(getattr(spec, f.name), settings) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list):
        return [_patch(s, settings) for s in spec]
    if isinstance(spec, tuple) and not (len(spec) == 2 and isinstance(spec[0], str)):
        return tuple(_patch(s, settings) for s in spec)
    return spec


def patch_spec(spec: Any, **settings: Any) -> Any:
    """A copy of a GPT layer spec or decoder-block spec whose MoE layers are `DefaultMoELayer`s.

    Works with megatron-core's `ModuleSpec` (0.16) and `functools.partial` (newer) specs.
    """
    return _patch(spec, validate_settings(settings))


_INSTALLED: Optional[Dict[str, Any]] = None  # what install() replaced, for uninstall()


def install(**settings: Any) -> None:
    """Makes every megatron-core MoE spec emit `DefaultMoELayer`, and refuses any other MoE layer.

    Patches every place megatron-core takes MoE specs from (see `megatron_compat`): the spec
    builder GPT layer specs call (0.16-0.19), the one the experimental attention variants import
    (0.19) and the hybrid (Mamba/attention + MoE) specs built at import time (0.19). While
    installed, building a megatron `MoELayer` that is not ours raises (a spec path this did not
    reach never trains silently without Default MoE), and for the token-id routers (hash,
    StableMoE) every GPT/hybrid model records its input ids. Call once at start-up, before the
    model is built (Megatron-LM: after the arguments are parsed); `uninstall()` undoes it.
    """
    global _INSTALLED
    settings = validate_settings(settings)
    uninstall()
    saved: Dict[str, Any] = {"sites": [], "inits": []}

    for module, attr in compat.spec_builder_sites():
        original = getattr(module, attr)
        saved["sites"].append((module, attr, original))

        @functools.wraps(original)
        def builder(*args, _original=original, **kwargs):
            return _patch(_original(*args, **kwargs), settings)

        setattr(module, attr, builder)
    for module, attr in compat.prebuilt_spec_sites():
        original = getattr(module, attr)
        saved["sites"].append((module, attr, original))
        setattr(module, attr, _patch(original, settings))

    moe_init = McoreMoELayer.__init__

    @functools.wraps(moe_init)
    def guarded_init(self, *args, **kwargs):
        if not isinstance(self, DefaultMoELayer):
            raise RuntimeError(
                f"default-moe is installed (router {settings.get('router', 'default')!r}) but megatron-core is building a "
                f"{type(self).__name__} from a spec it did not patch; use default_moe.integrations.megatron.patch_spec "
                f"on that spec (megatron-core {compat.MCORE_VERSION}; tested spec paths: GPT local/TE layer specs, "
                "decoder block specs, hybrid layer specs, experimental attention variants)"
            )
        moe_init(self, *args, **kwargs)

    McoreMoELayer.__init__ = guarded_init
    saved["inits"].append((McoreMoELayer, moe_init))
    if settings.get("router") in ("hash", "stablemoe"):
        for cls in compat.model_classes():
            init = cls.__init__

            @functools.wraps(init)
            def capturing_init(self, *args, _init=init, **kwargs):
                _init(self, *args, **kwargs)
                capture_token_ids(self)  # token-id routers read the model's input ids

            cls.__init__ = capturing_init
            saved["inits"].append((cls, init))
    _INSTALLED = saved


def uninstall() -> None:
    """Undoes `install()` (no-op when not installed)."""
    global _INSTALLED
    if _INSTALLED is None:
        return
    for module, attr, original in reversed(_INSTALLED["sites"]):
        setattr(module, attr, original)
    for cls, init in reversed(_INSTALLED["inits"]):
        cls.__init__ = init
    _INSTALLED = None


def installed() -> bool:
    return _INSTALLED is not None


def _beta(value: str) -> float:
    try:
        beta = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--moe-default-beta must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= beta < 1.0:
        raise argparse.ArgumentTypeError(f"--moe-default-beta must be a number in [0, 1), got {value!r}")
    return beta


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM `extra_args_provider`: the Default MoE command-line flags."""
    group = parser.add_argument_group(title="default-moe")
    group.add_argument(
        "--moe-router-type", default="topk", choices=sorted(registered_routers()), help="router training method (default-moe)"
    )
    group.add_argument("--moe-default-beta", type=_beta, default=0.9, help="EMA decay of the default vectors")
    # Removed (D is committed once per optimizer step); accepted with a warning, hidden.
    group.add_argument("--moe-default-ema-sync", default=None, choices=["sync", "async"], help=argparse.SUPPRESS)
    group.add_argument("--moe-default-ema-sync-every", type=int, default=None, help=argparse.SUPPRESS)
    group.add_argument("--moe-default-ema-weighting", default="mean", choices=["mean", "prob"])
    group.add_argument(
        "--moe-default-ema-stats-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the all-reduced EMA statistics (bfloat16: half the bytes)",
    )
    group.add_argument(
        "--moe-nonfinite",
        default="skip",
        choices=["skip", "raise"],
        help="non-finite expert outputs: keep the defaults (skip) or raise naming layer and step",
    )
    group.add_argument(
        "--moe-default-in-forward",
        default="auto",
        choices=["auto", "true", "false"],
        help="the default term in the forward (true: the paper) or in the backward only (false); "
        "auto: true for softmax routers, false for sigmoid ones",
    )
    group.add_argument(
        "--moe-default-stale-defaults",
        default="keep",
        choices=["keep", "zero", "mean"],
        help="D of an expert that received no token in a step: keep it (the paper), or decay it "
        "toward zero or the other experts' mean",
    )
    group.add_argument("--moe-sparsemixer-version", default="auto", choices=["auto", "v1", "v2"])
    group.add_argument("--moe-sparsemixer-jitter-eps", type=float, default=None)
    group.add_argument(
        "--moe-stablemoe-stage2-step",
        type=int,
        default=None,
        help="StableMoE: training micro-batches before routing is frozen (paper: 10%% of training)",
    )
    group.add_argument("--moe-stablemoe-router-dim", type=int, default=50)
    return parser


def settings_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    settings = {
        "router": args.moe_router_type,
        "beta": args.moe_default_beta,
        "ema_weighting": args.moe_default_ema_weighting,
        "ema_stats_dtype": args.moe_default_ema_stats_dtype,
        "nonfinite": args.moe_nonfinite,
        "stale_defaults": getattr(args, "moe_default_stale_defaults", "keep"),
    }
    in_forward = getattr(args, "moe_default_in_forward", "auto")
    if in_forward != "auto":
        settings["default_in_forward"] = in_forward == "true"
    for legacy in ("ema_sync", "ema_sync_every"):
        if getattr(args, f"moe_default_{legacy}", None) is not None:
            settings[legacy] = getattr(args, f"moe_default_{legacy}")
    if args.moe_router_type == "sparsemixer":
        settings["sparsemixer"] = {"version": args.moe_sparsemixer_version, "jitter_eps": args.moe_sparsemixer_jitter_eps}
    if args.moe_router_type == "stablemoe":
        settings["stablemoe"] = {
            "vocab_size": getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None),
            "stage2_step": args.moe_stablemoe_stage2_step,
            "router_dim": args.moe_stablemoe_router_dim,
        }
    return validate_settings(settings)


def install_from_args(args: argparse.Namespace) -> None:
    """`install(...)` with the settings of the parsed Megatron-LM arguments.

    Refuses the token-id routers under pipeline parallelism: Megatron-LM's `get_batch` loads the
    tokens on the first and last stages only, so a middle stage has no ids to route by (a
    megatron-core model code that passes the ids to every stage can use `install` directly)."""
    settings = settings_from_args(args)
    pp = getattr(args, "pipeline_model_parallel_size", 1) or 1
    if settings.get("router") in ("hash", "stablemoe") and pp > 1:
        raise ValueError(
            f"--moe-router-type {settings['router']} routes by token id, but with --pipeline-model-parallel-size {pp} "
            "Megatron-LM's get_batch gives the token ids to the first and last pipeline stages only: the middle "
            "stages' MoE layers could not route. Use --pipeline-model-parallel-size 1 with this router, or a "
            "score-based router (default, topk, sparsemixer)"
        )
    install(**settings)


def chain_extra_args_providers(*others):
    """An `extra_args_provider` that adds ours and then each of `others` (None entries skipped)."""

    def provider(parser):
        parser = extra_args_provider(parser)
        for other in others:
            if other is not None:
                parser = other(parser)
        return parser

    return provider


def wrap_model_provider(model_provider, get_args=None):
    """Wraps a Megatron-LM model provider so that its specs use Default MoE per the parsed flags.

    `get_args` defaults to `megatron.training.get_args` (Megatron-LM's global arguments).
    """

    @functools.wraps(model_provider)
    def provider(*args, **kwargs):
        getter = get_args
        if getter is None:
            from megatron.training import get_args as getter
        install_from_args(getter())
        try:
            model = model_provider(*args, **kwargs)
        finally:
            uninstall()
        return model

    return provider
