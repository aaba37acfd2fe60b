"""SparseMixer, StableMoE and hash routers, and the diagnostics, against hand-derived references."""

import copy

import pytest
import torch
import torch.nn.functional as F

from default_moe import commit_defaults, MoEConfig, MoELayer, diagnostics
from default_moe.parallel import ParallelGroups
from default_moe.routing.hash import hash_experts
from default_moe.routing.sparsemixer import jitter_mask

E, D = 6, 10
SINGLE = ParallelGroups.single()


def router_of(router, **kw):
    kw.setdefault("top_k", 1)
    cfg = MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=16, router=router, aux_loss_coeff=0.0, init_std=1.0, **kw)
    return MoELayer(cfg).router


def test_jitter_mask_formula():
    z = torch.tensor([[2.0, 1.9, 1.0, -3.0]])
    # (2 - z_i) / max(|z_i|, 2) > 2 * 0.1: 1.9 -> 0.05 kept; 1.0 -> 0.5 masked; -3 -> 5/3 masked
    assert jitter_mask(z, 0.1).tolist() == [[False, False, True, True]]


def test_sparsemixer_v1_forward_and_backward():
    r = router_of("sparsemixer", sparsemixer={"jitter_eps": 0.5})
    r.train()
    r.generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    out = r(x, SINGLE)
    c = torch.randn(64, generator=torch.Generator().manual_seed(2))
    (out.gates_TK[:, 0] * c).sum().backward()
    # Hand-derived: p = masked softmax, m = p_D, forward m or m/2, dL/dz_j = 2 c m (delta_jD - p_j).
    with torch.no_grad():
        z = x @ r.weight.t()
        p = torch.softmax(z.masked_fill(jitter_mask(z, 0.5), float("-inf")), -1)
        D_ = out.idx_TK[:, 0]
        m = p.gather(1, D_[:, None])[:, 0]
        half = torch.isclose(out.gates_TK[:, 0], m / 2)
        full = torch.isclose(out.gates_TK[:, 0], m)
        assert (half | full).all() and half.any() and full.any()
        assert full[D_ == z.argmax(-1)].all()  # the argmax sample always takes the Euler branch
        dz = 2 * (c * m)[:, None] * (F.one_hot(D_, E) - p)
        torch.testing.assert_close(r.weight.grad, dz.t() @ x, rtol=1e-4, atol=1e-5)
    assert out.output_scale_D is r.omega and r.omega.shape == (D,)
    r.eval()
    ev = r(x, SINGLE)
    assert torch.equal(ev.idx_TK[:, 0], z.argmax(-1))
    torch.testing.assert_close(ev.gates_TK[:, 0], p.gather(1, z.argmax(-1)[:, None])[:, 0])


def test_sparsemixer_v2_custom_backward():
    r = router_of("sparsemixer", top_k=2)  # auto -> v2, eps 0.01
    assert (r.version, r.eps) == ("v2", 0.01)
    r.train()
    r.generator = torch.Generator().manual_seed(3)
    x = torch.randn(80, D, generator=torch.Generator().manual_seed(4))
    out = r(x, SINGLE)
    c = torch.randn(80, 2, generator=torch.Generator().manual_seed(5))
    (out.gates_TK * c).sum().backward()
    with torch.no_grad():
        z = x @ r.weight.t()
        p1 = torch.softmax(z.masked_fill(jitter_mask(z, 0.01), float("-inf")), -1)
        d1, d2 = out.idx_TK[:, 0], out.idx_TK[:, 1]
        z2 = z.scatter(1, d1[:, None], float("-inf"))
        p2 = torch.softmax(z2.masked_fill(jitter_mask(z2, 0.01), float("-inf")), -1)
        m1, m2 = p1.gather(1, d1[:, None])[:, 0], p2.gather(1, d2[:, None])[:, 0]
        s1, s2 = out.gates_TK[:, 0] / m1, out.gates_TK[:, 1] / m2
        for s in (s1, s2):  # the Heun scale: 1 or 1/3
            assert (torch.isclose(s, torch.ones_like(s)) | torch.isclose(s, torch.full_like(s, 1 / 3))).all()
        assert (d1 != d2).all()
        dz = (c[:, :1] * m1[:, None]) * (F.one_hot(d1, E) - p1) + (c[:, 1:] * m2[:, None]) * (F.one_hot(d2, E) - p2)
        torch.testing.assert_close(r.weight.grad, dz.t() @ x, rtol=1e-4, atol=1e-5)
    r.eval()
    ev = r(x, SINGLE)
    top2 = torch.topk(z, 2, -1).indices
    assert torch.equal(ev.idx_TK, top2)
    with pytest.raises(ValueError, match="top_k must be 1 for SparseMixer v1"):
        router_of("sparsemixer", top_k=2, sparsemixer={"version": "v1"})


