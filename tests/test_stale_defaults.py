"""`stale_defaults` (what D of an expert that received no token does at a commit) and the
diagnostics of the collapse study (issue 27): the default term's share of the output and the part
of it from idle experts, checked against independent computations."""

import pytest
import torch

from default_moe import MoEConfig, MoELayer, diagnostics
from default_moe.defaults import ExpertDefaults
from default_moe.integrations import deepspeed as dm_ds

E, D, F_ = 8, 6, 10


def _reference_commits(beta, mode, D0, steps):
    """float64 reference of the EMA with stale handling: steps = [(sums [E, D], counts [E])]."""
    Dm = D0.double().clone()
    idle = torch.zeros(E, dtype=torch.long)
    for sums, counts in steps:
        new = Dm.clone()
        for i in range(E):
            if counts[i] > 0:
                new[i] = beta * Dm[i] + (1 - beta) * sums[i].double() / counts[i]
                idle[i] = 0
            else:
                idle[i] += 1
                if mode == "zero":
                    new[i] = beta * Dm[i]
                elif mode == "mean":
                    others = [Dm[j] for j in range(E) if j != i]
                    new[i] = beta * Dm[i] + (1 - beta) * sum(others) / len(others)
        Dm = new
    return Dm, idle


@pytest.mark.parametrize("mode", ["keep", "zero", "mean"])
def test_commit_matches_a_float64_reference(mode):
    g = torch.Generator().manual_seed(3)
    d = ExpertDefaults(E, D, 0.8, "mean", stale_defaults=mode)
    D0 = torch.randn(E, D, generator=g)
    d.defaults_ED.copy_(D0)
    steps = []
    for s in range(5):
        counts = torch.randint(0, 4, (E,), generator=g).float()
        counts[s % E] = 0  # at least one idle expert per step, a different one each time
        counts[7] = 0  # one expert idle throughout
        sums = torch.randn(E, D, generator=g) * counts[:, None]
        steps.append((sums, counts))
        d.commit(torch.cat([sums, counts[:, None]], dim=1))
    ref, idle = _reference_commits(0.8, mode, D0, steps)
    torch.testing.assert_close(d.defaults_ED.double(), ref, rtol=1e-5, atol=1e-6)
    assert d.idle_commits_E.tolist() == idle.tolist()
    assert d.idle_commits_E[7] == 5
    if mode == "keep":
        torch.testing.assert_close(d.defaults_ED[7], D0[7])
    if mode == "zero":
        torch.testing.assert_close(d.defaults_ED[7], D0[7] * 0.8**5)


def test_training_layer_decays_only_experts_without_tokens():
    """A real layer in a plain optimizer loop: 3 tokens, top-1 of 8 experts, so most experts are
    idle at every step; their D decays by beta (stale_defaults="zero") and the routed ones follow
    the EMA of their outputs."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, top_k=1, beta=0.7, stale_defaults="zero"))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.defaults.defaults_ED.normal_()
    decayed = 0
    for _ in range(4):
        x = torch.randn(3, D)
        before = layer.defaults.defaults_ED.clone()
        layer(x).pow(2).sum().backward()
        counts = layer.tokens_per_expert.clone()
        opt.step()  # the step pre-hook commits D
        opt.zero_grad()
        after = layer.defaults.defaults_ED
        idle = counts == 0
        decayed += int(idle.sum())
        torch.testing.assert_close(after[idle], 0.7 * before[idle])
        assert not torch.allclose(after[~idle], 0.7 * before[~idle])
    assert decayed >= 4 * (E - 3)


def test_state_dict_keys_unchanged_and_config_checked():
    layer = MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, stale_defaults="mean"))
    plain = MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_))
    assert set(layer.state_dict()) == set(plain.state_dict())  # the idle counter is not persistent
    layer.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=r"MoEConfig.stale_defaults must be one of \['keep', 'zero', 'mean'\]"):
        MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, stale_defaults="decay")
    section = dm_ds.DeepSpeedMoESection.from_ds_config({"default_moe": {"stale_defaults": "zero"}})
    assert section is not None


def _eval_out(layer, x, defaults_ED):
    kept = layer.defaults.defaults_ED.clone()
    layer.defaults.defaults_ED.copy_(defaults_ED)
    layer.eval()
    with torch.no_grad():
        y = layer(x).double()
    layer.defaults.defaults_ED.copy_(kept)
    return y


@pytest.mark.parametrize("normalize_topk", [False, True])
def test_default_term_share_matches_the_layer_output(normalize_topk):
    """default_share = ||y - y(D=0)|| / ||y|| and idle_share the same with only the idle experts'
    D, both from the layer's own eval forwards (an independent computation of the term)."""
    torch.manual_seed(1)
    layer = MoELayer(
        MoEConfig(
            hidden_size=D, num_experts=E, ffn_hidden_size=F_, top_k=2, normalize_topk=normalize_topk, default_in_forward=True
        )
    )
    layer.defaults.defaults_ED.normal_()
    layer.defaults.idle_commits_E.copy_(torch.tensor([0, 12, 0, 3, 40, 0, 10, 0]))
    x = torch.randn(16, D)
    layer.train()
    rep = diagnostics.default_term_share(layer, x)
    assert layer.training  # the probe's eval mode is undone
    assert rep["idle_experts"] == 3  # idle for >= 10 commits: experts 1, 4, 6
    Dfull = layer.defaults.defaults_ED.clone()
    y = _eval_out(layer, x, Dfull)
    y0 = _eval_out(layer, x, torch.zeros_like(Dfull))
    idle = torch.zeros(E, dtype=torch.bool)
    idle[[1, 4, 6]] = True
    y_idle = _eval_out(layer, x, Dfull * idle[:, None])
    assert rep["default_share"] == pytest.approx(((y - y0).norm() / y.norm()).item(), rel=1e-4)
    assert rep["idle_share"] == pytest.approx(((y_idle - y0).norm() / y.norm()).item(), rel=1e-4)
    assert (
        diagnostics.default_term_share(MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, router="topk")), x)
        is None
    )
