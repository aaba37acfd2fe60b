"""An HF Trainer script with one added line for Default MoE (run by tests/test_hf.py under torchrun).

The model is a tiny random Qwen3-MoE, the data the shipped corpus's tokens; the DeepSpeed config
(ZeRO-2, or ZeRO-1 + AutoEP with --ep) carries the "default_moe" section. Writes, per rank, the
losses and each MoE layer's D to OUT/result_rank{R}.pt.
"""

import argparse
import os

import torch

import default_moe.deepspeed  # noqa: F401  (the one added line: deepspeed.initialize honours "default_moe")
from default_moe.data import load_tokens
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Trainer, TrainingArguments

SEQ, VOCAB = 32, 4096


class Blocks(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        tokens = torch.from_numpy(load_tokens()[: n * SEQ].astype("int64"))
        self.ids = tokens.view(n, SEQ)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ep", action="store_true", help="expert parallelism through DeepSpeed AutoEP")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--resume", default=None)
    a = p.parse_args()
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 1 if a.ep else 2},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": "auto",
        "default_moe": {"router": "default", "beta": 0.9},
    }
    if a.ep:
        ds_config["expert_parallel"] = {"enabled": True, "autoep_size": 2, "preset_model": "qwen3_moe"}
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=SEQ,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    model = Qwen3MoeForCausalLM(cfg)
    args = TrainingArguments(
        output_dir=a.out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=a.steps,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        deepspeed=ds_config,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(200))
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(os.path.join(a.out, "final"))
    module = trainer.model_wrapped.module if hasattr(trainer.model_wrapped, "module") else trainer.model
    defaults = {n: b.clone() for n, b in module.named_buffers() if n.endswith("defaults_ED")}
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    rank = int(os.environ.get("RANK", 0))
    blocks = sorted({type(m).__name__ for m in module.modules() if hasattr(m, "defaults")})
    torch.save({"losses": losses, "defaults": defaults, "blocks": blocks}, os.path.join(a.out, f"result_rank{rank}.pt"))


if __name__ == "__main__":
    main()
