"""Routing diagnostics, for every router, cheap enough to run every N steps.

- `expert_load`: tokens per expert over the DP group, max/mean overload, dropped slots.
- `router_gradient_fidelity`: cosine between the router's gradient and the gradient a dense
  oracle would give (every expert computed for the same tokens, y = sum_i pi_i E_i(x)), for the
  same upstream gradient: the analysis of the Default MoE paper (Fig. 4), on demand. The oracle
  runs through the layer's own dispatch with all E experts per token, so it works at any EP size
  (all ranks must call it together).
- `routing_fluctuation`: fraction of a fixed probe set of tokens whose (deterministic, eval-mode)
  top-1 expert changed since the last snapshot (StableMoE's metric, online form).
- `defaults_report`: norms of the EMA default vectors and their distance from the last batch means.
- `default_term_share`: the default term's share of the layer's output on a probe batch, and the
  part of it from experts that have received no token for a while (idle experts).
- `count_host_syncs`: counts the calls that make the host wait for the device (on CUDA), for
  tests and benchmarks that hold the layer to one per forward.

Legend: T tokens, E experts, K top-k, D hidden.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from default_moe import comm
from default_moe.defaults import ran_mask
from default_moe.layer import MoELayer
from default_moe.layer_utils import frozen_state
from default_moe.losses import AuxLossAutoScaler


def expert_load(layer: MoELayer) -> Dict[str, object]:
    """Load of the last forward, summed over the layer's DP group."""
    counts_E = layer.tokens_per_expert.to(torch.float64).clone()
    dropped = torch.tensor([float(layer.dropped_slots)], dtype=torch.float64, device=counts_E.device)
    if comm.group_size(layer.groups.dp_group) > 1:
        comm.all_reduce(counts_E, layer.groups.dp_group)
        comm.all_reduce(dropped, layer.groups.dp_group)
    mean = counts_E.mean().clamp_min(1e-12)
    return {
        "tokens_per_expert": counts_E.tolist(),
        "max_over_mean": (counts_E.max() / mean).item(),
        "min_over_mean": (counts_E.min() / mean).item(),
        "dropped_slots": int(dropped.item()),
    }


@contextlib.contextmanager
def _side_effect_free(layer: MoELayer):
    """Runs the layer's training forwards without changing any state: no EMA update, no pending
    update applied, no accumulation, no counters or StableMoE step (`frozen_state`), and the
    aux-loss scale restored. The forward uses D as it stands (an async update still in flight
    stays in flight), and the random generators are restored."""
    scale = AuxLossAutoScaler.main_loss_backward_scale
    AuxLossAutoScaler.set_loss_scale(0.0)  # the fidelity is about the task gradient only
    device = layer.experts.w2_LFD.device
    # Random routing (SparseMixer's sampling) must not advance the training run's generators.
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with frozen_state(), torch.random.fork_rng(devices=devices):
            yield
    finally:
        AuxLossAutoScaler.set_loss_scale(scale)


def dense_oracle(layer: MoELayer, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = sum_i pi_i E_i(x) with pi the router's fp32 probabilities over all experts."""
    route = layer.router(x_TD, layer.groups, token_ids_T)
    T, E = route.probs_TE.shape
    idx_TE = torch.arange(E, device=x_TD.device).expand(T, E).contiguous()
    x_local, plan = layer.dispatcher.dispatch(x_TD, idx_TE, None)
    y_TED = layer.dispatcher.combine(layer.experts(x_local, plan.tokens_per_local_expert, plan.counts_L), plan)
    return (y_TED * route.probs_TE.unsqueeze(-1).to(y_TED.dtype)).sum(1)


def router_gradient_fidelity(
    layer: MoELayer,
    x: torch.Tensor,
    token_ids: Optional[torch.Tensor] = None,
    grad_out: Optional[torch.Tensor] = None,
    seed: int = 0,
) -> Optional[float]:
    """Cosine between d<g, layer(x)>/dW_router and d<g, oracle(x)>/dW_router (summed over DP);
    None for routers without a differentiable distribution over experts (hash, StableMoE).

    Args:
        layer: the MoE layer (its state is left exactly as it was, in every EMA mode).
        x: [..., D] sample hidden states.
        token_ids: token ids for routers that need them.
        grad_out: upstream gradient g (default: standard normal with `seed`, same shape as x).
    """
    x_TD = x.detach().reshape(-1, x.shape[-1])
    ids_T = token_ids.reshape(-1) if token_ids is not None else None
    if grad_out is None:
        g = torch.Generator(device="cpu").manual_seed(seed)
        grad_out = torch.randn(x_TD.shape, generator=g).to(x_TD)
    g_TD = grad_out.reshape(x_TD.shape)
    params = [p for p in layer.router.parameters() if p.requires_grad]
    with _side_effect_free(layer):
        oracle_TD = dense_oracle(layer, x_TD, ids_T) if params else None
        if oracle_TD is None or not oracle_TD.requires_grad:
            return None  # no probability distribution to differentiate (hash; StableMoE's one-hot routing)
        oracle = torch.autograd.grad((oracle_TD * g_TD).sum(), params, allow_unused=True)
        if all(t is None for t in oracle):
            # The router's probabilities are not differentiable (SparseMixer v2's masked softmax,
            # StableMoE's frozen stage 2): there is no dense gradient to compare with.
            return None
        actual = torch.autograd.grad((layer(x_TD, token_ids=ids_T) * g_TD).sum(), params, allow_unused=True)
    a = torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(actual, params)])
    o = torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(oracle, params)])
    if comm.group_size(layer.groups.dp_group) > 1:
        both = torch.stack([a, o]).double()
        comm.all_reduce(both, layer.groups.dp_group)
        a, o = both[0], both[1]
    return torch.nn.functional.cosine_similarity(a.double(), o.double(), dim=0).item()


