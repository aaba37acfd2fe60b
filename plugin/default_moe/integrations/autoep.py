"""Default MoE for DeepSpeed AutoEP (0.19.x): HuggingFace MoE models (Mixtral, Qwen3-MoE, ...)
made expert-parallel from the `"expert_parallel"` config section.

AutoEP replaces each HF sparse MoE block by `AutoEPMoELayer`, whose router returns only the top-k
scores and whose combine weights the expert outputs without exposing them. While the engine is
built, `deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer` is replaced by a subclass (built by
`layer_class`), so AutoEP constructs ours. The subclass adds a `defaults` buffer (`[E, H]`, in the
module state, not an expert parameter) and, for routers that use defaults, wraps AutoEP's own
`_forward`: AutoEP still routes, dispatches (uneven all-to-all), runs its grouped experts and
returns; only its final combine step (`combine_from_routed`, looked up by name at call time) is
replaced for the duration of the call by one that keeps the raw per-slot expert outputs, updates
the EMA from them (all-reduced over DP) and adds sum_{i not in S} pi_i D_i.

SparseMixer (v1/v2) re-routes AutoEP's router on the same gate weights (custom backward in the
top scores; v1's omega scales the routed output); its balance loss is HF's own router aux loss.

The router's scores of all experts in fp32 from the same gate weights: softmax (Mixtral,
Qwen3-MoE) or sigmoid (the DeepSeek-V3 preset). Under router "default" the selected experts are
combined with the raw scores, as the paper does; `"normalize_topk": true` keeps AutoEP's own top-k
scores (its `route_norm` and `route_scale`: a pretrained model's gate), and the default term
follows that gate form (`defaults.GateForm`, docs/method.md). Sigmoid routers put the term in the
backward only unless `"default_in_forward": true`. Router "topk" leaves AutoEP untouched.

Refused with a clear error: DeepEP backend, AutoEP+AutoTP folding, `score_apply="pre"` and the
fused combine (the raw expert outputs are not available there).

Legend: T tokens, K top-k, E experts, H hidden.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from default_moe.config import MoEConfig, check_overrides
from default_moe.defaults import ExpertDefaults, GateForm, dense_scores, ran_mask
from default_moe.layer_utils import ForwardSnapshots, updates_state
from default_moe.routing import registered_routers

SECTION_KEYS = (
    "router",
    "beta",
    "ema_weighting",
    "normalize_topk",
    "sparsemixer",
    "stablemoe",
    "ema_stats_dtype",
    "nonfinite",
    "default_in_forward",
    "stale_defaults",
    "ema_sync",
    "ema_sync_every",
)  # the last two: removed, accepted with a warning
AUTOEP_ROUTERS = ("topk", "default", "sparsemixer", "hash", "stablemoe")


def check_section(overrides: Dict) -> Dict:
    """The section keys that apply to AutoEP layers; others are refused by name."""
    other = sorted(set(overrides) - set(SECTION_KEYS))
    if other:
        raise ValueError(
            f'DeepSpeed config "default_moe": {other} do not apply to AutoEP layers (top-k and expert count come from '
            f'the HF model config, ep_size from "expert_parallel.autoep_size"); allowed here: {list(SECTION_KEYS)}'
        )
    router = overrides.get("router", "default")
    if router not in AUTOEP_ROUTERS:
        raise ValueError(f"router {router!r} is not supported for AutoEP layers; supported: {list(AUTOEP_ROUTERS)}")
    check_overrides(overrides)  # the real top-k comes from the HF config
    return dict(overrides)


@contextlib.contextmanager
def _combine_replaced(mod, combine):
    """AutoEP's `_forward` looks `combine_from_routed` up by name at call time: swap it for one call."""
    original = mod.combine_from_routed
    mod.combine_from_routed = combine
    try:
        yield
    finally:
        mod.combine_from_routed = original


