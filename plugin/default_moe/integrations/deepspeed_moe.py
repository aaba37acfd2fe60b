"""Default MoE for DeepSpeed's own MoE layers (`deepspeed.moe.layer.MoE`), converted in place.

Choice: keep DeepSpeed's module and swap its `MOELayer` (`moe.deepspeed_moe`) for
`DefaultMOELayer`, a subclass that reuses the same gate and experts modules. Parameter names and
objects stay exactly as they were (`deepspeed_moe.gate.wg.weight`,
`deepspeed_moe.experts.deepspeed_experts.N...`), so existing checkpoints load, DeepSpeed's
engine still recognises the layer (expert groups, MoE optimizer groups, per-expert checkpoint
files), and its gating functions keep their capacity/drop semantics, `l_aux` and `exp_counts`.
What the subclass adds: the fp32 softmax over all experts, the default term
sum_{experts that did not run} pi_i D_i (capacity-dropped routes included), and the EMA defaults
(`deepspeed_moe.defaults.defaults_ED`, no "expert" in the name, so DeepSpeed saves it with the
replicated module state), updated from the raw expert outputs and all-reduced over DP.

Routers "hash" and "stablemoe" route by the model's input ids (recorded by
`token_context.capture_token_ids`, which `initialize` installs on the model); StableMoE uses the
gate's weight as its centroids, adds its distilled router and stage counter to this module, and
returns its stage-1 losses as `l_aux`.
Router "sparsemixer" (v1 top-1 / v2 top-2, by the gate's k) samples the experts with SparseMixer's
estimator on the gate's weights and feeds DeepSpeed's dispatch with them (its capacity rules and
l_aux formula kept); v1's omega is not added here (the gate has no such parameter; GRIN's v2 has
none either). Router "topk" runs DeepSpeed's forward unchanged (same gates, same RNG use): outputs equal the
unconverted layer's. Router "default" combines with the raw pi (DeepSpeed's top-2 gating
renormalises the two gates; its top-1 does not), unless `normalize_topk` is true: then DeepSpeed's
own gates, and the default term of a renormalised gate (`defaults.GateForm`, docs/method.md).

Limits: Tutel dispatch and tensor-parallel experts are refused (DeepSpeed's forward has extra
steps for them that this subclass does not reproduce).

Legend: S tokens, E experts, C capacity, K routes per token, M hidden.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from default_moe.config import MoEConfig
from default_moe.defaults import ExpertDefaults, GateForm, dense_softmax, ran_mask
from default_moe.layer_utils import ForwardSnapshots, updates_state
from default_moe.routing import registered_routers

# Keys of the "default_moe" section that a DeepSpeed MoE layer takes from its own constructor.
FIXED_BY_DS_LAYER = {"top_k": "k", "ep_size": "ep_size", "capacity_factor": "capacity_factor"}
NOT_APPLICABLE = (
    "drop_policy",
    "aux_loss_coeff",
    "z_loss_coeff",
    "score_function",
    "route_scale",
    "expert_bias",
    "expert_bias_update_rate",
    "num_expert_groups",
    "group_topk",
)
ENGINE_ROUTERS = ("topk", "default", "sparsemixer", "hash", "stablemoe")


def layer_config(moe, overrides: dict) -> MoEConfig:
    """The MoEConfig of a DeepSpeed MoE layer with the section applied (validated)."""
    gate = moe.deepspeed_moe.gate
    router = overrides.get("router", "default")
    if router not in ENGINE_ROUTERS:
        raise ValueError(
            f'DeepSpeed config "default_moe": router {router!r} is available for default_moe.MoELayer models; '
            f"deepspeed.moe.layer.MoE layers support {list(ENGINE_ROUTERS)}"
        )
    for key in NOT_APPLICABLE:
        if key in overrides:
            raise ValueError(
                f'DeepSpeed config "default_moe": {key!r} does not apply to deepspeed.moe.layer.MoE layers '
                f"(their gate returns l_aux for your loss and sets its own drop policy); remove it"
            )
    current = {"top_k": gate.k, "ep_size": moe.ep_size, "capacity_factor": gate.capacity_factor}
    for key, value in current.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(
                f'DeepSpeed config "default_moe": {key}={overrides[key]!r} differs from the deepspeed.moe.layer.MoE '
                f"layer's {key}={value!r}; set it in MoE(...) instead"
            )
    rest = {k: v for k, v in overrides.items() if k not in current}
    return MoEConfig(
        hidden_size=gate.wg.in_features,
        num_experts=moe.num_experts,
        ffn_hidden_size=1,
        top_k=gate.k,
        ep_size=moe.ep_size,
        capacity_factor=gate.capacity_factor,
        aux_loss_coeff=0.0,
        **rest,
    )


def convert(moe, config: MoEConfig) -> None:
    """Replaces `moe.deepspeed_moe` by a `DefaultMOELayer` with the same gate and experts."""
    from deepspeed.utils import groups

    base = moe.deepspeed_moe
    if getattr(base, "use_tutel", False):
        raise ValueError('DeepSpeed config "default_moe": deepspeed.moe.layer.MoE with use_tutel=True is not supported')
    if groups.mpu is not None:
        raise ValueError('DeepSpeed config "default_moe": deepspeed.moe.layer.MoE with tensor parallelism (mpu) is not supported')
    if isinstance(base, DefaultMOELayer):
        base.set_config(config)
        return
    moe.deepspeed_moe = DefaultMOELayer(base, config)


def _moe_layer_base():
    from deepspeed.moe.sharded_moe import MOELayer

    return MOELayer


class DefaultMOELayer(_moe_layer_base()):
    """DeepSpeed's `MOELayer` plus our router semantics and the Default MoE term."""

    def __init__(self, base, config: MoEConfig) -> None:
        super().__init__(base.gate, base.experts, base.ep_group_name, base.ep_size, base.num_local_experts)
        if base.ep_group is not None:
            self.ep_group = base.ep_group
        self.defaults: Optional[ExpertDefaults] = None
        # Per-forward token ids and StableMoE stage, replayed by a recompute (the recompute contract).
        self._records = ForwardSnapshots()
        self._record: dict = {}
        self.set_config(config)

    def _gate_form(self, config: MoEConfig) -> GateForm:
        """DeepSpeed's own gates (`normalize_topk`): top-1 raw pi, top-2 and top-k renormalised over
        the kept routes; otherwise the paper's raw pi."""
        return GateForm("softmax", bool(config.normalize_topk) and self.gate.k >= 2)

    def set_config(self, config: MoEConfig) -> None:
        self.moe_config = config
        if config.router == "stablemoe" and not hasattr(self, "distill"):
            from default_moe.routing.stablemoe import DistilledRouter

            if self.gate.k != 1:
                raise ValueError(f"router 'stablemoe' needs MoE(k=1), this layer has k={self.gate.k}")
            sc = config.stablemoe
            self.distill = DistilledRouter(config.num_experts, sc.vocab_size, sc.router_dim).to(self.gate.wg.weight.device)
            self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=self.gate.wg.weight.device))
        uses_defaults = registered_routers()[config.router].uses_defaults
        if not uses_defaults:
            self.defaults = None
        elif self.defaults is None:
            from deepspeed.utils import groups

            self.defaults = ExpertDefaults.from_config(config, gate=self._gate_form(config)).to(self.gate.wg.weight.device)
            self.defaults.bind(self, groups._get_data_parallel_group)
        else:
            self.defaults.configure(config, self._gate_form(config))

    def _sparse_routes(self, logits_SE: Tensor, idx_SK: Tensor, gates_SK: Tensor, balance_SE: Tensor, l_aux=None):
        """Routes chosen by one of our routers in DeepSpeed's sparse-route format, with DeepSpeed's
        capacity rules (capacity_factor * k, min_capacity, or the EP-wide max count when
        drop_tokens=False; later routes queue after earlier ones, as top2gating does) and, unless
        given, its l_aux formula (E^2 / k * mean(me * ce))."""
        import torch.distributed as dist
        from deepspeed.moe.sharded_moe import _capacity

        gate = self.gate
        S, E = logits_SE.shape
        K = idx_SK.shape[1]
        masks_KSE = F.one_hot(idx_SK.t(), E)
        exp_counts = masks_KSE.sum(dim=(0, 1)).detach()
        cf = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        if gate.drop_tokens:
            capacity = _capacity(balance_SE, torch.tensor(cf * K), torch.tensor(gate.min_capacity))
        else:
            capacity = exp_counts.max().clone()
            if gate.ep_group is not None:
                dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=gate.ep_group)
        # Position of each route in its expert's queue: all first routes, then all second routes.
        flat = masks_KSE.reshape(K * S, E)
        loc_KS = ((torch.cumsum(flat, 0) - 1) * flat).sum(-1).reshape(K, S)
        kept_KS = loc_KS < capacity
        idx_KS = torch.where(kept_KS, idx_SK.t(), torch.full_like(idx_SK.t(), -1)).to(torch.int32)
        if l_aux is None:
            me = balance_SE.mean(0)
            ce = masks_KSE.float().sum(0).mean(0)
            l_aux = torch.mean(me * ce) * E * E / K
        return logits_SE, (l_aux, capacity, E, idx_KS, loc_KS.to(torch.int32), gates_SK.t() * kept_KS, exp_counts)

    def _our_route(self, x_SM: Tensor):
        """sparsemixer / hash / stablemoe on the gate's weights (StableMoE: its centroids)."""
        from default_moe import token_context
        from default_moe.routing.hash import hash_experts
        from default_moe.routing.sparsemixer import sparsemixer_route
        from default_moe.routing.stablemoe import stablemoe_route, stage_for

        gate, cfg = self.gate, self.moe_config
        logits_SE = F.linear(x_SM.float(), weight=gate.wg.weight.float(), bias=None)
        if cfg.router == "sparsemixer":
            version, eps = cfg.sparsemixer.resolved(gate.k)
            idx_SK, gates_SK, _, balance_SE = sparsemixer_route(
                logits_SE, version, eps, gate.training, getattr(self, "sparsemixer_generator", None)
            )
            return self._sparse_routes(logits_SE, idx_SK, gates_SK, balance_SE)
        ids_S = token_context.ids_for(self._record, f"router {cfg.router!r}").reshape(-1).to(x_SM.device).long()
        if ids_S.numel() != x_SM.shape[0]:
            raise ValueError(f"recorded token ids ({ids_S.numel()}) do not match the MoE input ({x_SM.shape[0]} tokens)")
        if cfg.router == "hash":
            idx_SK = hash_experts(ids_S, cfg.num_experts, gate.k)
            gates_SK = torch.full(idx_SK.shape, 1.0 / gate.k, device=x_SM.device)
            return self._sparse_routes(logits_SE, idx_SK, gates_SK, torch.zeros_like(logits_SE), l_aux=logits_SE.new_zeros(()))
        first = stage_for(self._record, gate.training, self.num_steps, cfg.stablemoe.stage2_step)
        idx_S, gate_S, aux = stablemoe_route(logits_SE, ids_S, self.distill, cfg.stablemoe, first)
        # StableMoE's stage-1 losses (already weighted by its coefficients) are the l_aux returned.
        l_aux = sum(aux.values()) if aux else logits_SE.new_zeros(())
        return self._sparse_routes(logits_SE, idx_S[:, None], gate_S[:, None], torch.zeros_like(logits_SE), l_aux=l_aux)

    def _route(self, x_SM: Tensor, used_token: Optional[Tensor]):
        """TopKGate.forward, keeping the logits (same calls, same random numbers)."""
        from deepspeed.moe.sharded_moe import multiplicative_jitter, top1gating, top2gating, topkgating

        gate = self.gate
        if self.moe_config.router in ("sparsemixer", "hash", "stablemoe"):
            return self._our_route(x_SM)
        x_fp32 = x_SM.float()
        if gate.noisy_gate_policy == "Jitter" and gate.training:
            x_fp32 = multiplicative_jitter(x_fp32, device=x_SM.device)
        logits_SE = F.linear(x_fp32, weight=gate.wg.weight.float(), bias=None)
        cf = gate.capacity_factor if gate.training else gate.eval_capacity_factor
        if gate.k == 1:
            out = top1gating(
                logits_SE,
                cf,
                gate.min_capacity,
                used_token,
                gate.noisy_gate_policy if gate.training else None,
                gate.drop_tokens,
                gate.use_rts,
                gate.ep_group,
                True,
                False,
            )
        elif gate.k == 2:
            out = top2gating(
                logits_SE, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group, gate.top2_2nd_expert_sampling, True
            )
        else:
            out = topkgating(logits_SE, gate.k, cf, gate.min_capacity, gate.drop_tokens, gate.ep_group, sparse_routes=True)
        return logits_SE, out

    def forward(self, *input: Tensor, **kwargs: Any) -> Tensor:
        from deepspeed.moe.sharded_moe import _AllToAll, _route_slots, _sparse_encode

        x = input[0]
        used_token = input[1] if len(input) > 1 else None
        M = x.shape[-1]
        x_SM = x.reshape(-1, M)
        S = x_SM.shape[0]
        fwd = self.defaults.begin_forward(self.training, "DefaultMOELayer") if self.defaults is not None else None
        self._record, entry = self._records.get(dict, updates_state(self.training))

        logits_SE, (self.l_aux, C, E, idx_KS, loc_KS, gates_KS, self.exp_counts) = self._route(x_SM, used_token)
        C = int(C)
        kept_KS = idx_KS >= 0
        idx_SK = idx_KS.t().long().clamp_min(0)
        probs_SE = dense_softmax(logits_SE)
        probs_SK = probs_SE.gather(1, idx_SK)
        if self.defaults is not None and not self.moe_config.normalize_topk:
            gates_KS = probs_SK.t() * kept_KS  # raw pi, as the paper combines

        slots_KS = _route_slots(idx_KS, loc_KS, E, C)
        dispatched = _sparse_encode(x_SM, slots_KS, E, C)
        dispatched = _AllToAll.apply(self.ep_group, dispatched) if self.ep_size > 1 else dispatched.contiguous()
        dispatched = dispatched.reshape(self.ep_size, self.num_local_experts, -1, M)
        expert_out = self.experts(dispatched).reshape(self.ep_size * self.num_local_experts, -1, M)
        expert_out = _AllToAll.apply(self.ep_group, expert_out) if self.ep_size > 1 else expert_out.contiguous()
        # DeepSpeed's _sparse_decode, keeping the raw per-route outputs for the EMA.
        flat = expert_out.view(E * C, M)
        padded = torch.cat([flat, flat.new_zeros(1, M)])
        routed_KSM = padded.index_select(0, slots_KS.reshape(-1)).view(slots_KS.shape[0], S, M)
        out_SM = (routed_KSM * gates_KS.unsqueeze(-1)).sum(0).to(expert_out.dtype)

        if self.defaults is not None:
            keep_SK = kept_KS.t()
            self.defaults.observe(fwd, routed_KSM.transpose(0, 1), idx_SK, probs_SK, keep_SK, anchor=probs_SE)
            out_SM = out_SM + self.defaults.default_term(fwd, probs_SE, ran_mask(E, idx_SK, keep_SK), routed_TD=out_SM).to(
                out_SM.dtype
            )
        self._records.release_after_backward(entry, out_SM)
        self._record = {}  # a route outside a forward starts afresh
        return out_SM.reshape(x.shape)
