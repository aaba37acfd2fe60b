"""Benchmark: MoE layer forward+backward (+ the EMA commit of an optimizer step), TopK vs Default, one run.

Run on all local ranks with `bash launch/bench_layer.sh` (EP = world size). The routers are timed
in interleaved rounds (same process, same data) so the ratio is not skewed by drift; each figure is
the median over rounds. Prints tokens/s over all ranks, the ratio to TopK, and the collectives one
step issues (calls and bytes, forward and backward) as counted by `default_moe.count_collectives`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from default_moe import MoEConfig, MoELayer, commit_defaults, count_collectives
from default_moe.parallel import init_distributed_from_env

VARIANTS = ["topk", "default"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    rank, world, device = init_distributed_from_env()
    dtype = getattr(torch, args.dtype)
    layers, counts = {}, {}
    for router in VARIANTS:
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=args.hidden, num_experts=args.experts, ffn_hidden_size=args.ffn,
                        top_k=args.top_k, router=router, ep_size=world)
        layers[router] = MoELayer(cfg).to(device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=None)
    g = torch.randn_like(x)

    def step(layer):
        xi = x.detach().requires_grad_(True)
        (layer(xi) * g).sum().backward()
        commit_defaults(layer)  # what the optimizer step does (Default: one all-reduce)

    def sync_all():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()

    for key, layer in layers.items():
        for _ in range(2):
            step(layer)
        with count_collectives() as c:
            step(layer)
        counts[key] = c.summary()
    times = {key: [] for key in layers}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for key in order:
            sync_all()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(layers[key])
            sync_all()
            times[key].append((time.perf_counter() - t0) / args.iters)
    if rank == 0:
        print(f"world={world} ep={world} device={device} dtype={args.dtype} tokens/rank={args.tokens} "
              f"D={args.hidden} F={args.ffn} E={args.experts} K={args.top_k} rounds={args.rounds}x{args.iters}")
        print("| router | step ms (median) | tokens/s (all ranks) | time / TopK, median (IQR) of paired rounds | all-to-all calls, KiB | all-reduce calls, KiB |")
        print("|---|---|---|---|---|---|")
        for key in VARIANTS:
            t = statistics.median(times[key])
            c = counts[key]
            a2a = c.get("all_to_all", (0, 0))
            ar = c.get("all_reduce", (0, 0))
            # Paired per-round ratios: both variants ran back to back, so drift cancels.
            ratios = sorted(a / b for a, b in zip(times[key], times[VARIANTS[0]]))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            print(f"| {key} | {t*1e3:.1f} | {args.tokens*world/t:,.0f} | "
                  f"{statistics.median(ratios):.3f} ({q1:.3f}-{q3:.3f}) | {a2a[0]}, {a2a[1]/1024:.1f} | {ar[0]}, {ar[1]/1024:.2f} |")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
