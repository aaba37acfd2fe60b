"""Every HF MoE family converted by structure (issue 23, part 3): a tiny random model each, one
process. Per family: router "topk" is HF exactly; the family's entry in `hf.FAMILIES` matches its
router numerically (the model's own top-k weights are s * a_sel / Z); converted at D = 0 the model
computes what it did; and a converted block's output and router gradient equal a float64 dense
reference written here from the method's derivation (docs/method.md) — every expert computed by a
float64 copy of the family's own experts module — and D after the commit equals the float64 mean.
Save / load: a saved converted model comes back with its D and settings when converted again."""

import copy
import warnings

import pytest
import torch

tr = pytest.importorskip("transformers")

from default_moe import commit_defaults  # noqa: E402
from default_moe.integrations import hf  # noqa: E402

V, H, E, K = 64, 16, 4, 2
BASE = dict(
    vocab_size=V,
    hidden_size=H,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    num_experts_per_tok=K,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
LINEAR = dict(
    layer_types=["linear_attention", "full_attention"],
    linear_num_value_heads=2,
    linear_num_key_heads=1,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    head_dim=8,
)
MLA = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, num_key_value_heads=2)
# name: (model class, config class, config kwargs, (score, renormalised, scale) as the test reads the family)
SPECS = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(intermediate_size=8, num_local_experts=E), ("softmax", True, 1.0)),
    "qwen3_next": (
        "Qwen3NextForCausalLM",
        "Qwen3NextConfig",
        dict(
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
            intermediate_size=32,
            num_experts=E,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            **LINEAR,
        ),
        ("softmax", True, 1.0),
    ),
    "qwen3_5_moe": (
        "Qwen3_5MoeForCausalLM",
        "Qwen3_5MoeTextConfig",
        dict(moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=E, **LINEAR),
        ("softmax", True, 1.0),
    ),
    "flex_olmo": (
        "FlexOlmoForCausalLM",
        "FlexOlmoConfig",
        dict(intermediate_size=8, num_experts=E, norm_topk_prob=False),
        ("softmax", False, 1.0),
    ),
    "minimax": (
        "MiniMaxForCausalLM",
        "MiniMaxConfig",
        dict(intermediate_size=8, num_local_experts=E, head_dim=8, layer_types=["full_attention"] * 2),
        ("softmax", True, 1.0),
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeForCausalLM",
        "Ernie4_5_MoeConfig",
        dict(
            intermediate_size=32,
            moe_intermediate_size=8,
            moe_num_experts=E,
            moe_k=K,
            moe_layer_start_index=0,
            moe_num_shared_experts=1,
            head_dim=8,
        ),
        ("softmax", True, 1.0),
    ),
    "deepseek_v2": (
        "DeepseekV2ForCausalLM",
        "DeepseekV2Config",
        dict(
            intermediate_size=32,
            moe_intermediate_size=8,
            first_k_dense_replace=0,
            n_routed_experts=E,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            **MLA,
        ),
        ("softmax", False, 1.5),
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1ForCausalLM",
        "HunYuanMoEV1Config",
        dict(intermediate_size=8, num_experts=E, moe_topk=K, head_dim=8, num_shared_expert=1),
        ("softmax", True, 1.0),
    ),
    "gpt_oss": (
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(intermediate_size=8, num_local_experts=E, head_dim=8, layer_types=["full_attention"] * 2),
        ("softmax", True, 1.0),
    ),
    "granitemoe": (
        "GraniteMoeForCausalLM",
        "GraniteMoeConfig",
        dict(intermediate_size=8, num_local_experts=E),
        ("softmax", True, 1.0),
    ),
    "granitemoeshared": (
        "GraniteMoeSharedForCausalLM",
        "GraniteMoeSharedConfig",
        dict(intermediate_size=8, num_local_experts=E, shared_intermediate_size=8),
        ("softmax", True, 1.0),
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridForCausalLM",
        "GraniteMoeHybridConfig",
        dict(
            intermediate_size=8,
            num_local_experts=E,
            shared_intermediate_size=8,
            layer_types=["attention", "attention"],
            mamba_n_heads=2,
        ),
        ("softmax", True, 1.0),
    ),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        "DeepseekV3Config",
        dict(
            intermediate_size=32,
            moe_intermediate_size=8,
            first_k_dense_replace=0,
            n_routed_experts=E,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            **MLA,
        ),
        ("sigmoid", True, 2.5),
    ),
    "glm4_moe": (
        "Glm4MoeForCausalLM",
        "Glm4MoeConfig",
        dict(
            intermediate_size=32,
            moe_intermediate_size=8,
            first_k_dense_replace=0,
            n_routed_experts=E,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
        ("sigmoid", True, 2.5),
    ),
}