def routing_fluctuation(
    layer: MoELayer, probe_x: torch.Tensor, probe_ids: Optional[torch.Tensor], previous: Optional[torch.Tensor]
) -> Tuple[Optional[float], torch.Tensor]:
    """(fraction of probe tokens whose eval-mode top-1 expert changed since `previous`, new snapshot)."""
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            x_TD = probe_x.reshape(-1, probe_x.shape[-1])
            route = layer.router(x_TD, layer.groups, probe_ids.reshape(-1) if probe_ids is not None else None)
    finally:
        layer.train(was_training)
    idx_T = route.idx_TK[:, 0].detach().clone()
    if previous is None:
        return None, idx_T
    changed = (idx_T != previous).double().sum().reshape(1)
    total = torch.tensor([float(idx_T.numel())], dtype=torch.float64, device=idx_T.device)
    stats = torch.cat([changed, total])
    if comm.group_size(layer.groups.dp_group) > 1:
        comm.all_reduce(stats, layer.groups.dp_group)
    return (stats[0] / stats[1].clamp_min(1)).item(), idx_T


def defaults_report(layer: MoELayer) -> Optional[Dict[str, float]]:
    """Mean/max norm of the default vectors, and mean distance to the last batch means."""
    d = layer.defaults
    if d is None:
        return None
    norms = d.defaults_ED.norm(dim=1)
    out = {"norm_mean": norms.mean().item(), "norm_max": norms.max().item()}
    if d.last_batch_mean_ED is not None and bool(d.last_seen_E.any()):
        dist_E = (d.defaults_ED - d.last_batch_mean_ED).norm(dim=1)[d.last_seen_E]
        out["distance_to_batch_mean"] = dist_E.mean().item()
    return out


def default_term_share(
    layer: MoELayer, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None, idle_after: int = 10
) -> Optional[Dict[str, float]]:
    """How much of the layer's output the default term makes, on a probe batch (eval routing).

    Returns None for a layer without defaults, else:
        default_share: ||default term||_F / ||routed output + default term||_F (the shared
            experts left out), as the forward computes it whether or not the term is in the
            forward (`default_in_forward=False` layers report what it would be).
        idle_share: the part of the term from experts that received no token at the last
            `idle_after` commits, over the same denominator.
        idle_experts: how many experts that is.
    """
    d = layer.defaults
    if d is None:
        return None
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            x_TD = x.detach().reshape(-1, x.shape[-1])
            route = layer.router(x_TD, layer.groups, token_ids.reshape(-1) if token_ids is not None else None)
            x_local, plan = layer.dispatcher.dispatch(x_TD, route.idx_TK, None)
            y_TKD = layer.dispatcher.combine(layer.experts(x_local, plan.tokens_per_local_expert, plan.counts_L), plan)
            routed_TD = (y_TKD * route.gates_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(1).float()
            if route.output_scale_D is not None:
                routed_TD = routed_TD * route.output_scale_D.float()
            ran_TE = ran_mask(layer.config.num_experts, route.idx_TK)
            idle_E = d.idle_commits_E >= idle_after
            term_TD = d.term(route.probs_TE, ran_TE, routed_TD)
            idle_TD = d.term(route.probs_TE, ran_TE, routed_TD, only_E=idle_E)
            norms = torch.stack([term_TD.norm(), idle_TD.norm(), (routed_TD + term_TD).norm()]).double()
    finally:
        layer.train(was_training)
    denom = norms[2].clamp_min(1e-30)
    return {
        "default_share": (norms[0] / denom).item(),
        "idle_share": (norms[1] / denom).item(),
        "idle_experts": int(idle_E.sum().item()),
    }


# Calls that wait for the device on CUDA: reading values on the host, or ops whose output size
# depends on the data.
_SYNC_METHODS = {
    "item",
    "tolist",
    "__int__",
    "__bool__",
    "__float__",
    "__index__",
    "cpu",
    "numpy",
    "bincount",
    "nonzero",
    "unique",
    "unique_consecutive",
    "masked_select",
    "argwhere",
}


class HostSyncCounter(TorchFunctionMode):
    """Counts host syncs of PyTorch calls made from Python (see `count_host_syncs`).

    Attributes:
        calls: the names of the counted calls, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[str] = []

    @property
    def count(self) -> int:
        return len(self.calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_METHODS:
            self.calls.append(name)
        elif (
            name == "repeat_interleave"
            and kwargs.get("output_size") is None
            and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
        ):
            self.calls.append("repeat_interleave without output_size")
        elif name in ("__getitem__", "__setitem__") and _has_bool_mask(args[1] if len(args) > 1 else None):
            self.calls.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """Counts, inside the block, the calls that make the host wait for a CUDA device: `.item()`,
    `.tolist()`, `int()/bool()/float()` of a tensor, `bincount`, `nonzero`, `unique`, boolean-mask
    indexing, `repeat_interleave` without `output_size`, `.cpu()`. Counted on any device (a CPU
    run counts what a GPU run would wait for). Ops inside autograd's C++ backward are not seen
    (none of them sync); Python autograd Functions' backward code is.
    """
    with HostSyncCounter() as counter:
        yield counter
