"""Single-process checks of MoELayer against the dense reference in reference.py."""

import copy

import pytest
import torch
import torch.utils.checkpoint

from default_moe import MoEConfig, MoELayer, commit_defaults
from reference import Weights, expert_grads, load_into_layer, reference_moe

E, D, F_, T = 8, 12, 20, 48


def make(router="default", seed=0, **kw):
    kw.setdefault("top_k", 2)
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, router=router, **kw)
    layer = MoELayer(cfg)
    w = Weights.random(E, D, F_, cfg.activation == "swiglu", seed)
    load_into_layer(layer, w)
    return layer, w


def inputs(seed=1, n=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def run_layer(layer, x, g_out):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * g_out).sum().backward()
    return out, x.grad


def run_ref(w, x, g_out, layer, **kw):
    cfg = layer.config
    wd = w.double()
    xd = x.double().requires_grad_(True)
    D0 = kw.pop("defaults", torch.zeros(E, D))
    res = reference_moe(
        xd,
        wd,
        top_k=cfg.top_k,
        use_defaults=cfg.router == "default",
        defaults_ED=D0,
        beta=cfg.beta,
        weighting=cfg.ema_weighting,
        normalize_topk=cfg.normalize_topk,
        aux_coeff=cfg.aux_loss_coeff,
        z_coeff=cfg.z_loss_coeff,
        capacity_factor=cfg.capacity_factor,
        drop_policy=cfg.drop_policy,
        score_function=cfg.score_function,
        route_scale=cfg.route_scale,
        default_in_forward=cfg.default_in_forward,
        **kw,
    )
    ((res.out_TD * g_out.double()).sum() + res.loss_aux).backward()
    return res, xd.grad, wd


def assert_close(a, b, what, rtol=2e-5, atol=2e-6):
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_grads(layer, wd):
    assert_close(layer.router.weight.grad, wd.router_ED.grad, "router grad")
    g = expert_grads(layer)
    assert_close(g["w1"], wd.w1_EDF.grad, "w1 grad")
    assert_close(g["w2"], wd.w2_EFD.grad, "w2 grad")
    if wd.w3_EDF is not None:
        assert_close(g["w3"], wd.w3_EDF.grad, "w3 grad")


@pytest.mark.parametrize(
    "router,kw",
    [
        ("topk", {}),
        ("default", {}),
        ("default", {"activation": "gelu", "top_k": 1}),
        ("default", {"ema_weighting": "prob", "beta": 0.5}),
        ("default", {"normalize_topk": True, "top_k": 3}),
        # The gate forms of docs/method.md: sigmoid (auto: term in the backward only), renormalised
        # (with route scale), and each with the term forced into or out of the forward.
        ("default", {"score_function": "sigmoid"}),
        ("default", {"score_function": "sigmoid", "default_in_forward": True, "route_scale": 0.5}),
        ("default", {"score_function": "sigmoid", "normalize_topk": True, "route_scale": 2.5, "top_k": 3}),
        ("default", {"score_function": "sigmoid", "normalize_topk": True, "default_in_forward": True, "top_k": 3}),
        ("default", {"normalize_topk": True, "default_in_forward": False, "route_scale": 1.5}),
        ("default", {"ema_stats_dtype": "bfloat16"}),
        ("topk", {"capacity_factor": 0.5}),
        ("default", {"capacity_factor": 0.75, "drop_policy": "position"}),
        ("default", {"aux_loss_coeff": 0.05, "z_loss_coeff": 0.01}),
        ("default", {"experts_backend": "grouped_mm"}),
        ("topk", {"experts_backend": "grouped_mm", "capacity_factor": 0.75}),
        ("default", {"experts_backend": "grouped_mm", "activation": "gelu", "top_k": 1}),
    ],
)
def test_matches_dense_reference_over_steps(router, kw, device):
    layer, w = make(router, **kw)
    layer.to(device)
    D_prev = torch.zeros(E, D)
    for step in range(3):
        x, g_out = inputs(seed=10 + step)
        layer.zero_grad(set_to_none=True)
        out, x_grad = run_layer(layer, x.to(device), g_out.to(device))
        commit_defaults(layer)  # the optimizer step
        res, xd_grad, wd = run_ref(w, x, g_out, layer, defaults=D_prev)
        assert_close(out.cpu(), res.out_TD, f"output step {step}")
        assert_close(x_grad.cpu(), xd_grad, f"input grad step {step}")
        check_grads(layer, wd)
        if layer.defaults is not None:
            tol = {"rtol": 1e-2, "atol": 1e-3} if kw.get("ema_stats_dtype") == "bfloat16" else {}
            assert_close(layer.defaults.defaults_ED, res.defaults_after_ED, f"defaults step {step}", **tol)
            D_prev = layer.defaults.defaults_ED.detach().cpu().clone() if tol else res.defaults_after_ED.float()
    if router == "default":
        assert layer.defaults.defaults_ED.abs().sum() > 0