def test_sparsemixer_degenerate_case_is_exact():
    """One expert left after masking: p_D = 1, the gradient is exactly 0, as the dense one."""
    r = router_of("sparsemixer", sparsemixer={"jitter_eps": 0.0})
    with torch.no_grad():
        r.weight.zero_()
        r.weight[0, 0] = 10.0
    x = torch.zeros(5, D)
    x[:, 0] = 1.0
    r.train()
    out = r(x, SINGLE)
    out.gates_TK.sum().backward()
    assert (out.idx_TK == 0).all() and torch.allclose(out.gates_TK, torch.ones(5, 1))
    assert r.weight.grad.abs().max() == 0


def test_sparsemixer_expected_gradient_closer_to_dense_than_switch():
    """Toy problem: average many sampled SparseMixer v1 router gradients and compare with the dense
    gradient of y = sum_i p_i E_i(x), against the straight-through Switch (TopK top-1) gradient."""
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            hidden_size=D,
            num_experts=4,
            ffn_hidden_size=16,
            top_k=1,
            router="sparsemixer",
            aux_loss_coeff=0.0,
            init_std=0.5,
            sparsemixer={"jitter_eps": 0.9},
        )
    )
    layer.train()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(7))
    g = torch.randn(16, D, generator=torch.Generator().manual_seed(8))
    W = layer.router.weight
    # The dense target over the experts SparseMixer can sample (its masked softmax).
    dense = torch.autograd.grad((diagnostics.dense_oracle(layer, x) * g).sum(), W)[0]
    assert dense.abs().sum() > 0
    total = torch.zeros_like(W)
    layer.router.generator = torch.Generator().manual_seed(9)
    n = 600
    for _ in range(n):
        total += torch.autograd.grad((layer(x) * g).sum(), W)[0]
    sparsemixer = total / n
    switch = copy.deepcopy(layer)
    switch.reconfigure(MoEConfig(**{**layer.config.to_dict(), "router": "topk"}))
    st = torch.autograd.grad((switch(x) * g).sum(), switch.router.weight)[0]
    cos = lambda a, b: F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0).item()  # noqa: E731
    assert cos(sparsemixer, dense) > cos(st, dense) + 0.05, (cos(sparsemixer, dense), cos(st, dense))


def stable_layer(stage2=5, **kw):
    torch.manual_seed(0)
    return MoELayer(
        MoEConfig(
            hidden_size=D,
            num_experts=4,
            ffn_hidden_size=16,
            top_k=1,
            router="stablemoe",
            stablemoe={"vocab_size": 50, "stage2_step": stage2, **kw},
        )
    )


def test_stablemoe_balance_loss_and_stages():
    layer = stable_layer(balance_coeff=0.3, distill_coeff=0.3)
    r = layer.router
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="needs the input token ids"):
        layer(x)
    out = r(x, SINGLE, ids)
    with torch.no_grad():
        s = x @ r.centroids_ED.t()
        a = s.argmax(-1)
        counts = torch.bincount(a, minlength=4).float()
        n_bar = 40 / 4
        ref = 0.3 * (((counts - n_bar) / n_bar)[a] * torch.sigmoid(s.gather(1, a[:, None])[:, 0])).sum() / 40
        ref_dis = 0.3 * F.cross_entropy(r.distilled_scores(ids), a)
    torch.testing.assert_close(out.aux_losses["stablemoe_balance"], ref)
    torch.testing.assert_close(out.aux_losses["stablemoe_distill"], ref_dis)
    assert torch.equal(out.idx_TK[:, 0], a)
    torch.testing.assert_close(out.gates_TK[:, 0], torch.sigmoid(s.gather(1, a[:, None])[:, 0]))


