"""Default MoE in torchtitan (0.3.x) by one flag, no torchtitan edits:

    torchrun ... -m torchtitan.train --module M --config F \\
        --override.imports 'default_moe.integrations.torchtitan.default_moe={"beta": 0.9}'

`default_moe` is a torchtitan override (`@override(target=MoE.Config)`): it replaces every MoE
config node of any config by `DefaultMoE.Config`, whose module is torchtitan's own `MoE` (its
forward, router, dispatcher, grouped experts, shared experts and expert bias untouched) plus the
one Default MoE mechanism (`default_moe.defaults`), attached with three hooks:
- on the router: the full scores of all experts (`scores_BLE`) and the selected experts;
- on the inner grouped experts: their raw outputs, expert-major rows with per-local-expert
  counts (local and all-to-all dispatchers), feed the EMA statistics;
- on the routed experts: the default term for torchtitan's gate form (`score_func`,
  `route_norm`, `route_scale`; docs/method.md) is added to the routed output, before the shared
  experts.
D (`moe.defaults.defaults_ED`) lives in a plain submodule, replicated on every rank and saved
by DCP with the model state. The step contract: training forwards accumulate statistics (when
the backward reaches the layer, so activation checkpointing counts once), and the optimizer step
commits them — torch's step pre-hook, the moment torchtitan updates its expert bias — summed
over the group torchtitan reduces its expert-bias counts over (the `loss` mesh) when the model
was parallelised for EP, else the router weight's FSDP mesh, else the world.

`router="topk"` (or no override) is torchtitan exactly. Refused by name: tensor parallelism and
pipeline parallelism (not built or tested), `ema_weighting="prob"` (the dispatched rows carry no
scores), and settings MoEConfig refuses.

Legend: B batch, L sequence, D hidden, E experts, K top-k, R routed rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from default_moe.config import MoEConfig, check_adapter_settings, check_overrides
from default_moe.defaults import ExpertDefaults, GateForm, ran_mask

from torchtitan.config import derive, override
from torchtitan.models.common.moe import MoE
from torchtitan.protocols.module import Module

SETTINGS = ("router", "beta", "ema_weighting", "ema_stats_dtype", "nonfinite", "default_in_forward", "stale_defaults")
ROUTERS = ("default", "topk")


def check_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The override's keyword arguments, validated (before any process group exists)."""
    settings = check_adapter_settings(
        settings,
        SETTINGS,
        ROUTERS,
        "default_moe.integrations.torchtitan",
        "the other routers run in default_moe.MoELayer, DeepSpeed, Megatron or HF models",
    )
    if settings.get("ema_weighting", "mean") != "mean":
        raise ValueError(
            "default_moe.integrations.torchtitan: ema_weighting must be 'mean' (torchtitan's dispatched "
            f"rows carry no router scores), got {settings['ema_weighting']!r}"
        )
    check_overrides(settings)
    return settings


def gate_form(router_config) -> GateForm:
    """torchtitan's `TokenChoiceTopKRouter` gate: score_func, route_norm, route_scale."""
    return GateForm(router_config.score_func, bool(router_config.route_norm), float(router_config.route_scale))


class TitanExpertDefaults(ExpertDefaults, Module):
    """`ExpertDefaults` as a torchtitan `Module` (every submodule of a torchtitan model must be
    one). No sharding config: D is a plain tensor, identical on every rank."""

    def _init_self_buffers(self, *, buffer_device: Optional[torch.device] = None) -> None:
        # torchtitan builds on the meta device and re-materialises with to_empty(): D starts at
        # zero (the paper's start), the accumulators empty.
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                self._buffers[name] = torch.zeros_like(buf, device=buffer_device or buf.device)


