"""Benchmark: MoE layer forward+backward (+ the EMA commit of an optimizer step), TopK vs Default, one run.

A step is `layer(x).backward(g)` (and the commit): the layer's own forward and backward, no loss.
"default-bwd" is Default MoE with the term out of the forward (`default_in_forward=false`).

Run on all local ranks with `bash launch/bench_layer.sh` (EP = world size). The routers are timed
in interleaved rounds (same process, same data) so the ratio is not skewed by drift; each figure is
the median over rounds. Prints tokens/s over all ranks, the ratio to TopK, and the collectives one
step issues (calls and bytes, forward and backward) as counted by `default_moe.count_collectives`.

"experts GEMMs only" times the same experts module alone (fwd+bwd) on rows already sorted by
expert, with the per-expert counts TopK's routing gave: the work no MoE layer can avoid. A router's
efficiency is that time over its step time (1.0: routing, dispatch, combine and Default MoE's term
and statistics cost nothing). With `--experts-backend grouped_mm` the experts run as one grouped GEMM
(`torch._grouped_mm`, which torch 2.13 also has on CPU; needs 16-byte rows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from default_moe import MoEConfig, MoELayer, commit_defaults, count_collectives
from default_moe.parallel import init_distributed_from_env

GEMMS = "experts GEMMs only"
TERM = "Default's term GEMMs only"
# Variant name -> MoEConfig settings. "default" keeps the library's default_in_forward (auto: the
# term in the forward for softmax gates, as the paper); "default-bwd" is the main job's setting.
VARIANT_SETTINGS = {
    "topk": dict(router="topk"),
    "default": dict(router="default"),
    "default-bwd": dict(router="default", default_in_forward=False),
}


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
    ap.add_argument("--experts-backend", default="auto", choices=["auto", "loop", "grouped_mm"])
    ap.add_argument(
        "--routers",
        default="topk,default,default-bwd",
        help=f"comma-separated, of {list(VARIANT_SETTINGS)}; the first is the ratios' baseline",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile (inductor) each layer and the experts-only baseline; 4 warm-up steps",
    )
    args = ap.parse_args()
    variants = args.routers.split(",")
    for v in variants:
        if v not in VARIANT_SETTINGS:
            ap.error(f"--routers: {v!r} is not one of {list(VARIANT_SETTINGS)}")

    rank, world, device = init_distributed_from_env()
    dtype = getattr(torch, args.dtype)
    layers, counts = {}, {}
    for variant in variants:
        torch.manual_seed(0)
        cfg = MoEConfig(
            hidden_size=args.hidden,
            num_experts=args.experts,
            ffn_hidden_size=args.ffn,
            top_k=args.top_k,
            ep_size=world,
            experts_backend=args.experts_backend,
            **VARIANT_SETTINGS[variant],
        )
        layers[variant] = MoELayer(cfg).to(device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, generator=None)
    g = torch.randn_like(x)

    run = {key: torch.compile(layer) if args.compile else layer for key, layer in layers.items()}

    def step(layer, fn):
        xi = x.detach().requires_grad_(True)
        fn(xi).backward(g)
        commit_defaults(layer)  # what the optimizer step does (Default: one all-reduce)

    def sync_all():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if dist.is_initialized():
            dist.barrier()

    warmup = 4 if args.compile else 2
    for key, layer in layers.items():
        for _ in range(warmup):
            step(layer, run[key])
        with count_collectives() as c:
            step(layer, run[key])
        counts[key] = c.summary()
    # The experts alone on this rank's rows (sorted by expert), with the baseline's per-expert counts.
    base = layers[variants[0]]
    experts = base.experts
    counts_E = base.tokens_per_expert.clone()
    if world > 1:  # the rows this rank's experts receive: every rank's slots for them
        dist.all_reduce(counts_E)
    local_counts = [int(counts_E[e]) for e in base.local_expert_ids]
    rows = sum(local_counts)
    xs = torch.randn(rows, args.hidden, device=device, dtype=dtype)
    gs = torch.randn(rows, args.hidden, device=device, dtype=dtype)
    counts_L = torch.tensor(local_counts, device=device)

    experts_fn = torch.compile(experts) if args.compile else experts

    def gemm_step(_):
        xi = xs.detach().requires_grad_(True)
        experts_fn(xi, local_counts, counts_L).backward(gs)

    for _ in range(warmup):
        gemm_step(None)

    # Default MoE's own GEMMs: the term w_TE @ D_ED (forward) and the weights' gradient
    # g_TD @ D_ED^T (backward), the work its dense router gradient cannot avoid. Over a TopK step
    # they bound Default/TopK from below (+ both for the term in the forward, + the second alone
    # for default-bwd).
    w_TE = torch.rand(args.tokens, args.experts, device=device)
    D_ED = torch.randn(args.experts, args.hidden, device=device)
    g_TD = torch.randn(args.tokens, args.hidden, device=device)

    def term_gemms():
        w_TE @ D_ED
        g_TD @ D_ED.t()

    runners = {key: (lambda k=key: step(layers[k], run[k])) for key in variants}
    runners[GEMMS] = lambda: gemm_step(None)
    runners[TERM] = term_gemms
    times = {key: [] for key in runners}
    keys = [*variants, GEMMS, TERM]
    for r in range(args.rounds):
        order = keys if r % 2 == 0 else keys[::-1]
        for key in order:
            sync_all()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                runners[key]()
            sync_all()
            times[key].append((time.perf_counter() - t0) / args.iters)
    if rank == 0:
        print(
            f"world={world} ep={world} device={device} dtype={args.dtype} tokens/rank={args.tokens} "
            f"D={args.hidden} F={args.ffn} E={args.experts} K={args.top_k} rounds={args.rounds}x{args.iters} "
            f"experts_backend={args.experts_backend} threads={torch.get_num_threads()}"
            + (" compiled (inductor; the experts-only baseline too)" if args.compile else "")
        )
        print(
            "| router | step ms (median) | tokens/s (all ranks) | time / TopK, median (IQR) of paired rounds | "
            "efficiency (experts GEMMs / step, paired) | all-to-all calls, KiB | all-reduce calls, KiB |"
        )
        print("|---|---|---|---|---|---|---|")
        for key in variants:
            t = statistics.median(times[key])
            c = counts[key]
            a2a = c.get("all_to_all", (0, 0))
            ar = c.get("all_reduce", (0, 0))
            # Paired per-round ratios: both variants ran back to back, so drift cancels.
            ratios = sorted(a / b for a, b in zip(times[key], times[variants[0]]))
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            eff = statistics.median(g / a for g, a in zip(times[GEMMS], times[key]))
            print(
                f"| {key} | {t * 1e3:.1f} | {args.tokens * world / t:,.0f} | "
                f"{statistics.median(ratios):.3f} ({q1:.3f}-{q3:.3f}) | {eff:.3f} | "
                f"{a2a[0]}, {a2a[1] / 1024:.1f} | {ar[0]}, {ar[1] / 1024:.2f} |"
            )
        print(f"| {GEMMS} | {statistics.median(times[GEMMS]) * 1e3:.1f} | - | - | 1.000 | - | - |")
        floor = statistics.median(t / b for t, b in zip(times[TERM], times[variants[0]]))
        print(
            f"| {TERM} | {statistics.median(times[TERM]) * 1e3:.1f} | - | {1 + floor:.3f} (the floor of Default / "
            f"{variants[0]}: its two [T, E] x [E, D] GEMMs over a {variants[0]} step) | - | - | - |"
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
