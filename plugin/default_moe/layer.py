"""`MoELayer`: the expert-parallel MoE layer; the only place router, dispatch, experts and
defaults meet.

    out_TD = sum_k gates_TK * y_TKD  +  (probs_TE * unselected_TE) @ D_ED     (Default MoE, softmax)
    (other gate forms — sigmoid, renormalised, route scale — as derived in `defaults.GateForm`)
    out_TD = sum_k gates_TK * y_TKD                                            (TopK)

The default term uses only local tensors (the replicated D), so Default MoE's dense router
gradient adds no communication and no forward runs a collective for D: training forwards
accumulate statistics locally, and D is committed at the optimizer step with one bucketed
all-reduce for all layers (`default_moe.defaults`; the step contract).

Legend: T tokens, K top-k, E experts, D hidden.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from default_moe.config import MoEConfig
from default_moe.defaults import ExpertDefaults, ran_mask
from default_moe.dispatch import AllToAllDispatcher, capacity_keep_mask, expert_counts, weighted_sum
from default_moe.experts import GroupedExperts, SharedExpert, mark_expert_params
from default_moe.layer_utils import layer_built, updates_state
from default_moe.losses import AuxLossAutoScaler
from default_moe.parallel import ParallelGroups, build_groups, check_same_config
from default_moe.routing import build_router, registered_routers
from default_moe.step_state import step_states_in


def check_finite(t: torch.Tensor, what: str, layer_name: str, step: int) -> None:
    """Raises FloatingPointError if `t` has a NaN/inf (MoEConfig.nonfinite="raise"; one host sync)."""
    if not bool(torch.isfinite(t).all()):
        raise FloatingPointError(
            f"non-finite {what} in MoE layer {layer_name or '(unnamed)'} at training forward {step} "
            f"(MoEConfig.nonfinite='raise'; 'skip' keeps the defaults unchanged instead)"
        )


def _rebuilt_router(old: nn.Module, config: MoEConfig, device: torch.device) -> nn.Module:
    """A router built for `config`, keeping `old`'s Parameter objects (optimizer references) and,
    for the same router kind, its buffers (e.g. StableMoE's step), wherever names and shapes match.

    Always rebuilt: a router resolves settings at construction (SparseMixer's version, StableMoE's
    vocabulary and width), so reusing one of the same kind could keep stale ones.
    """
    new = registered_routers()[config.router](config).to(device)
    old_params = dict(old.named_parameters())
    for name, p in list(new.named_parameters()):
        if name in old_params and old_params[name].shape == p.shape:
            module_name, _, attr = name.rpartition(".")
            setattr(new.get_submodule(module_name) if module_name else new, attr, old_params[name])
    if type(new) is type(old):
        old_buffers = dict(old.named_buffers())
        with torch.no_grad():
            for name, b in new.named_buffers():
                if name in old_buffers and old_buffers[name].shape == b.shape:
                    b.copy_(old_buffers[name])
    return new


class MoELayer(nn.Module):
    """Expert-parallel MoE layer with interchangeable routers (TopK, Default MoE, ...).

    Args:
        config: the layer's `MoEConfig`.
        groups: process groups; by default built from `torch.distributed` for `config.ep_size`.

    Attributes:
        router: the routing module (`config.router`).
        experts: this rank's `config.num_experts // config.ep_size` experts.
        defaults: `ExpertDefaults` when the router uses defaults, else None.
        aux_losses: detached aux losses of the last forward, for logging.
        tokens_per_expert: local token-slot counts per expert of the last forward (E,), for logging.
    """

    def __init__(self, config: MoEConfig, groups: Optional[ParallelGroups] = None) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"MoELayer needs a MoEConfig, got {type(config).__name__}")
        if groups is None:
            groups = build_groups(config.ep_size)
        elif groups.ep_size != config.ep_size:
            raise ValueError(
                f"MoEConfig.ep_size ({config.ep_size}) does not match the size of the given EP group ({groups.ep_size})"
            )
        check_same_config(config, groups.dp_group)  # once, at build: a mismatch fails, never hangs
        self.config = config
        self.groups = groups
        self.router = build_router(config)
        self.dispatcher = AllToAllDispatcher(config.num_experts, groups.ep_group)
        self.experts = GroupedExperts(
            config.num_local_experts,
            config.hidden_size,
            config.ffn_hidden_size,
            config.activation,
            config.init_std,
            first_expert=groups.ep_rank * config.num_local_experts,
            backend=config.experts_backend,
        )
        mark_expert_params(self.experts)
        # Dense, replicated like the router: every token, not part of the default term.
        self.shared_experts = (
            SharedExpert(
                config.hidden_size,
                config.shared_expert_ffn_hidden_size,
                config.activation,
                config.shared_expert_gate,
                config.init_std,
            )
            if config.shared_expert_ffn_hidden_size
            else None
        )
        self.defaults: Optional[ExpertDefaults] = None
        if self.router.uses_defaults:
            self.defaults = ExpertDefaults.from_config(config)
        self._bind_step_state()
        # Named in errors (non-finite values); models set it, e.g. "layers.3.moe".
        self._layer_name = ""
        # A device counter, not a Python int: an int attribute changed in forward is a guard that
        # recompiles a torch.compile'd layer on every call.
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long), persistent=False)
        # Logging state of the last forward: buffers (not saved), so `.to()` moves them.
        self.aux_losses: Dict[str, torch.Tensor] = {}
        self.register_buffer("tokens_per_expert", None, persistent=False)
        self.register_buffer("dropped_slots", torch.zeros((), dtype=torch.long), persistent=False)
        layer_built(self)  # integrations' construction hooks (e.g. the DeepSpeed section guard)

    def _bind_step_state(self) -> None:
        """D and the expert bias change at optimizer steps, summed over the data-parallel group."""
        for state in step_states_in(self):
            state.bind(self, self.groups.dp_group)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.aux_losses = {k: fn(v) for k, v in self.aux_losses.items()}  # every tensor follows .to()
        return self

    @property
    def layer_name(self) -> str:
        return self._layer_name

    @layer_name.setter
    def layer_name(self, name: str) -> None:
        # Set here, not in forward: an attribute written in forward is a side effect torch.compile
        # has to replay (and a guard).
        self._layer_name = name
        if self.defaults is not None:
            self.defaults.name = name

    @property
    def num_training_forwards(self) -> int:
        """Training forwards run (not recomputes, not frozen ones); reading it syncs with the device."""
        return int(self.training_forwards)

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    def reconfigure(self, config: MoEConfig, groups: Optional[ParallelGroups] = None) -> None:
        """Applies a new config to a built layer, in place (used by the engine integrations).

        Router kind, top-k, beta, sync mode, capacity and loss coefficients may change freely.
        `ep_size` may go from 1 to P: each rank keeps its slice of the experts. Parameters keep
        their identity (only `.data` is sliced), so an optimizer built before this call stays valid.
        Shapes (hidden, ffn, experts, activation, shared experts) cannot change.
        """
        old = self.config
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_experts",
            "activation",
            "shared_expert_ffn_hidden_size",
            "shared_expert_gate",
        ):
            if getattr(config, name) != getattr(old, name):
                raise ValueError(
                    f"MoEConfig.{name} cannot change on a built layer ({getattr(old, name)!r} -> {getattr(config, name)!r})"
                )
        if groups is None:
            groups = build_groups(config.ep_size)
        if groups.ep_size != config.ep_size:
            raise ValueError(
                f"MoEConfig.ep_size ({config.ep_size}) does not match the size of the given EP group ({groups.ep_size})"
            )
        if config.ep_size != old.ep_size:
            if old.ep_size != 1:
                raise ValueError(f"only a layer built with ep_size=1 can be resharded, this one has ep_size={old.ep_size}")
            L = config.num_local_experts
            keep = slice(groups.ep_rank * L, (groups.ep_rank + 1) * L)
            with torch.no_grad():
                for p in self.experts.parameters():
                    p.data = p.data[keep].clone()
        self.config, self.groups = config, groups
        self.dispatcher = AllToAllDispatcher(config.num_experts, groups.ep_group)
        self.experts.backend = config.experts_backend
        device = self.experts.w2_LFD.device
        self.router = _rebuilt_router(self.router, config, device)
        if self.router.uses_defaults:
            if self.defaults is None:
                self.defaults = ExpertDefaults.from_config(config, name=self._layer_name).to(device)
            else:
                self.defaults.configure(config)
        else:
            self.defaults = None
        self._bind_step_state()

    @property
    def local_expert_ids(self) -> range:
        """Global ids of the experts this rank holds."""
        L = self.config.num_local_experts
        return range(self.groups.ep_rank * L, (self.groups.ep_rank + 1) * L)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MoELayer input must be a floating-point tensor, got {got}")
        if x.dim() < 1 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"MoELayer input's last dimension must equal MoEConfig.hidden_size "
                f"({self.config.hidden_size}), got shape {tuple(x.shape)}"
            )

    def _check_not_in_plain_ddp(self) -> None:
        """Refuses a plain DistributedDataParallel around EP experts (it broadcast rank 0's experts
        over the other EP ranks at construction and would average different experts' gradients)."""
        ddp = nn.parallel.DistributedDataParallel._active_ddp_module
        if ddp is None or self.groups.ep_size == 1:
            return
        if any(not getattr(p, "_ddp_ignored", False) for p in self.experts.parameters()):
            raise ValueError(
                f"MoE layer {self.layer_name or '(unnamed)'} with ep_size={self.groups.ep_size} runs inside a plain "
                "torch DistributedDataParallel, which broadcast rank 0's experts over the other EP ranks and averages "
                "different experts' gradients. Use default_moe.data_parallel.wrap_ddp(model) instead (or "
                "reduce_gradients(model) after backward, or fully_shard_moe(model) for FSDP2)"
            )

    def forward(
        self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Routes, dispatches, runs experts, combines (and adds the default term).

        Args:
            x: [..., D] hidden states.
            token_ids: optional [...] input token ids, for routers that route by token.
            mask: optional [...] bool (or 0/1), False for tokens that must not enter the EMA
                statistics (padding); they are still routed and computed.

        Returns:
            [..., D], same dtype as `x`. The aux losses are attached to it for backward.
        """
        self._check_input(x)
        self._check_not_in_plain_ddp()
        cfg = self.config
        x_TD = x.reshape(-1, cfg.hidden_size)
        token_ids_T = token_ids.reshape(-1) if token_ids is not None else None
        # A recompute or a frozen (diagnostic) forward changes no state: it neither applies a
        # pending update nor makes one, and records no counters.
        record = updates_state(True)
        fwd = None
        if self.defaults is not None:
            if self.defaults.layer() is None:  # an unpickled layer binds on first use
                self._bind_step_state()
            mask_T = None
            if mask is not None:
                if mask.shape != x.shape[:-1]:
                    raise ValueError(f"MoELayer mask must have the token shape {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
                mask_T = mask.reshape(-1).bool()
            fwd = self.defaults.begin_forward(self.training, "MoELayer", mask_T=mask_T)

        route = self.router(x_TD, self.groups, token_ids_T)
        if self.training and record:
            self.training_forwards.add_(1)
            if cfg.nonfinite == "raise":
                check_finite(route.probs_TE, "router probabilities", self.layer_name, self.num_training_forwards)
        idx_TK, gates_TK = route.idx_TK, route.gates_TK
        # Raw pi of the selected experts: drop priority and EMA weight (not the renormalised gates).
        probs_TK = route.probs_TE.detach().gather(1, idx_TK)
        keep_TK = capacity_keep_mask(idx_TK, probs_TK, cfg.num_experts, cfg.capacity_factor, cfg.drop_policy)
        host_counts = self.experts.needs_host_counts(x_TD.device.type, x_TD.dtype)
        x_local_ND, plan = self.dispatcher.dispatch(x_TD, idx_TK, keep_TK, host_counts)
        y_local_ND = self.experts(x_local_ND, plan.tokens_per_local_expert, plan.counts_L)
        y_TKD = self.dispatcher.combine(y_local_ND, plan)

        out_TD = weighted_sum(y_TKD, gates_TK)
        if route.output_scale_D is not None:
            out_TD = out_TD * route.output_scale_D.to(out_TD.dtype)
        if self.defaults is not None:
            probs_TE = self.defaults.observe(
                fwd,
                y_TKD,
                idx_TK,
                probs_TK,
                keep_TK,
                anchor=route.probs_TE,
                carrier=route.probs_TE,
                counts_E=plan.slot_counts_E,
            )
            # Experts that did not process the token: not in the top-k, or dropped over capacity
            # (dropless: the top-k themselves, no [T, E] mask).
            ran_TE = ran_mask(cfg.num_experts, idx_TK, keep_TK) if keep_TK is not None else None
            out_TD = self.defaults.add_default_term(out_TD, probs_TE, ran_TE, routed_TD=out_TD, selected_TK=idx_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD).to(out_TD.dtype)

        if record:
            # On the device: logging costs no host sync.
            self.aux_losses = {k: v.detach() for k, v in route.aux_losses.items()}
            self.tokens_per_expert = expert_counts(idx_TK.reshape(-1), cfg.num_experts)
            self.dropped_slots = (
                torch.zeros((), dtype=torch.long, device=x.device) if keep_TK is None else (~keep_TK).sum().detach()
            )
        if route.aux_losses and out_TD.requires_grad:
            out_TD = AuxLossAutoScaler.attach(out_TD, sum(route.aux_losses.values()))
        return out_TD.view(x.shape)
