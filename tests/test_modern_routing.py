"""Today's routing in our layer (issue 23, part 1): sigmoid scores, the aux-loss-free expert bias
(selection only, updated once per optimizer step), group-limited selection, renormalised gates
times route_scale, shared experts (gated or not) — each against a float64 reference written out
with loops here, and the bias update against its formula."""

import pytest
import torch
import torch.nn.functional as F

from default_moe import MoEConfig, MoELayer
from reference import Weights, expert_mlp, load_into_layer

E, D, F_, T, FS = 8, 12, 16, 20, 10


def reference(x, w, cfg, bias, shared, D_ED=None):
    """float64: every expert for every token, selection by sorting per token."""
    logits = x @ w.router_ED.t()
    scores = torch.softmax(logits, -1) if cfg.score_function == "softmax" else torch.sigmoid(logits)
    select = scores.detach() + bias.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    allowed_groups = None
    chosen_all = []
    for t in range(x.shape[0]):
        experts = list(range(E))
        if cfg.num_expert_groups:
            size = E // cfg.num_expert_groups
            per = cfg.top_k // cfg.group_topk
            group_score = [
                sorted(select[t, g * size : (g + 1) * size].tolist(), reverse=True)[:per] for g in range(cfg.num_expert_groups)
            ]
            ranked = sorted(range(cfg.num_expert_groups), key=lambda g: -sum(group_score[g]))
            allowed_groups = ranked[: cfg.group_topk]
            experts = [e for e in experts if e // size in allowed_groups]
        chosen = sorted(experts, key=lambda e: -select[t, e].item())[: cfg.top_k]
        chosen_all.append(chosen)
        g = scores[t, chosen]
        if cfg.normalize_topk:
            g = g / g.sum()
        g = g * cfg.route_scale
        for gi, e in zip(g, chosen):
            out[t] = out[t] + gi * expert_mlp(x[t : t + 1], w.w1_EDF[e], w.w3_EDF[e], w.w2_EFD[e])[0]
        if D_ED is not None:  # docs/method.md, per gate form
            a = torch.exp(logits[t]) if cfg.score_function == "softmax" else torch.sigmoid(logits[t])
            renorm = cfg.normalize_topk
            wts = a / a.sum() if (renorm or cfg.score_function == "softmax") else a
            y_S = (
                out[t]
                if cfg.default_in_forward or (cfg.default_in_forward is None and cfg.score_function == "softmax")
                else out[t].detach()
            )
            term = torch.zeros_like(out[t])
            for e in range(E):
                if e not in chosen and (not renorm or bool(D_ED[e].ne(0).any())):
                    term = term + wts[e] * (cfg.route_scale * D_ED[e].double() - (y_S if renorm else 0))
            in_forward = cfg.default_in_forward if cfg.default_in_forward is not None else cfg.score_function == "softmax"
            out[t] = out[t] + (term if in_forward else term - term.detach())
    if shared is not None:
        a, b = (x @ shared["w13"]).chunk(2, -1)
        y = (F.silu(a) * b) @ shared["w2"]
        if shared.get("gate") is not None:
            y = y * torch.sigmoid(x @ shared["gate"])[:, None]
        out = out + y
    return out, chosen_all


CASES = {
    "deepseek_v3": dict(
        router="topk",
        top_k=4,
        score_function="sigmoid",
        normalize_topk=True,
        route_scale=2.5,
        expert_bias=True,
        num_expert_groups=4,
        group_topk=2,
        shared_expert_ffn_hidden_size=FS,
    ),
    "sigmoid_plain": dict(router="topk", top_k=2, score_function="sigmoid"),
    "softmax_groups_gated_shared": dict(
        router="topk", top_k=2, num_expert_groups=2, group_topk=1, shared_expert_ffn_hidden_size=FS, shared_expert_gate=True
    ),
    "default_deepseek_v3": dict(
        router="default",
        top_k=4,
        score_function="sigmoid",
        normalize_topk=True,
        route_scale=2.5,
        expert_bias=True,
        num_expert_groups=4,
        group_topk=2,
        shared_expert_ffn_hidden_size=FS,
    ),
    "default_deepseek_v3_in_forward": dict(
        router="default",
        top_k=4,
        score_function="sigmoid",
        normalize_topk=True,
        route_scale=2.5,
        expert_bias=True,
        num_expert_groups=4,
        group_topk=2,
        default_in_forward=True,
    ),
    "default_sigmoid_plain": dict(router="default", top_k=1, score_function="sigmoid", route_scale=1.5),
    "default_bias_scale_shared": dict(
        router="default",
        top_k=2,
        expert_bias=True,
        route_scale=1.5,
        normalize_topk=True,
        shared_expert_ffn_hidden_size=FS,
        aux_loss_coeff=0.0,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_modern_routing_matches_float64_reference(name):
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, **{"aux_loss_coeff": 0.0, **CASES[name]})
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    w = Weights.random(E, D, F_, True, seed=1)
    load_into_layer(layer, w)
    g = torch.Generator().manual_seed(2)
    if layer.router.expert_bias is not None:  # a nonzero bias that changes selections
        layer.router.expert_bias.expert_bias_E.copy_(torch.randn(E, generator=g) * 0.3)
    if layer.defaults is not None:  # two experts without a committed default (rows of zeros)
        layer.defaults.defaults_ED.copy_(torch.randn(E, D, generator=g) * (torch.arange(E) >= 2)[:, None])
    shared = None
    if layer.shared_experts is not None:
        se = layer.shared_experts
        shared = {
            "w13": se.w13_D2F.detach().double().requires_grad_(True),
            "w2": se.w2_FD.detach().double().requires_grad_(True),
            "gate": None if se.gate_D is None else se.gate_D.detach().double().requires_grad_(True),
        }
    x = torch.randn(T, D, generator=g)
    g_out = torch.randn(T, D, generator=g)
    xl = x.clone().requires_grad_(True)
    out = layer(xl)
    (out * g_out).sum().backward()
    wd = w.double()
    xd = x.double().requires_grad_(True)
    bias = layer.router.expert_bias.expert_bias_E if layer.router.expert_bias is not None else torch.zeros(E)
    D_ED = layer.defaults.defaults_ED if layer.defaults is not None else None
    ref, chosen = reference(xd, wd, cfg, bias, shared, D_ED)
    (ref * g_out.double()).sum().backward()
    close = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.double(), ref.detach(), **close)
    torch.testing.assert_close(xl.grad.double(), xd.grad, **close)
    torch.testing.assert_close(layer.router.weight.grad.double(), wd.router_ED.grad, **close)
    if shared is not None:
        torch.testing.assert_close(layer.shared_experts.w13_D2F.grad.double(), shared["w13"].grad, **close)
        if shared["gate"] is not None:
            torch.testing.assert_close(layer.shared_experts.gate_D.grad.double(), shared["gate"].grad, **close)
    # The bias moved selections (the test is not passing on unbiased routing).
    if layer.router.expert_bias is not None:
        assert set(map(tuple, chosen)) != set(map(tuple, reference(xd.detach(), wd, cfg, torch.zeros(E), None)[1]))


def test_expert_bias_updates_once_per_step_from_the_load():
    cfg = MoEConfig(
        hidden_size=D,
        num_experts=E,
        ffn_hidden_size=F_,
        router="topk",
        top_k=2,
        score_function="sigmoid",
        expert_bias=True,
        expert_bias_update_rate=0.01,
    )
    layer = MoELayer(cfg)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    bias = layer.router.expert_bias
    counts = torch.zeros(E)
    for _ in range(2):  # gradient accumulation: both micro-batches count, once
        x = torch.randn(T, D)
        layer(x).sum().backward()
        counts += layer.tokens_per_expert.float()
    assert torch.equal(bias.expert_bias_E, torch.zeros(E)) and bias.pending == 2
    with torch.no_grad():
        layer(torch.randn(4, D))  # a no-grad forward counts nothing
    opt.step()
    torch.testing.assert_close(bias.expert_bias_E, torch.sign(counts.mean() - counts) * 0.01)
    assert bias.pending == 0 and "router.expert_bias.expert_bias_E" in layer.state_dict()
    # Eval and no-backward forwards leave it alone at the next step too.
    layer.eval()
    layer(torch.randn(T, D))
    before = bias.expert_bias_E.clone()
    opt.step()
    assert torch.equal(bias.expert_bias_E, before)


def test_modern_routing_refusals():
    base = dict(hidden_size=D, num_experts=E, ffn_hidden_size=F_)
    with pytest.raises(ValueError, match="default_in_forward must be true, false or null"):
        MoEConfig(**base, router="default", score_function="sigmoid", default_in_forward="yes")
    with pytest.raises(ValueError, match="num_expert_groups and MoEConfig.group_topk are set together"):
        MoEConfig(**base, num_expert_groups=2)
    with pytest.raises(ValueError, match="divisible by MoEConfig.num_expert_groups"):
        MoEConfig(**base, num_expert_groups=3, group_topk=1)
    with pytest.raises(ValueError, match="chooses experts itself"):
        MoEConfig(**base, router="hash", expert_bias=True)
    with pytest.raises(ValueError, match="MoEConfig.score_function must be one of"):
        MoEConfig(**base, score_function="relu")
    with pytest.raises(ValueError, match="shared_expert_gate needs"):
        MoEConfig(**base, shared_expert_gate=True)


GATE_FORMS = {
    "softmax": dict(),
    "softmax_renormalised": dict(normalize_topk=True),
    "sigmoid": dict(score_function="sigmoid", route_scale=1.5),
    "sigmoid_renormalised_scaled": dict(score_function="sigmoid", normalize_topk=True, route_scale=2.5),
}


@pytest.mark.parametrize("in_forward", [True, False])
@pytest.mark.parametrize("capacity", [None, 0.5])
@pytest.mark.parametrize("form", list(GATE_FORMS))
def test_default_term_with_capacity_drops_is_the_float64_dense_mixture(form, capacity, in_forward):
    """Every gate form x dropless / capacity drops: the output is the float64 dense mixture
    s * sum_i w_i E^_i with E^_i = E_i(x) for the experts that ran, D_i for the ones that did not
    (unselected or dropped); for a renormalised gate an unselected expert without a committed D
    keeps the implicit default (E^_i = y_S / s). The router gradient (term in the forward or
    not) equals the derivation's. Issue 36: a dropped expert of a renormalised gate used to be
    treated as unselected (its w_d y_S subtracted: relative error 0.49 on tokens with a drop)."""
    from default_moe.dispatch import capacity_keep_mask

    cfg = MoEConfig(
        hidden_size=D,
        num_experts=E,
        ffn_hidden_size=F_,
        router="default",
        top_k=3,
        aux_loss_coeff=0.0,
        capacity_factor=capacity,
        default_in_forward=in_forward,
        **GATE_FORMS[form],
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    w = Weights.random(E, D, F_, True, seed=1)
    load_into_layer(layer, w)
    g = torch.Generator().manual_seed(2)
    layer.defaults.defaults_ED.copy_(torch.randn(E, D, generator=g) * (torch.arange(E) >= 2)[:, None])
    x = torch.randn(T, D, generator=g)
    g_out = torch.randn(T, D, generator=g)
    xl = x.clone().requires_grad_(True)
    out = layer(xl)
    (out * g_out).sum().backward()
    with torch.no_grad():
        route = layer.router(x, layer.groups, None)
        idx = route.idx_TK
        keep = capacity_keep_mask(idx, route.probs_TE.gather(1, idx), E, capacity, cfg.drop_policy)
    dropped = {(t, int(idx[t, k])) for t in range(T) for k in range(3) if keep is not None and not keep[t, k]}
    assert (len(dropped) > 0) == (capacity is not None)

    wd = w.double()
    xd = x.double().requires_grad_(True)
    D_ED = layer.defaults.defaults_ED.double()
    s, renorm, sig = cfg.route_scale, cfg.normalize_topk, cfg.score_function == "sigmoid"
    ref = torch.zeros(T, D, dtype=torch.float64)
    dense = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        logits = xd[t] @ wd.router_ED.t()
        a = torch.sigmoid(logits) if sig else torch.exp(logits)
        chosen = [int(e) for e in idx[t]]
        ran = [e for e in chosen if (t, e) not in dropped]
        gates = (a[chosen] / a[chosen].sum() if renorm else (a[chosen] if sig else a[chosen] / a.sum())) * s
        E_out = {e: expert_mlp(xd[t : t + 1], wd.w1_EDF[e], wd.w3_EDF[e], wd.w2_EFD[e])[0] for e in ran}
        y_S = sum((gi * E_out[e] for gi, e in zip(gates, chosen) if e in E_out), torch.zeros(D, dtype=torch.float64))
        wts = a / a.sum() if (renorm or not sig) else a
        has_D = [bool(D_ED[e].ne(0).any()) for e in range(E)]
        # The dense mixture, independently: every expert with its stand-in.
        with torch.no_grad():
            mix = torch.zeros(D, dtype=torch.float64)
            for e in range(E):
                if e in E_out:
                    mix += s * wts[e] * E_out[e]
                elif renorm and e not in chosen and not has_D[e]:
                    mix += wts[e] * y_S  # the implicit default y_S / s
                else:
                    mix += s * wts[e] * D_ED[e]
            dense[t] = mix
        # The derivation (docs/method.md), for the gradient: D part over the experts that did not
        # run, y_S part over the ones not selected.
        yd = y_S if in_forward else y_S.detach()
        zero = torch.zeros(D, dtype=torch.float64)
        term = sum((s * wts[e] * D_ED[e] for e in range(E) if e not in ran and (not renorm or has_D[e] or e in chosen)), zero)
        if renorm:
            term = term - sum(wts[e] for e in range(E) if e not in chosen and has_D[e]) * yd
        ref[t] = y_S + (term if in_forward else term - term.detach())
    (ref * g_out.double()).sum().backward()
    close = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(out.double(), (dense if in_forward else ref).detach(), **close)
    torch.testing.assert_close(ref.detach(), dense if in_forward else ref.detach(), **close)
    torch.testing.assert_close(layer.router.weight.grad.double(), wd.router_ED.grad, **close)
    torch.testing.assert_close(xl.grad.double(), xd.grad, **close)
