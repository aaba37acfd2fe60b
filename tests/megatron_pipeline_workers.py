"""Per-rank bodies of the pipeline-recompute test: megatron's 1F1B schedule on 2 pipeline stages
runs several micro-batches' forwards before their backwards. Router and expert gradients (and D,
committed at finalize_model_grads, and the StableMoE step) with activation recompute must equal
those of a run without it."""

from __future__ import annotations

import torch

import megatron_cpu

H, E, S, MB, VOCAB, MICROBATCHES = 16, 4, 8, 2, 64, 4


def _run(recompute: str, router: str, top_k: int, vpp=None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from default_moe.integrations import megatron as dm

    model_parallel_cuda_manual_seed(123)
    extra = {}
    if recompute == "full":
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "moe":
        extra = dict(recompute_granularity="selective", recompute_modules=["moe"])
    config = TransformerConfig(
        num_layers=4,
        hidden_size=H,
        num_attention_heads=2,
        num_moe_experts=E,
        moe_router_topk=top_k,
        moe_ffn_hidden_size=32,
        ffn_hidden_size=32,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        add_bias_linear=False,
        init_method_std=0.3,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        virtual_pipeline_model_parallel_size=vpp,
        **extra,
    )
    settings = dict(router=router, beta=0.5)
    if router == "stablemoe":
        # The stage boundary falls inside the step: micro-batches 1-2 learn routing, 3-4 freeze it.
        settings["stablemoe"] = dict(vocab_size=VOCAB, stage2_step=2, router_dim=8)
    dm.install(**settings)
    try:
        torch.manual_seed(0)
        chunks = [
            GPTModel(
                config=config,
                transformer_layer_spec=get_gpt_layer_local_spec(num_experts=E),
                vocab_size=VOCAB,
                max_sequence_length=S,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=v),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=v),
                **({} if vpp is None else {"vp_stage": v}),
            )
            for v in range(vpp or 1)
        ]
    finally:
        dm.uninstall()
    # Megatron-LM sets the real finalize_model_grads (it needs DDP-wrapped chunks); every schedule
    # calls this hook after the step's last backward, which is where D is committed.
    config.finalize_model_grads_func = lambda *args, **kwargs: None
    layers = [m for c in chunks for m in c.modules() if isinstance(m, dm.DefaultMoELayer)]
    assert len(layers) == 2  # two MoE layers on each stage (one per chunk when interleaved)
    if router == "default":
        with torch.no_grad():
            for i, layer in enumerate(layers):  # a nonzero start, so every step's D matters
                layer.defaults.defaults_ED.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(i)))
    g = torch.Generator().manual_seed(42)
    batches = [torch.randint(0, VOCAB, (MB, S), generator=g) for _ in range(MICROBATCHES)]
    pos = torch.arange(S).unsqueeze(0).expand(MB, S)

    def step(data_iterator, chunk):
        tokens = next(data_iterator)
        out = chunk(tokens, pos, None, labels=torch.roll(tokens, -1, 1))

        def loss_fn(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_fn

    data = iter(batches) if vpp is None else [iter(batches), iter(list(batches))]
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=data,
        model=chunks,
        num_microbatches=MICROBATCHES,
        seq_length=S,
        micro_batch_size=MB,
        forward_only=False,
    )
    if router == "default":
        for layer in layers:  # all micro-batches counted once, committed at finalize
            assert layer.defaults.pending == 0 and layer.defaults.num_updates == 1, (recompute, layer.defaults.pending)
    grads = {
        f"{i}.{n}": p.grad.clone()
        for i, c in enumerate(chunks)
        for n, p in c.named_parameters()
        if p.grad is not None and (".router." in n or ".experts." in n)
    }
    state = {
        f"{i}.{n}": b.clone()
        for i, c in enumerate(chunks)
        for n, b in c.named_buffers()
        if "defaults_ED" in n or "num_steps" in n
    }
    return grads, state


def pipeline_recompute(rank, world, vpp=None):
    """vpp None: 1F1B; 2: the interleaved schedule with 2 model chunks per stage."""
    megatron_cpu.apply()
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)
    for router, top_k in (("default", 2), ("stablemoe", 1)):
        want_grads, want_state = _run("none", router, top_k, vpp)
        assert any(".router." in n for n in want_grads) and any(".experts." in n for n in want_grads)
        if router == "stablemoe":
            assert all(int(v) == MICROBATCHES for n, v in want_state.items() if "num_steps" in n), want_state
        for recompute in ("full", "moe"):
            grads, state = _run(recompute, router, top_k, vpp)
            assert grads.keys() == want_grads.keys()
            for n in grads:
                assert torch.equal(grads[n], want_grads[n]), (
                    f"{router}, recompute {recompute}: gradient of {n} differs from the run without recompute "
                    f"(max diff {(grads[n] - want_grads[n]).abs().max():.3g})"
                )
            for n in state:
                assert torch.equal(state[n], want_state[n]), f"{router}, recompute {recompute}: {n} differs"
    parallel_state.destroy_model_parallel()
