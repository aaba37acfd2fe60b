"""Per-rank bodies of the Megatron layout tests: D and the layer output in each parallel layout
megatron users run (TP with SP, expert-TP, EP, CP, PP, DP and their products) against a float64
dense reference built from the gathered weights and tokens of the whole pipeline stage; D
bit-identical on every rank of the stage."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import megatron_cpu
from default_moe import commit_defaults

H, E, K, FFN, S, B, BETA = 16, 4, 2, 32, 8, 2, 0.6

LAYOUTS_2 = [
    dict(name="DP2"),
    dict(name="EP2", ep=2),
    dict(name="TP2+SP, expert-TP 2", tp=2, etp=2),
    dict(name="TP2+SP, expert-TP 1", tp=2, etp=1),
    dict(name="CP2", cp=2),
    dict(name="PP2", pp=2),
]
LAYOUTS_4 = [
    dict(name="TP2+SP x EP2 (expert-TP 1, EP folded over TP)", tp=2, ep=2, etp=1),
    dict(name="TP2+SP x DP2, EP2 x expert-TP 2", tp=2, ep=2, etp=2),
    dict(name="TP2+SP x DP2, expert-TP 2 x expert-DP 2", tp=2, etp=2),
    dict(name="CP2 x EP2", cp=2, ep=2),
    dict(name="PP2 x EP2", pp=2, ep=2),
    dict(name="PP2 x TP2+SP (expert-TP 2)", pp=2, tp=2, etp=2),
]


def _layer(layout, weighting):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from default_moe.integrations import megatron as dm
    from default_moe.integrations import megatron_compat as compat

    tp, pp, cp, ep, etp = (layout.get(k, 1) for k in ("tp", "pp", "cp", "ep", "etp"))
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(123)
    config = TransformerConfig(
        num_layers=pp,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_router_topk=K,
        moe_ffn_hidden_size=FFN,
        ffn_hidden_size=FFN,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        add_bias_linear=False,
        init_method_std=0.3,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1,
        pipeline_dtype=torch.float32,
    )
    spec = dm.patch_spec(get_gpt_layer_local_spec(num_experts=E), router="default", beta=BETA, ema_weighting=weighting)
    layer = compat.build_moe_layer(spec.submodules.mlp, config)
    layer.train()
    return layer


def _gather(obj, group):
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_layout(layout, weighting):
    from megatron.core import parallel_state

    layer = _layer(layout, weighting)
    stage = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(S, B, H, generator=g)
    with torch.no_grad():  # the same nonzero start on every rank
        D0 = torch.randn(E, H, generator=torch.Generator().manual_seed(7)) * 0.5
        layer.defaults.defaults_ED.copy_(D0)
    out, _ = layer(x)
    out.sum().backward()  # statistics count when the backward reaches the layer
    assert torch.equal(layer.defaults.defaults_ED, D0)
    commit_defaults(layer)  # the step: one all-reduce over the stage
    etp_rank = layer.token_dispatcher.tp_rank
    experts = {
        int(e): (etp_rank, m.linear_fc1.weight.detach().clone(), m.linear_fc2.weight.detach().clone())
        for e, m in zip(layer.local_expert_indices, layer.experts.local_experts)
    }
    mine = dict(
        x=x.reshape(-1, H).clone(),
        W=layer.router.weight.detach().clone(),
        out=out.detach().reshape(-1, H).clone(),
        D=layer.defaults.defaults_ED.clone(),
        experts=experts,
    )
    everyone = _gather(mine, stage)

    # Full expert weights: expert-TP shards of fc1 (output rows) and fc2 (input columns), in rank order.
    shards = {}
    for r in everyone:
        for e, (t, w1, w2) in r["experts"].items():
            shards.setdefault(e, {})[t] = (w1, w2)
    assert sorted(shards) == list(range(E)), f"{layout['name']}: experts held in the stage: {sorted(shards)}"
    fc1 = [torch.cat([shards[e][t][0] for t in sorted(shards[e])], 0).double() for e in range(E)]
    fc2 = [torch.cat([shards[e][t][1] for t in sorted(shards[e])], 1).double() for e in range(E)]

    # Reference over the stage's tokens (each rank's tokens with that rank's router weight).
    probs, chosen, raw = [], [], []
    for r in everyone:
        X = r["x"].double()
        p = torch.softmax(X @ r["W"].double().t(), -1)
        probs.append(p)
        chosen.append(torch.zeros_like(p, dtype=torch.bool).scatter(1, torch.topk(p, K, -1).indices, True))
        raw.append(torch.stack([F.gelu(X @ fc1[e].t()) @ fc2[e].t() for e in range(E)]))  # [E, T, H]
    P, C, Y = torch.cat(probs), torch.cat(chosen), torch.cat(raw, 1)
    w = (P if weighting == "prob" else torch.ones_like(P)) * C  # [T, E]
    mean = torch.einsum("te,eth->eh", w, Y) / w.sum(0).clamp_min(1e-30)[:, None]
    D_ref = torch.where(w.sum(0)[:, None] > 0, BETA * D0.double() + (1 - BETA) * mean, D0.double())
    me = dist.get_rank(stage)
    p, c, y = probs[me], chosen[me], raw[me]
    out_ref = ((p * c).t()[:, :, None] * y).sum(0) + (p * ~c) @ D0.double()  # the committed D

    what = f"{layout['name']} (weighting {weighting})"
    torch.testing.assert_close(layer.defaults.defaults_ED.double(), D_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: D {m}")
    torch.testing.assert_close(
        out.detach().reshape(-1, H).double(), out_ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: output {m}"
    )
    for r in everyone:
        assert torch.equal(r["D"], everyone[0]["D"]), f"{what}: D differs between ranks of the stage"


def all_layouts(rank, world, layouts):
    megatron_cpu.apply()
    for layout in layouts:
        for weighting in ("mean", "prob"):
            check_layout(layout, weighting)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