class DefaultMoE(MoE):
    """torchtitan's `MoE` with the Default MoE term and EMA defaults (see the module docstring)."""

    @dataclasses.dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        default_moe: dict = dataclasses.field(default_factory=dict)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        settings = check_settings(config.default_moe)
        router = config.router
        dim = router.gate.in_features
        gate = gate_form(router)
        self.moe_config = MoEConfig(
            hidden_size=dim,
            num_experts=config.num_experts,
            ffn_hidden_size=1,
            top_k=router.top_k,
            score_function=gate.score_function,
            normalize_topk=gate.renormalized,
            route_scale=gate.scale,
            aux_loss_coeff=0.0,
            **settings,
        )
        self._parallel_dims = None
        self._call: Dict[str, Any] = {}
        self.defaults: Optional[ExpertDefaults] = None
        if self.moe_config.router == "default":
            self.defaults = TitanExpertDefaults.from_config(self.moe_config, config.num_experts, dim, gate=gate)
            self.defaults.bind(self, self._reduction_group)
            self.router.register_forward_hook(self._router_out)
            self.routed_experts.inner_experts.register_forward_hook(self._experts_out)
            self.routed_experts.register_forward_hook(self._routed_out)

    def parallelize(self, parallel_dims) -> None:
        if parallel_dims.tp > 1 or parallel_dims.pp > 1:
            raise ValueError(
                f"Default MoE in torchtitan supports FSDP and expert parallelism; tensor parallel "
                f"({parallel_dims.tp}) and pipeline parallel ({parallel_dims.pp}) degrees > 1 are not "
                "built here"
            )
        self._parallel_dims = parallel_dims
        super().parallelize(parallel_dims)

    def _reduction_group(self):
        """The group torchtitan sums its expert-bias counts over (the `loss` mesh)."""
        if self._parallel_dims is not None:
            mesh = self._parallel_dims.get_optional_mesh("loss")
            return None if mesh is None else mesh.get_group()
        weight = self.router.gate.weight
        mesh = getattr(weight, "device_mesh", None)
        if mesh is not None:  # FSDP only: the data-parallel mesh the router is sharded over
            return (mesh if mesh.ndim == 1 else mesh._flatten()).get_group()
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def _local(self, t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def _router_out(self, module, args, out) -> None:
        _, ids_BLK, scores_BLE = out
        # A recompute (activation checkpointing) runs this again; it collects too, and only the
        # forward whose backward reaches the layer counts (the step contract).
        self._call = {
            "fwd": self.defaults.begin_forward(self.training, "torchtitan DefaultMoE"),
            "ids": self._local(ids_BLK),
            "scores": self._local(scores_BLE),
        }

    def _experts_out(self, module, args, y_RD) -> Optional[torch.Tensor]:
        fwd = self._call.get("fwd")
        if fwd is None or not fwd.collect:
            return
        counts_e = args[1].reshape(-1).to(torch.long)
        e = counts_e.numel()
        first = self._ep_rank() * e
        # Each row's expert from the cumulative counts, on the device (no host sync): rows past the
        # last count are torchtitan's padding and are masked out of the statistics.
        R = y_RD.shape[0]
        local_R = torch.bucketize(torch.arange(R, device=y_RD.device), counts_e.cumsum(0), right=True)
        keep_R = local_R < e
        expert_R = first + local_R.clamp_max(e - 1)
        # Returned: under torch.compile the statistics ride on the experts' output (no hook, no break).
        return self.defaults.observe_rows(
            fwd, y_RD, expert_R, torch.ones(R, device=y_RD.device), keep_N=keep_R, anchor=y_RD, carrier=y_RD
        )

    def _ep_rank(self) -> int:
        pd = self._parallel_dims
        if pd is None or not pd.ep_enabled:
            return 0
        return pd.get_mesh("ep").get_local_rank()

    def _routed_out(self, module, args, out_BLD):
        call, self._call = self._call, {}
        scores_TE = call["scores"].reshape(-1, self.num_experts_total)
        ids_TK = call["ids"].reshape(scores_TE.shape[0], -1).long()
        out_local = self._local(out_BLD)
        routed_TD = out_local.reshape(-1, out_local.shape[-1])
        term_TD = self.defaults.default_term(call["fwd"], scores_TE, ran_mask(scores_TE.shape[1], ids_TK), routed_TD=routed_TD)
        result = (routed_TD + term_TD.to(routed_TD.dtype)).view(out_local.shape)
        if hasattr(out_BLD, "to_local"):
            from torch.distributed.tensor import DTensor

            return DTensor.from_local(result, out_BLD.device_mesh, out_BLD.placements, run_check=False)
        return result

    @property
    def num_experts_total(self) -> int:
        return self.moe_config.num_experts


@override(target=MoE.Config, description="Default MoE (default_moe.integrations.torchtitan)")
def default_moe(cfg: MoE.Config, **settings: Any) -> MoE.Config:
    """The torchtitan override: every MoE becomes a `DefaultMoE` with `settings` (router, beta,
    ema_stats_dtype, nonfinite, default_in_forward); `router="topk"` leaves the config as it is."""
    settings = check_settings(settings)
    # Validated here, at config time, with the layer's own sizes (before any process group).
    MoEConfig(
        hidden_size=cfg.router.gate.in_features,
        num_experts=cfg.num_experts,
        ffn_hidden_size=1,
        top_k=cfg.router.top_k,
        score_function=cfg.router.score_func,
        normalize_topk=bool(cfg.router.route_norm),
        route_scale=float(cfg.router.route_scale),
        aux_loss_coeff=0.0,
        **settings,
    )
    if settings.get("router", "default") == "topk":
        return cfg
    return derive(cfg, DefaultMoE.Config, default_moe=dict(settings))