@pytest.mark.parametrize("router", ["topk", "default"])
def test_gradient_reaching_unselected_probabilities(router):
    """d L / d pi_j for unselected j: exactly 0 for TopK, <dL/dy, D_j> for Default."""
    layer, w = make(router, aux_loss_coeff=0.0)
    if layer.defaults is not None:
        with torch.no_grad():
            layer.defaults.defaults_ED.normal_()
    captured = {}

    def keep_probs(module, args, out):
        out.probs_TE.retain_grad()
        captured["probs"], captured["idx"] = out.probs_TE, out.idx_TK

    layer.router.register_forward_hook(keep_probs)
    x, g_out = inputs()
    run_layer(layer, x, g_out)
    probs, idx = captured["probs"], captured["idx"]
    unselected = torch.ones_like(probs, dtype=torch.bool).scatter(1, idx, False)
    grad_unselected = probs.grad[unselected]
    if router == "topk":
        assert torch.equal(grad_unselected, torch.zeros_like(grad_unselected))
    else:
        expected_TE = g_out @ layer.defaults.defaults_ED.t()  # <dL/dy_t, D_j>
        torch.testing.assert_close(grad_unselected, expected_TE[unselected])
        assert grad_unselected.abs().min() > 0
    # The logits' gradient is dense in both (through the softmax normalisation).
    assert (layer.router.weight.grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_updates_defaults_once(reentrant):
    layer, w = make("default")
    twin = copy.deepcopy(layer)
    x, g_out = inputs()
    out_ref, xg_ref = run_layer(twin, x, g_out)

    xc = x.clone().requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(layer, xc, use_reentrant=reentrant)
    (out * g_out).sum().backward()
    assert layer.defaults.pending == 1 == twin.defaults.pending
    commit_defaults([layer, twin])
    assert layer.defaults.num_updates == 1 == twin.defaults.num_updates
    torch.testing.assert_close(layer.defaults.defaults_ED, twin.defaults.defaults_ED, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(xc.grad, xg_ref)
    torch.testing.assert_close(layer.router.weight.grad, twin.router.weight.grad)
    torch.testing.assert_close(layer.experts.w_in.grad, twin.experts.w_in.grad)


def test_eval_does_not_update_defaults_but_uses_them():
    layer, w = make("default")
    x, g_out = inputs()
    run_layer(layer, x, g_out)
    commit_defaults(layer)
    before = layer.defaults.defaults_ED.clone()
    layer.eval()
    with torch.no_grad():
        out = layer(x)
    assert layer.defaults.num_updates == 1
    assert torch.equal(layer.defaults.defaults_ED, before)
    res = reference_moe(x.double(), w.double(False), top_k=2, use_defaults=True, defaults_ED=before, training=False)
    assert_close(out, res.out_TD, "eval output")


def test_state_dict_round_trip_keeps_defaults():
    layer, _ = make("default")
    for s in range(3):
        x, g = inputs(seed=s)
        run_layer(layer, x, g)
        commit_defaults(layer)
    sd = layer.state_dict()
    assert "defaults.defaults_ED" in sd and sd["defaults.defaults_ED"].abs().sum() > 0
    assert "defaults.stats_ED1" not in sd  # the accumulator is not state
    assert layer.defaults.num_updates == 3
    fresh, _ = make("default", seed=99)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.defaults.defaults_ED, layer.defaults.defaults_ED)
    layer.eval(), fresh.eval()
    x, _ = inputs(seed=7)
    with torch.no_grad():
        assert torch.equal(layer(x), fresh(x))


def test_no_gradient_flows_into_defaults_buffer():
    layer, _ = make("default")
    assert not layer.defaults.defaults_ED.requires_grad
    assert "defaults.defaults_ED" not in dict(layer.named_parameters())


def test_zero_tokens_and_shapes():
    layer, _ = make("default")
    x = torch.zeros(0, D, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    commit_defaults(layer)
    assert out.shape == (0, D) and torch.isfinite(layer.router.weight.grad).all()
    assert layer.defaults.num_updates == 1 and layer.defaults.defaults_ED.abs().sum() == 0
    x3 = torch.randn(2, 3, 5, D)
    assert layer(x3).shape == x3.shape


def test_expert_with_no_tokens_keeps_its_default():
    layer, w = make("default", top_k=1)
    with torch.no_grad():
        layer.defaults.defaults_ED.fill_(1.0)
        layer.router.weight[E - 1, 0] = -50.0  # with x[:, 0] = 1 expert E-1 is never chosen
    x, g = inputs()
    x[:, 0] = 1.0
    run_layer(layer, x, g)
    commit_defaults(layer)
    assert layer.tokens_per_expert[E - 1] == 0
    assert torch.equal(layer.defaults.defaults_ED[E - 1], torch.ones(D))
    assert not torch.equal(layer.defaults.defaults_ED[0], torch.ones(D))


def test_bf16_autocast_keeps_router_fp32():
    layer, _ = make("default")
    seen = {}
    layer.router.register_forward_hook(lambda m, a, o: seen.update(dtype=o.probs_TE.dtype))
    x = torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert seen["dtype"] == torch.float32 and torch.isfinite(out.float()).all()
    lb = copy.deepcopy(layer).to(torch.bfloat16)
    xb = x.bfloat16().requires_grad_(True)
    outb = lb(xb)
    outb.float().sum().backward()
    assert outb.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    assert lb.defaults.defaults_ED.dtype == torch.float32  # the EMA stays fp32 under .to(bf16)


def test_aux_losses_are_applied_by_the_layer_and_logged():
    layer, w = make("topk", aux_loss_coeff=0.1, z_loss_coeff=0.01)
    x, g = inputs()
    out, _ = run_layer(layer, x, g)
    res, _, wd = run_ref(w, x, g, layer)
    logged = sum(layer.aux_losses.values())
    torch.testing.assert_close(logged.double(), res.loss_aux.detach(), rtol=1e-5, atol=1e-7)
    assert set(layer.aux_losses) == {"load_balancing", "z_loss"}
    # Same router gradient as the reference loss that includes the aux terms explicitly.
    assert_close(layer.router.weight.grad, wd.router_ED.grad, "router grad with aux")


def test_nonfinite_statistics_never_enter_the_defaults():
    layer, _ = make("default")
    d = layer.defaults
    with torch.no_grad():
        d.defaults_ED.fill_(2.0)
    stats = torch.ones(E, D + 1)
    stats[3, 0] = float("inf")
    stats[5, D] = float("nan")
    d.commit(stats)
    assert torch.equal(d.defaults_ED[3], torch.full((D,), 2.0)) and torch.equal(d.defaults_ED[5], torch.full((D,), 2.0))
    torch.testing.assert_close(d.defaults_ED[0], torch.full((D,), 0.9 * 2.0 + 0.1 * 1.0))
    assert int(d.nonfinite_skips) == 2 and torch.isfinite(d.defaults_ED).all()


def test_default_in_forward_false_is_topk_forward_with_default_gradient():
    """The ablation switch: the TopK forward bit for bit, and Default MoE's router gradient."""
    w = Weights.random(8, 12, 16, True, seed=3)
    D_ED = torch.randn(8, 12)
    layers = {}
    for name, kw in {
        "topk": dict(router="topk"),
        "default": dict(router="default"),
        "grad_only": dict(router="default", default_in_forward=False),
    }.items():
        layer = MoELayer(MoEConfig(hidden_size=12, num_experts=8, ffn_hidden_size=16, top_k=2, **kw))
        load_into_layer(layer, w)
        if layer.defaults is not None:
            layer.defaults.defaults_ED.copy_(D_ED)
        layer.eval()  # D as set: no EMA step in this forward
        layers[name] = layer
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    g = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    outs = {}
    for name, layer in layers.items():
        outs[name] = layer(x)
        (outs[name] * g).sum().backward()
    assert torch.equal(outs["grad_only"], outs["topk"])
    assert not torch.allclose(outs["default"], outs["topk"])
    torch.testing.assert_close(layers["grad_only"].router.weight.grad, layers["default"].router.weight.grad)
    assert not torch.allclose(layers["grad_only"].router.weight.grad, layers["topk"].router.weight.grad)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("router", ["topk", "default"])
def test_bf16_matches_dense_reference(router, backend, device):
    """bf16 parameters and activations (router probabilities and D stay fp32) against the float64
    reference of the bf16-rounded weights and inputs; sizes 16-byte aligned for grouped_mm."""
    d, f = 16, 32
    cfg = MoEConfig(hidden_size=d, num_experts=E, ffn_hidden_size=f, router=router, experts_backend=backend)
    layer = MoELayer(cfg)
    w = Weights.random(E, d, f, True, 3)
    w = Weights(*(t.bfloat16().float() for t in (w.router_ED, w.w1_EDF, w.w3_EDF, w.w2_EFD)))
    load_into_layer(layer, w)
    layer.to(device=device, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    x, g_out = (torch.randn(T, d, generator=g).bfloat16().float() for _ in range(2))
    out, x_grad = run_layer(layer, x.to(device, torch.bfloat16), g_out.to(device, torch.bfloat16))
    res, xd_grad, wd = run_ref(w, x, g_out, layer, defaults=torch.zeros(E, d))
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), res.out_TD, "bf16 output", rtol=3e-2, atol=3e-2 * res.out_TD.abs().max().item())
    assert_close(x_grad.float(), xd_grad, "bf16 input grad", rtol=3e-2, atol=3e-2 * xd_grad.abs().max().item())
    commit_defaults(layer)
    if layer.defaults is not None:
        assert layer.defaults.defaults_ED.dtype == torch.float32
        assert_close(
            layer.defaults.defaults_ED,
            res.defaults_after_ED,
            "bf16 defaults",
            rtol=3e-2,
            atol=3e-2 * res.defaults_after_ED.abs().max().item(),
        )


def test_grouped_mm_refuses_unaligned_sizes():
    layer, _ = make("topk", experts_backend="grouped_mm")  # D=12, F=20: 24 / 40 bytes in bf16
    layer.to(torch.bfloat16)
    with pytest.raises(ValueError, match="experts_backend='grouped_mm' needs hidden_size and ffn_hidden_size"):
        layer(torch.randn(4, D, dtype=torch.bfloat16))