def layer_class(settings: Dict):
    """An `AutoEPMoELayer` subclass bound to the section's settings."""
    from deepspeed.module_inject import auto_ep_layer as mod

    base = mod.AutoEPMoELayer
    if getattr(base, "_default_moe", False):
        base = base.__mro__[1]

    class DefaultAutoEPMoELayer(base):
        _default_moe = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.moe_config = MoEConfig(
                hidden_size=self.hidden_size,
                num_experts=self.num_experts,
                ffn_hidden_size=1,
                top_k=self.top_k,
                ep_size=self.ep_size,
                aux_loss_coeff=0.0,
                **settings,
            )
            self.defaults = None
            self.omega = None
            self._pending_aux = None
            # Per-forward token ids and StableMoE stage, replayed by a recompute (the recompute contract).
            self._records = ForwardSnapshots()
            self._record: dict = {}
            if self.moe_config.router == "sparsemixer":
                self._install_sparsemixer()
            elif self.moe_config.router in ("hash", "stablemoe"):
                self._install_token_router()
            if registered_routers()[self.moe_config.router].uses_defaults:
                from deepspeed.utils import groups

                self.defaults = (
                    ExpertDefaults.from_config(
                        self.moe_config,
                        self.num_experts,
                        self.hidden_size,
                        gate=self.gate_form(),
                    )
                    .to(self.router.gate.weight.device)
                    .bind(self, groups._get_data_parallel_group)
                )

        def gate_form(self) -> GateForm:
            """The combine weights of the selected experts: AutoEP's own top scores (route_norm,
            route_scale) with `normalize_topk`, else the raw scores (the paper's pi)."""
            router = self.router
            if self.moe_config.normalize_topk:
                return GateForm(router.score_func, bool(router.route_norm), float(router.route_scale))
            return GateForm(router.score_func)

        def _install_sparsemixer(self) -> None:
            """AutoEP's router, re-routed by SparseMixer on the same gate weights: its forward
            returns (top_scores, experts, counts) as AutoEP expects, the scores carrying
            SparseMixer's custom backward. Balance loss: HF's own router aux loss
            (`output_router_logits`) as Phi-3.5-MoE does; no other is added here."""
            from deepspeed.moe.ep_count import count_tokens_per_expert

            from default_moe.routing.sparsemixer import sparsemixer_route

            router, layer = self.router, self
            version, eps = self.moe_config.sparsemixer.resolved(self.top_k)
            if router.score_func != "softmax" or router.num_expert_groups is not None:
                raise ValueError(
                    'DeepSpeed config "default_moe": router "sparsemixer" needs a softmax router without expert groups'
                )
            if version == "v1":
                self.omega = torch.nn.Parameter(torch.ones(self.hidden_size, device=router.gate.weight.device))
            self.sparsemixer_generator = None

            def forward(x, expert_bias=None):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    logits_TE = router.gate(x).float()
                idx_TK, gates_TK, _, _ = sparsemixer_route(logits_TE, version, eps, layer.training, layer.sparsemixer_generator)
                return gates_TK, idx_TK, count_tokens_per_expert(idx_TK, layer.num_experts)

            router.forward = forward

        def _install_token_router(self) -> None:
            """hash / StableMoE on AutoEP's router: token ids come from the model input (recorded by
            `token_context.capture_token_ids`, installed by `initialize`); StableMoE's affinity is
            the gate's logits (its weight = the expert centroids), its distilled router and stage
            counter live on this layer, and its stage-1 losses are attached to the layer output."""
            from deepspeed.moe.ep_count import count_tokens_per_expert

            from default_moe import token_context
            from default_moe.routing.hash import hash_experts
            from default_moe.routing.stablemoe import DistilledRouter, stablemoe_route, stage_for

            router, layer, cfg = self.router, self, self.moe_config
            kind = cfg.router
            if kind == "stablemoe":
                if self.top_k != 1:
                    raise ValueError(f"router 'stablemoe' needs a top-1 model, this one routes top-{self.top_k}")
                sc = cfg.stablemoe
                self.distill = DistilledRouter(self.num_experts, sc.vocab_size, sc.router_dim).to(router.gate.weight.device)
                self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=router.gate.weight.device))

            def forward(x, expert_bias=None):
                ids_T = token_context.ids_for(layer._record, f"router {kind!r}").reshape(-1).to(x.device).long()
                if ids_T.numel() != x.shape[0]:
                    raise ValueError(f"recorded token ids ({ids_T.numel()}) do not match the MoE input ({x.shape[0]} tokens)")
                if kind == "hash":
                    idx_TK = hash_experts(ids_T, layer.num_experts, layer.top_k)
                    gates_TK = torch.full(idx_TK.shape, 1.0 / layer.top_k, device=x.device)
                else:
                    with torch.autocast(device_type=x.device.type, enabled=False):
                        scores_TE = router.gate(x).float()
                    first = stage_for(layer._record, layer.training, layer.num_steps, cfg.stablemoe.stage2_step)
                    idx_T, gate_T, aux = stablemoe_route(scores_TE, ids_T, layer.distill, cfg.stablemoe, first)
                    idx_TK, gates_TK = idx_T[:, None], gate_T[:, None]
                    layer._pending_aux = sum(aux.values()) if aux else None
                return gates_TK, idx_TK, count_tokens_per_expert(idx_TK, layer.num_experts)

            router.forward = forward

        def _check_supported(self) -> None:
            folded = self.folding_group_handles is not None and self.folding_group_handles.spec.tp_size > 1
            problems = []
            if self.ep_size > 1 and self.comm_backend != mod.COMM_BACKEND:
                problems.append(f"comm backend {self.comm_backend!r}")
            if folded:
                problems.append("AutoEP+AutoTP folding")
            if self.score_apply != "post":
                problems.append(f"score_apply={self.score_apply!r}")
            if self.combine_impl == "fused_weighted_sum":
                problems.append("combine_impl='fused_weighted_sum'")
            if problems:
                raise ValueError(f'DeepSpeed config "default_moe" with AutoEP does not support {", ".join(problems)}')

        def _forward(self, hidden_states: torch.Tensor):
            self._record, entry = self._records.get(dict, updates_state(self.training))
            try:
                out = self._forward_impl(hidden_states)
            finally:
                self._record = {}  # a route outside a forward starts afresh
            self._records.release_after_backward(entry, out[0] if isinstance(out, tuple) else out)
            return out

        def _forward_impl(self, hidden_states: torch.Tensor):
            if self.defaults is None and self.omega is None:
                out = super()._forward(hidden_states)
                aux, self._pending_aux = self._pending_aux, None
                if aux is not None and torch.is_grad_enabled():  # StableMoE stage-1 losses
                    from default_moe.losses import AuxLossAutoScaler

                    if isinstance(out, tuple):
                        return (AuxLossAutoScaler.attach(out[0], aux),) + tuple(out[1:])
                    return AuxLossAutoScaler.attach(out, aux)
                return out
            if self.defaults is None:  # SparseMixer v1: omega scales the routed output
                self._check_supported()
                omega, original_combine = self.omega, mod.combine_from_routed

                def scaled(*args, **kwargs):
                    out = original_combine(*args, **kwargs)
                    return out * omega.to(out.dtype)

                with _combine_replaced(mod, scaled):
                    return super()._forward(hidden_states)
            self._check_supported()
            fwd = self.defaults.begin_forward(self.training, "DefaultAutoEPMoELayer")
            x_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
            captured = {}
            hook = self.router.register_forward_hook(lambda m, a, out: captured.update(selected_TK=out[1]))

            def combine(expert_output, top_scores, token_indices_sorted, top_k, score_apply, combine_impl, shape):
                bsz, seqlen, H = shape
                T = bsz * seqlen
                y_TKH = expert_output.new_zeros(T * top_k, H).index_copy(0, token_indices_sorted, expert_output)
                y_TKH = y_TKH.view(T, top_k, H)
                idx_TK = captured["selected_TK"].long()
                with torch.autocast(device_type=x_TH.device.type, enabled=False):
                    logits_TE = self.router.gate(x_TH).float()
                probs_TE = dense_scores(logits_TE, self.router.score_func)
                probs_TK = probs_TE.gather(1, idx_TK)
                gates_TK = top_scores.float() if self.moe_config.normalize_topk else probs_TK
                self.defaults.observe(fwd, y_TKH, idx_TK, probs_TK, None, anchor=probs_TE)
                routed_TH = (y_TKH.float() * gates_TK.unsqueeze(-1)).sum(1)
                out = routed_TH + self.defaults.default_term(
                    fwd, probs_TE, ran_mask(self.num_experts, idx_TK), routed_TD=routed_TH
                )
                return out.to(expert_output.dtype).reshape(bsz, seqlen, H)

            try:
                with _combine_replaced(mod, combine):
                    return super()._forward(hidden_states)
            finally:
                hook.remove()

    return DefaultAutoEPMoELayer


@contextlib.contextmanager
def building_with(settings: Dict):
    """While the engine is built, AutoEP constructs our layer class."""
    from deepspeed.module_inject import auto_ep_layer as mod

    original = mod.AutoEPMoELayer
    mod.AutoEPMoELayer = layer_class(settings)
    try:
        yield
    finally:
        mod.AutoEPMoELayer = original
