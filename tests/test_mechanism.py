"""The one Default MoE mechanism (issue 14): the recompute contract with interleaved forwards
(pipeline schedules), the rules, the score-function check, and that every adapter goes through
it (the default-term formula and the EMA update live in defaults.py alone)."""

import re
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

from default_moe import MoEConfig, MoELayer
from default_moe.defaults import ExpertDefaults, check_score_function, dense_softmax

ROOT = Path(__file__).resolve().parents[1]
E, D, F_, T, V = 8, 12, 20, 24, 30


def make(router="default", **kw):
    torch.manual_seed(0)
    kw.setdefault("top_k", 1 if router == "stablemoe" else 2)
    return MoELayer(MoEConfig(hidden_size=D, num_experts=E, ffn_hidden_size=F_, router=router, **kw))


def micro_batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(T, D, generator=g), torch.randn(T, D, generator=g), torch.randint(0, V, (T,), generator=g))
            for _ in range(n)]


def pipeline_run(layer, recompute, reentrant=True):
    """1F1B-like order: three forwards, then the three backwards oldest first. Returns per-backward grads."""
    outs = []
    for x, g, ids in micro_batches():
        xi = x.clone().requires_grad_(True)
        if recompute:
            y = torch.utils.checkpoint.checkpoint(lambda a, b=ids: layer(a, token_ids=b), xi, use_reentrant=reentrant)
        else:
            y = layer(xi, token_ids=ids)
        outs.append((xi, y, g))
    grads = []
    for xi, y, g in outs:
        layer.zero_grad(set_to_none=True)
        (y * g).sum().backward()
        grads.append({"x": xi.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}})
    return grads


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("router,kw", [
    ("default", {}),
    ("default", {"ema_sync": "async"}),
    ("default", {"capacity_factor": 0.75}),
    ("stablemoe", {"stablemoe": {"vocab_size": V, "stage2_step": 1}}),  # the stage boundary between forwards 1 and 2
])
def test_recompute_after_other_forwards_equals_no_recompute(router, kw, reentrant):
    plain, ckpt = make(router, **kw), make(router, **kw)
    ref = pipeline_run(plain, recompute=False)
    got = pipeline_run(ckpt, recompute=True, reentrant=reentrant)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=lambda m: f"micro-batch {i} {n}: {m}")
    if plain.defaults is not None:
        plain.defaults.finish_pending(), ckpt.defaults.finish_pending()
        assert torch.equal(plain.defaults.defaults_ED, ckpt.defaults.defaults_ED)
        assert plain.defaults.num_updates == ckpt.defaults.num_updates == 3
        assert len(ckpt.defaults._snapshots) == 0, "records outlived their backwards"


def test_eval_records_nothing_and_backward_frees_the_record():
    layer = make()
    layer.eval()
    layer(torch.randn(T, D))
    assert len(layer.defaults._snapshots) == 0 and layer.defaults.num_updates == 0
    layer.train()
    out = layer(torch.randn(T, D, requires_grad=True))
    assert len(layer.defaults._snapshots) == 1
    out.sum().backward()
    assert len(layer.defaults._snapshots) == 0 and layer.defaults.num_updates == 1


def test_score_function_check_and_dense_softmax():
    check_score_function("softmax", "x")
    with pytest.raises(ValueError, match="uses 'sigmoid'"):
        check_score_function("sigmoid", "AutoEP preset deepseek_v3")
    logits = torch.randn(4, E, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = dense_softmax(logits)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(4))


def test_the_formula_and_the_update_live_in_one_place():
    """grep: no adapter computes the default term or the EMA statistics/update itself."""
    pkg = ROOT / "plugin" / "default_moe"
    patterns = [r"@\s*D_\w+", r"\(1(\.0)? - \w*\.?beta\)", r"index_add_\(0,\s*expert", r"\.local_statistics\(",
                r"\.update\(stats", r"defaults_ED\.detach\(\)"]
    offenders = []
    for path in pkg.rglob("*.py"):
        if path.name == "defaults.py":
            continue
        # Code only: docstrings and comments may name the formula.
        text = re.sub(r'"""(?:.|\n)*?"""', "", path.read_text())
        text = re.sub(r"#.*", "", text)
        offenders += [f"{path.relative_to(pkg)}: {p}" for p in patterns if re.search(p, text)]
    assert not offenders, offenders


def test_the_core_layer_goes_through_the_mechanism():
    ExpertDefaults.callers.discard("MoELayer")
    make()(torch.randn(T, D))
    assert "MoELayer" in ExpertDefaults.callers
