"""HuggingFace MoE models converted in place (default_moe.integrations.hf): Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE under plain DDP and DeepSpeed ZeRO-2/3 (2 gloo processes, tiny random configs)."""

import pytest

pytest.importorskip("transformers")

from dist import run_distributed  # noqa: E402


@pytest.mark.distributed
def test_hf_convert_ddp(tmp_path):
    import hf_workers

    run_distributed(hf_workers.ddp_checks, 2, str(tmp_path))


@pytest.mark.distributed
def test_hf_deepspeed_section_zero2_zero3(tmp_path):
    pytest.importorskip("deepspeed")
    import hf_workers

    run_distributed(hf_workers.deepspeed_checks, 2, str(tmp_path))


def test_hf_refusals():
    import transformers as tr

    from default_moe.integrations import hf
    import hf_workers

    with pytest.raises(ValueError, match="router 'sparsemixer' is not available"):
        hf.convert(hf_workers.tiny("olmoe"), router="sparsemixer")
    with pytest.raises(ValueError, match="unknown setting"):
        hf.convert(hf_workers.tiny("olmoe"), router="default", betta=0.5)
    with pytest.raises(ValueError, match="MoEConfig.beta"):
        hf.convert(hf_workers.tiny("olmoe"), router="default", beta=1.5)
    cfg = tr.DeepseekV3Config(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                              num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=8,
                              q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    with pytest.raises(ValueError, match="DeepseekV3MoE.*sigmoid"):
        hf.convert(tr.DeepseekV3ForCausalLM(cfg), router="default")
    model = hf.convert(hf_workers.tiny("olmoe"), router="default")
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(model, router="default")
    hf.unconvert(model)
    assert not any(hasattr(b, "defaults") for _, b in hf.moe_blocks(model))