def build(name, seed=0):
    cls_name, cfg_name, kw, _ = SPECS[name]
    cfg = getattr(tr, cfg_name)(**{**BASE, **kw})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(tr, cls_name)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # routers that start at zero would tie every selection
        for _, block in hf.moe_blocks(model):
            router = hf._router_of(block)
            for _, p in router.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 2 else 0.2))
            for _, b in router.named_buffers():  # selection-only biases (e_score_correction_bias)
                if b.is_floating_point():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def ids(seed=0):
    return torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(seed))


def first_block(model):
    return hf.moe_blocks(model)[0][1]


def all_experts_float64(experts, x_TH):
    """[E, T, H]: every expert on every token, by a float64 copy of the family's own experts module."""
    T = x_TH.shape[0]
    out = []
    for e in range(E):
        idx = torch.full((T, 1), e, dtype=torch.long)
        out.append(experts(x_TH, idx, torch.ones(T, 1, dtype=x_TH.dtype)))
    return torch.stack(out)


@pytest.mark.parametrize("name", list(SPECS))
def test_family_converts_and_matches_the_float64_derivation(name):
    score, renorm, scale = SPECS[name][3]
    assert hf.model_type(build(name)) in hf.FAMILIES
    plain = build(name).train()
    x_ids = ids()
    ref_logits = plain(x_ids).logits
    assert torch.equal(hf.convert(build(name), router="topk").train()(x_ids).logits, ref_logits), "topk is HF"

    # The FAMILIES entry matches the router: the model's own weights are s * a_sel / Z.
    cap = {}
    router = hf._router_of(first_block(plain))
    h = router.register_forward_hook(lambda m, a, o: cap.update(out=o))
    plain(x_ids)
    h.remove()
    logits, weights, idx = cap["out"]
    a = torch.softmax(logits.float(), -1) if score == "softmax" else torch.sigmoid(logits.float())
    sel = a.gather(1, idx.long())
    expected = scale * (sel / sel.sum(-1, keepdim=True) if renorm else sel)
    torch.testing.assert_close(weights.float(), expected, rtol=1e-5, atol=1e-6)
    gate = hf.FAMILIES[hf.model_type(plain)].gate_form(plain.config.get_text_config(), None)
    assert (gate.score_function, gate.renormalized, gate.scale) == (score, renorm, scale)

    # Converted at D = 0: the model's function.
    converted = hf.convert(build(name), router="default").train()
    torch.testing.assert_close(converted(x_ids).logits, ref_logits, rtol=1e-5, atol=1e-6)

    for in_forward in [None, True] if score == "sigmoid" else [None]:
        check_block_float64(name, score, renorm, scale, in_forward)