def test_stablemoe_distillation_and_frozen_stage2():
    ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(3))
    emb = torch.randn(50, D, generator=torch.Generator().manual_seed(4))  # token id -> hidden state

    def train_stage1(distill_coeff):
        layer = stable_layer(stage2=60, distill_coeff=distill_coeff)
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            (layer(emb[ids], token_ids=ids) ** 2).mean().backward()
            opt.step()
        r = layer.router
        with torch.no_grad():
            agree = (r.distilled_scores(ids).argmax(-1) == (emb[ids] @ r.centroids_ED.t()).argmax(-1)).float().mean()
        return layer, opt, agree.item()

    layer, opt, agree = train_stage1(0.3)
    _, _, control = train_stage1(0.0)  # same run without the distillation loss
    r = layer.router
    assert r.stage == 2 and agree > control + 0.3, (agree, control)
    probe = ids[:20]
    frozen = r(emb[probe], SINGLE, probe).idx_TK.clone()
    for _ in range(10):  # stage 2: backbone and gates train, routing of a fixed input never changes
        opt.zero_grad()
        out = layer(emb[ids] + 0.5 * torch.randn(64, D), token_ids=ids)
        assert not any(k.startswith("stablemoe") for k in layer.aux_losses)
        (out**2).mean().backward()
        opt.step()
        assert torch.equal(r(emb[probe], SINGLE, probe).idx_TK, frozen)
    # Resume keeps the stage.
    fresh = stable_layer(stage2=60)
    assert fresh.router.stage == 1
    fresh.load_state_dict(layer.state_dict())
    assert fresh.router.stage == 2
    layer.eval()  # inference uses the distilled router
    assert torch.equal(layer.router(emb[probe] * 0 + 1, SINGLE, probe).idx_TK, frozen)


def test_hash_routing_balanced_and_needs_ids():
    idx = hash_experts(torch.arange(8 * 1000), 8, 2)
    for k in range(2):
        assert torch.bincount(idx[:, k], minlength=8).tolist() == [1000] * 8
    assert (idx[:, 0] != idx[:, 1]).all()
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=8, ffn_hidden_size=16, top_k=2, router="hash"))
    assert list(layer.router.parameters()) == []
    with pytest.raises(ValueError, match="routes by token id"):
        layer(torch.randn(4, D))
    out = layer(torch.randn(4, D), token_ids=torch.arange(4))
    assert out.shape == (4, D)


def test_fidelity_is_one_when_all_experts_are_active():
    torch.manual_seed(0)
    for router in ("topk", "default"):
        layer = MoELayer(MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=16, top_k=4, router=router))
        x = torch.randn(12, D)
        before = {n: b.clone() for n, b in layer.named_buffers()}
        assert diagnostics.router_gradient_fidelity(layer, x) == pytest.approx(1.0, abs=1e-6)
        assert all(torch.equal(b, before[n]) for n, b in layer.named_buffers())  # no side effects
    sparse = MoELayer(MoEConfig(hidden_size=D, num_experts=8, ffn_hidden_size=16, top_k=1, router="topk"))
    assert diagnostics.router_gradient_fidelity(sparse, torch.randn(12, D)) < 0.999
    hashed = MoELayer(MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=16, top_k=1, router="hash"))
    assert diagnostics.router_gradient_fidelity(hashed, torch.randn(3, D), torch.arange(3)) is None


def test_fluctuation_load_and_defaults_report():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=16, top_k=1, router="default"))
    x = torch.randn(20, D)
    frac, snap = diagnostics.routing_fluctuation(layer, x, None, None)
    assert frac is None
    frac, snap2 = diagnostics.routing_fluctuation(layer, x, None, snap)
    assert frac == 0.0
    with torch.no_grad():
        layer.router.weight.neg_()  # flips the argmax of every token
    frac, _ = diagnostics.routing_fluctuation(layer, x, None, snap2)
    assert frac == 1.0
    layer(x).sum().backward()
    commit_defaults(layer)
    load = diagnostics.expert_load(layer)
    assert sum(load["tokens_per_expert"]) == 20 and load["dropped_slots"] == 0
    assert load["max_over_mean"] == pytest.approx(max(load["tokens_per_expert"]) / 5)
    rep = diagnostics.defaults_report(layer)
    # After one update from zeros with beta 0.9: D = 0.1 m, so |D - m| = 0.9 |m| = 9 |D|.
    assert rep["distance_to_batch_mean"] == pytest.approx(9 * rep["norm_mean"], rel=1e-4)
