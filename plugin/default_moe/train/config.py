"""The main job's settings: `RunConfig` (every field a flag), the run config file, the DeepSpeed
JSON and its "default_moe" section, validated before any process group exists."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from default_moe import data as data_mod
from default_moe import manifest
from default_moe.integrations import deepspeed as dm_ds
from default_moe.models.gpt import GPTConfig


@dataclass
class RunConfig:
    """Run settings (model shape in GPTConfig fields, optimisation, logging)."""

    deepspeed_config: str = "configs/ds_gpt_tiny.json"
    run_dir: str = "runs/gpt_tiny"
    data: str = data_mod.SHIPPED
    tokenizer: Optional[str] = None
    token_dtype: str = "uint16"
    steps: int = 500
    micro_batch: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 250
    # Complete checkpoints kept in run_dir/ckpt (0: all; None: the DeepSpeed section's
    # "checkpoint": {"keep_last"}); the newest complete one is never deleted.
    keep_last: Optional[int] = None
    # Write a checkpoint at the last step (false: a science batch that needs only metrics.json;
    # the GPU config's checkpoint is ~5 GB with its optimizer state).
    save_final: bool = True
    log_every: int = 10
    seed: int = 1234
    # Every collective fails after this long instead of hanging (a dead or diverged rank).
    dist_timeout_s: float = 600.0
    # torch.compile each transformer block (torchtitan's per-block compile, inductor, default
    # mode); the compiled-graph count per log step goes to metrics.json ("compiled_graphs").
    compile: bool = False
    # Stop (with a final eval and checkpoint) after the step that passes this much wall time.
    max_minutes: Optional[float] = None
    # Size the schedule to this much wall time of training (from the first step): at the end of
    # warmup the run measures its step and evaluation times and sets `steps` (at most the given
    # --steps), so warmup + cosine decay complete instead of being cut off by max_minutes.
    time_budget_minutes: Optional[float] = None
    # With time_budget_minutes: a folder shared by runs that must train the same number of steps
    # (paired runs side by side on one GPU); each writes its proposal there and all take the
    # smallest once `schedule_sync_runs` proposals are in (waiting at most schedule_sync_wait_s).
    schedule_sync: Optional[str] = None
    schedule_sync_runs: int = 1
    schedule_sync_wait_s: float = 180.0
    # D annealing (Default MoE with D in the forward): over the last N steps the default term's
    # weight in the forward decays linearly to 0 (its router gradient stays), so the final model
    # is the plain top-k model serving runtimes compute (`default-moe export` is then exact). 0: off.
    anneal_defaults_steps: int = 0
    # Overrides of the DeepSpeed "default_moe" section (None: keep the JSON's value).
    router: Optional[str] = None
    beta: Optional[float] = None
    ep_size: Optional[int] = None
    ema_weighting: Optional[str] = None
    ema_stats_dtype: Optional[str] = None
    default_in_forward: Optional[bool] = None
    stale_defaults: Optional[str] = None
    aux_loss_coeff: Optional[float] = None
    expert_bias: Optional[bool] = None
    model: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "eval_every", "eval_batches", "ckpt_every", "log_every", "schedule_sync_runs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RunConfig.{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"RunConfig.lr (--lr) must be > 0, got {self.lr!r}")
        if self.max_minutes is not None and not (self.max_minutes > 0):
            raise ValueError(f"RunConfig.max_minutes (--max-minutes) must be > 0, got {self.max_minutes!r}")
        if not (self.dist_timeout_s > 0):
            raise ValueError(f"RunConfig.dist_timeout_s (--dist-timeout-s) must be > 0 seconds, got {self.dist_timeout_s!r}")
        if self.keep_last is not None and (isinstance(self.keep_last, bool) or self.keep_last < 0):
            raise ValueError(f"RunConfig.keep_last (--keep-last) must be an integer >= 0 (0 keeps all), got {self.keep_last!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"RunConfig.warmup_steps (--warmup-steps) must be >= 0, got {self.warmup_steps!r}")
        if (
            isinstance(self.anneal_defaults_steps, bool)
            or not isinstance(self.anneal_defaults_steps, int)
            or self.anneal_defaults_steps < 0
        ):
            raise ValueError(
                f"RunConfig.anneal_defaults_steps (--anneal-defaults-steps) must be an integer >= 0 (0: off), got {self.anneal_defaults_steps!r}"
            )
        if self.time_budget_minutes is not None:
            if not (self.time_budget_minutes > 0):
                raise ValueError(
                    f"RunConfig.time_budget_minutes (--time-budget-minutes) must be > 0, got {self.time_budget_minutes!r}"
                )
            if self.warmup_steps < 4:
                raise ValueError(
                    "RunConfig.time_budget_minutes (--time-budget-minutes) measures the step time during warmup: "
                    f"warmup_steps (--warmup-steps) must be >= 4, got {self.warmup_steps!r}"
                )
        elif self.schedule_sync is not None:
            raise ValueError("RunConfig.schedule_sync (--schedule-sync) needs time_budget_minutes (--time-budget-minutes)")
        if not (self.schedule_sync_wait_s > 0):
            raise ValueError(
                f"RunConfig.schedule_sync_wait_s (--schedule-sync-wait-s) must be > 0 seconds, got {self.schedule_sync_wait_s!r}"
            )


def _flag_bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: Optional[List[str]] = None) -> tuple:
    """Run config file + command-line overrides -> (RunConfig, GPTConfig, DeepSpeed config dict, resume)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt_tiny.json", help="run config JSON")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint run_dir/ckpt/latest names (else the newest complete one in commit order)",
    )
    ap.add_argument(
        "--resume-from",
        default=None,
        metavar="TAG",
        help="continue from this checkpoint tag (a rollback: later saves move `latest`, so the next resume follows)",
    )
    ap.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume if run_dir/ckpt has a checkpoint, else start fresh (for torchrun --max-restarts)",
    )
    # Passed by the `deepspeed` launcher; the rank comes from the environment it also sets.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(RunConfig):
        if f.name == "model":
            continue
        typ = {"int": int, "float": float, "str": str, "bool": _flag_bool}.get(
            str(f.type).replace("Optional[", "").rstrip("]"), str
        )
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=None, help=f"(RunConfig.{f.name})")
    for f in dataclasses.fields(GPTConfig):
        if f.name in ("router",):
            continue
        ap.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=None,
            dest=f"model_{f.name}",
            help=f"(GPTConfig.{f.name})",
        )
    args = ap.parse_args(argv)
    try:
        with open(args.config) as fh:
            file_cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"--config {args.config}: {e}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(file_cfg) - known)
    if unknown:
        ap.error(f"{args.config}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    values = dict(file_cfg)
    for f in dataclasses.fields(RunConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "model":
            values[f.name] = v
    model = dict(values.get("model", {}))
    for f in dataclasses.fields(GPTConfig):
        v = getattr(args, f"model_{f.name}", None)
        if v is not None:
            model[f.name] = v
    values["model"] = model
    try:
        run = RunConfig(**values)
        gpt_unknown = sorted(set(model) - {f.name for f in dataclasses.fields(GPTConfig)})
        if gpt_unknown:
            raise ValueError(f'unknown key(s) {gpt_unknown} in "model"')
        gpt = GPTConfig(**model)
        with open(run.deepspeed_config) as fh:
            ds_config = json.load(fh)
        section = dict(ds_config.get("default_moe", {"enabled": True}))
        for key in (
            "router",
            "beta",
            "ep_size",
            "ema_weighting",
            "ema_stats_dtype",
            "default_in_forward",
            "stale_defaults",
            "aux_loss_coeff",
            "expert_bias",
        ):
            if getattr(run, key) is not None:
                section[key] = getattr(run, key)
        if section.get("router") == "stablemoe" and "stablemoe" not in section:
            # The distilled router embeds token ids; stage 2 from 10% of training (the paper's).
            gas = int(ds_config.get("gradient_accumulation_steps", 1))
            section["stablemoe"] = {"vocab_size": gpt.vocab_size, "stage2_step": max(1, run.steps // 10) * gas}
        if run.keep_last is not None:
            section["checkpoint"] = {**section.get("checkpoint", {}), "keep_last": run.keep_last}
        ds_config["default_moe"] = section
        dm_ds.DeepSpeedMoESection.from_ds_config(ds_config)  # fail early, before any process group
        if section.get("enabled", True):
            dataclasses.replace(gpt.moe_config(), **{k: v for k, v in section.items() if k not in ("enabled", "checkpoint")})
    except (ValueError, TypeError, OSError, json.JSONDecodeError) as e:
        ap.error(str(e))
    if args.resume_from is not None:
        tag_dir = Path(run.run_dir) / "ckpt" / args.resume_from
        if not args.resume_from or "/" in args.resume_from or not tag_dir.is_dir():
            ap.error(f"--resume-from {args.resume_from!r}: no checkpoint folder {tag_dir}")
        return run, gpt, ds_config, args.resume_from
    resume = args.resume or (args.auto_resume and manifest.has_checkpoint(str(Path(run.run_dir) / "ckpt")))
    return run, gpt, ds_config, resume


def lr_lambda(run: RunConfig):
    def f(step: int) -> float:
        if step < run.warmup_steps:
            return (step + 1) / run.warmup_steps
        progress = min(1.0, (step - run.warmup_steps) / max(1, run.steps - run.warmup_steps))
        return run.min_lr_ratio + (1 - run.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
