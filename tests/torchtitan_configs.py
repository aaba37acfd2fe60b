"""torchtitan config functions for the tests (`--module torchtitan_configs --config tiny_qwen3_moe`):
a tiny Qwen3-MoE (2 layers, dim 64, 8 experts, top-2) built from torchtitan's own Qwen3 pieces,
with the shipped tokenizer's 4096-token vocabulary. The data folder and tokenizer come from the
command line (`--hf-assets-path`, `--dataloader.dataset-path`)."""

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.qwen3 import ModelSpec, Qwen3StateDictAdapter, parallelize_qwen3, pipeline_llm
from torchtitan.models.qwen3 import register_moe_load_balancing_hook
from torchtitan.models.qwen3 import (
    _EMBEDDING_INIT,
    _LINEAR_INIT,
    _build_qwen3_moe_layers,
    _qwen3_norm,
    CosSinRoPE,
    Embedding,
    Linear,
    Qwen3Model,
)
from torchtitan.trainer import Trainer

VOCAB = 4096


def tiny_qwen3_moe_model(dim: int = 64, n_layers: int = 2, num_experts: int = 8, top_k: int = 2) -> Qwen3Model.Config:
    head_dim = 16
    return Qwen3Model.Config(
        vocab_size=VOCAB,
        dim=dim,
        norm=_qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB, param_init=_LINEAR_INIT),
        layers=_build_qwen3_moe_layers(
            fuse_qkv=True,
            n_layers=n_layers,
            dim=dim,
            n_heads=4,
            n_kv_heads=2,
            head_dim=head_dim,
            moe_hidden_dim=64,
            num_experts=num_experts,
            top_k=top_k,
            attn_backend="flex",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=256, theta=1000000.0),
            moe_comm_backend="standard",
        ),
    )


def tiny_qwen3_moe() -> Trainer.Config:
    model = tiny_qwen3_moe_model()
    spec = ModelSpec(
        name="qwen3",
        flavor="tiny_moe",
        model=model,
        parallelize_fn=parallelize_qwen3,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=Qwen3StateDictAdapter,
    )
    return Trainer.Config(
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(spec))),
        metrics=MetricsProcessor.Config(log_freq=1),
        model_spec=spec,
        dataloader=HuggingFaceTextDataLoader.Config(dataset="c4_test"),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=1),
        training=TrainingConfig(local_batch_size=2, seq_len=64, steps=4),
        parallelism=ParallelismConfig(expert_parallel_degree=1),
        checkpoint=CheckpointManager.Config(interval=1000, last_save_model_only=False),
    )