def check_block_float64(name, score, renorm, scale, in_forward):
    model = build(name).train()
    block = first_block(model)
    experts64 = copy.deepcopy(block.experts).double()
    if hasattr(experts64, "config"):  # the family's plain loop (grouped_mm has no float64)
        experts64.config._experts_implementation = "eager"
    hf.convert(model, router="default", beta=0.5, **({} if in_forward is None else {"default_in_forward": in_forward}))
    router = hf._router_of(block)
    W = hf._router_weight(router)
    g = torch.Generator().manual_seed(5)
    D0 = torch.randn(E, H, generator=g)
    D0[0] = 0  # an expert without a committed default
    with torch.no_grad():
        block.defaults.defaults_ED.copy_(D0)
    cap = {}
    router.register_forward_pre_hook(lambda m, a: cap.update(x=a[0].detach().reshape(-1, H).clone()))
    router.register_forward_hook(lambda m, a, o: cap.update(idx=o[2].detach().long().clone()))
    block.experts.register_forward_hook(lambda m, a, o: cap.update(out=o))
    model(ids(1))
    G = torch.randn(cap["out"].shape, generator=g)
    (grad,) = torch.autograd.grad((cap["out"] * G).sum(), W)
    commit_defaults(model)

    # float64: the dense mixture over all experts with E^_i = D_i where expert i did not run.
    x = cap["x"].double()
    Wd = W.detach().double().requires_grad_(True)
    bias = getattr(router, "bias", None)
    logits = x @ Wd.t() + (bias.detach().double() if isinstance(bias, torch.Tensor) else 0)
    a = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
    chosen = torch.zeros_like(a, dtype=torch.bool).scatter(1, cap["idx"], True)
    with torch.no_grad():
        Y = all_experts_float64(experts64, x)  # [E, T, H]
    g_sel = a * chosen
    gates = scale * (g_sel / g_sel.sum(-1, keepdim=True) if renorm else g_sel)
    y_S = torch.einsum("te,eth->th", gates, Y)
    w = a / a.sum(-1, keepdim=True) if (score == "softmax" or renorm) else a
    Dd = D0.double()
    observed = Dd.ne(0).any(1)
    on = in_forward if in_forward is not None else score == "softmax"
    if on:
        if renorm:
            E_hat = torch.where(
                chosen.t()[:, :, None], Y, torch.where(observed[:, None, None], Dd[:, None, :], (y_S / scale)[None])
            )
            ref = scale * torch.einsum("te,eth->th", w, E_hat)
        else:
            ref = y_S + scale * (w * ~chosen) @ Dd
    else:
        if renorm:
            wn = w * ~chosen * observed
            extra = wn @ (scale * Dd) - wn.sum(-1, keepdim=True) * y_S.detach()
        else:
            extra = scale * (w * ~chosen) @ Dd
        ref = y_S + extra - extra.detach()
    (ref * G.double()).sum().backward()
    what = f"{name} (default_in_forward={in_forward})"
    torch.testing.assert_close(
        cap["out"].detach().double(), ref.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} output: {m}"
    )
    torch.testing.assert_close(grad.double(), Wd.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} router grad: {m}")
    with torch.no_grad():
        counts = chosen.sum(0).double()
        mean = torch.einsum("te,eth->eh", chosen.double(), Y) / counts.clamp_min(1)[:, None]
        ema = 0.5 * Dd + 0.5 * mean
        if renorm:  # a renormalised gate's default starts at the first mean
            ema = torch.where(observed[:, None], ema, mean)
        D_ref = torch.where(counts[:, None] > 0, ema, Dd)
    torch.testing.assert_close(block.defaults.defaults_ED.double(), D_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} D: {m}")


@pytest.mark.parametrize("name", ["minimax", "deepseek_v3"])
def test_saved_converted_model_comes_back_with_its_d_and_settings(name, tmp_path):
    cls = getattr(tr, SPECS[name][0])
    model = hf.convert(build(name), router="default", beta=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        model(ids(step), labels=ids(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    saved = {n: b.defaults.defaults_ED.clone() for n, b in hf.moe_blocks(model)}
    assert all(d.abs().sum() > 0 for d in saved.values())
    model.save_pretrained(tmp_path / "converted")
    again = cls.from_pretrained(tmp_path / "converted")
    assert again.config.default_moe["router"] == "default" and again.config.default_moe["beta"] == 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found, so nothing to say
        hf.convert(again, router="default", beta=0.8)
    for n, b in hf.moe_blocks(again):
        assert torch.equal(b.defaults.defaults_ED, saved[n]), n
    # Other settings that change what D means are refused.
    with pytest.raises(ValueError, match="saved converted with other Default MoE settings.*normalize_topk"):
        hf.convert(cls.from_pretrained(tmp_path / "converted"), router="default", normalize_topk=False)
    # A checkpoint without D: zeros, and said.
    build(name).save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="has no saved defaults"):
        fresh = hf.convert(cls.from_pretrained(tmp_path / "plain"), router="default")
    assert all(b.defaults.defaults_ED.abs().sum() == 0 for _, b in hf.moe_blocks(fresh))


def test_every_family_in_the_table_is_tested():
    import hf_workers

    tested = {hf.model_type(build(name)) for name in SPECS} | set(hf_workers.KINDS)
    assert set(hf.FAMILIES) <= tested, f"FAMILIES entries without a test: {sorted(set(hf.FAMILIES) - tested)}"


def test_family_table_in_docs_is_the_codes():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    assert hf.family_table() in page, "docs/hf.md's HF family table differs from hf.family_table(); paste it again"


def test_refused_families_say_why():
    dbrx = tr.DbrxForCausalLM(
        tr.DbrxConfig(
            d_model=16,
            n_heads=2,
            n_layers=2,
            max_seq_len=32,
            vocab_size=64,
            attn_config={"kv_n_heads": 1, "rope_theta": 10000.0},
            ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 8},
        )
    )
    with pytest.raises(ValueError, match="'dbrx' MoE block.*Lp norm"):
        hf.convert(dbrx, router="default")
    phimoe = tr.PhimoeForCausalLM(
        tr.PhimoeConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_local_experts=4,
            num_experts_per_tok=2,
        )
    )
    with pytest.raises(ValueError, match="'phimoe' MoE block.*SparseMixer"):
        hf.convert(phimoe, router="default")
