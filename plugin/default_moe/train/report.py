"""The main job's report: per-expert shares, validation loss with D zeroed, `metrics.json`,
`loss.png` and the printed summary."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict

from default_moe.train.loop import evaluate, global_expert_counts


def _expert_shares(model) -> list:
    """Per-expert share of token slots of the last forward (the final diagnostics' probe batch)."""
    shares = []
    for layer in model.moe_layers:
        counts = global_expert_counts(layer)
        shares.append((counts / counts.sum().clamp_min(1)).tolist())
    return shares


def _val_without_defaults(job):
    """How much the trained model leans on its defaults: validation loss with D zeroed (None
    without D)."""
    with_defaults = [layer.defaults for layer in job.model.moe_layers if layer.defaults is not None]
    if not with_defaults:
        return None
    kept = [d.defaults_ED.clone() for d in with_defaults]
    for d in with_defaults:
        d.defaults_ED.zero_()
    val = evaluate(job.engine, job.val_tokens, job.run, job.gpt, job.rank)
    for d, k in zip(with_defaults, kept):
        d.defaults_ED.copy_(k)
    return val


def plot(history: Dict[str, list], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, label="train loss", alpha=0.8)
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _peak_memory(job):
    import torch

    device = job.engine.device
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def report(job) -> None:
    """Collective parts on every rank, then rank 0 writes and prints."""
    expert_share = _expert_shares(job.model)
    val_no_defaults = _val_without_defaults(job)
    if job.rank != 0:
        return
    run, history, cfg = job.run, job.history, job.moe_config
    elapsed = time.perf_counter() - job.t_start
    recent = history["step_time"][-min(50, len(history["step_time"])) :] or [float("nan")]
    step_time = sorted(recent)[len(recent) // 2]
    final_val = history["val"][-1][1] if history["val"] else float("nan")
    tokens_per_step = run.micro_batch * job.gpt.seq_len * job.gas * job.world
    params = job.params()
    metrics: Dict = {
        "steps": run.steps,
        # The last step trained: fewer than `steps` when max_minutes stopped the run.
        "steps_done": job.steps_done or job.start_step,
        "router": cfg.router,
        "ep_size": cfg.ep_size,
        "world": job.world,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "final_val_loss": final_val,
        "final_val_ppl": math.exp(final_val),
        "median_step_s": step_time,
        "tokens_per_s": tokens_per_step / step_time,
        "wall_s_this_session": elapsed,
        "params_total": params["total"],
        "params_active": params["active"],
        "final_val_loss_without_defaults": val_no_defaults,
        "expert_share_per_layer": expert_share,
        "tokens_per_step": tokens_per_step,
        # The device's peak allocated bytes of this process (CUDA; None on CPU).
        "peak_mem_bytes": _peak_memory(job),
        "history": history,
    }
    norms = [layer.defaults.defaults_ED.norm(dim=1).mean().item() for layer in job.model.moe_layers if layer.defaults is not None]
    metrics["default_norm_per_layer"] = norms
    run_dir: Path = job.run_dir
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot(history, run_dir / "loss.png", f"GPT-MoE {cfg.router}, {cfg.num_experts} experts top-{cfg.top_k}")
    done = metrics["steps_done"]
    steps_line = f"{done}" if done == run.steps else f"{done} of {run.steps} (stopped by --max-minutes)"
    print("[train] ---- summary ----")
    print(
        f"[train] steps {steps_line}, final train loss {metrics['final_train_loss']:.4f}, "
        f"validation loss {final_val:.4f} (perplexity {math.exp(final_val):.2f})"
    )
    print(
        f"[train] median step {step_time * 1e3:.0f} ms, {metrics['tokens_per_s']:,.0f} tokens/s over {job.world} ranks; "
        f"{elapsed:.0f} s this session"
    )
    if norms:
        print(
            f"[train] mean default-vector norm per layer: {' '.join(f'{n:.3f}' for n in norms)}; validation "
            f"loss with the defaults zeroed {val_no_defaults:.4f} ({val_no_defaults - final_val:+.4f})"
        )
    print(
        f"[train] wrote {run_dir / 'loss.png'}, {run_dir / 'metrics.json'}, TensorBoard events in {run_dir / 'tb'}, "
        f"checkpoints in {job.ckpt_dir}"
    )
    job.writer.close()
