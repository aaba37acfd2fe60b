"""The main job: train a small GPT whose FFNs are MoE layers, through DeepSpeed with the
"default_moe" section, on the shipped corpus (or your own), on all local ranks.

    torchrun --nproc_per_node 2 launch/train.py --config configs/gpt_tiny.json [--steps 300] [--resume]

Every `RunConfig` field is a command-line flag (`--micro-batch 8`); the run config file sets the
defaults and names the DeepSpeed JSON, whose "default_moe" section `--router`, `--beta`,
and `--ep-size` override. Writes to `--run-dir`: checkpoints (ckpt/), TensorBoard
events (tb/), `metrics.json`, and `loss.png`.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch.distributed as dist

from default_moe.train.build import Job, announce, build
from default_moe.train.config import RunConfig, lr_lambda, parse_args
from default_moe.train.loop import evaluate, train
from default_moe.train.report import report

__all__ = ["Job", "RunConfig", "evaluate", "lr_lambda", "main", "parse_args"]


def main(argv: Optional[List[str]] = None) -> int:
    """Parse and validate (before any process group), build, train, report."""
    run, gpt, ds_config, resume = parse_args(argv)
    job = build(run, gpt, ds_config, resume)
    announce(job, resume)
    train(job)
    report(job)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
