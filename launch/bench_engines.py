"""Benchmark: one MoE layer's forward+backward in our layer vs DeepSpeed's and megatron-core's.

Run by `bash launch/bench_engines.sh` on 1 or 2 processes (EP = number of processes; gloo on CPU).
Same shapes for every implementation: T tokens per rank, hidden D, E experts, top-k, SwiGLU
experts of width F, fp32 (`--dtype bfloat16` on a GPU). Rows:
  - ours, router topk / default (dropless), experts backend "loop"; and ours topk with the
    "grouped_mm" backend (`torch._grouped_mm`);
  - DeepSpeed `deepspeed.moe.layer.MoE` (capacity factor 1.25, and drop_tokens=False = dropless
    padded to the largest expert), SwiGLU experts as an nn.Module;
  - megatron-core `MoELayer` (alltoall dispatcher, SequentialMLP, gated SwiGLU, pre-softmax top-k;
    without Transformer Engine megatron-core has no grouped GEMM of its own: the row says so);
  - torchtitan's own `MoE` (`models/common/moe.py`: `torch._grouped_mm` experts in bf16, its token
    reorderer, Qwen3's softmax gate with route_norm), EP 1 only.
More rows of ours (not in the default set): `ours default grouped_mm`, `ours default-bwd` and
`ours default-bwd grouped_mm` (`default_in_forward=false`: the router's dense gradient without the
term in the forward).
The variants are timed in interleaved rounds (median); each row reports ms/step, tokens/s over all
ranks, the ratio to our TopK, memory, and the collectives one step issues (counted by wrapping the
`torch.distributed` functions every implementation calls, forward and backward). Memory: on CUDA
the peak allocated bytes of a step; on CPU (no allocator statistics) the bytes autograd saves for
backward (the activation memory a step holds at its peak) plus parameters; the saved-for-backward
bytes are also a column of their own on every device. Host syncs: the calls of one forward+backward
that make the host wait for a CUDA device (`default_moe.diagnostics.count_host_syncs`; counted on
any device, so CPU runs show what a GPU run would wait for). Several sizes per run
(`--sizes T:D:F:E:k,...`); `--impls` picks implementations (DeepSpeed / megatron-core rows are
skipped with a note when the package is not importable). megatron-core runs on CPU through the CPU/test-only shims (launch/megatron_cpu.py),
as in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from default_moe.diagnostics import count_host_syncs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


_COLLECTIVES = (
    "all_to_all_single",
    "all_to_all",
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "broadcast",
    "_all_gather_base",
    "_reduce_scatter_base",
)


@contextlib.contextmanager
def count_all_collectives(records: list):
    """Records (op, bytes) of every torch.distributed collective called inside (any library)."""
    originals = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor", kwargs.get("output"))
            if isinstance(t, torch.Tensor):
                records.append((name, t.numel() * t.element_size()))
            elif isinstance(t, (list, tuple)):
                records.append((name, sum(x.numel() * x.element_size() for x in t)))
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield records
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def saved_bytes(acc: list):
    """Sums the bytes of every tensor autograd saves for backward inside (distinct storages)."""
    seen = set()

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.dtype)
        except RuntimeError:
            key = id(t)
        if key not in seen:
            seen.add(key)
            acc[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield acc


# (name, router, experts backend, default_in_forward) of our rows.
OURS = (
    ("ours topk", "topk", "loop", None),
    ("ours default", "default", "loop", None),
    ("ours default-bwd", "default", "loop", False),
    ("ours topk grouped_mm", "topk", "grouped_mm", None),
    ("ours default grouped_mm", "default", "grouped_mm", None),
    ("ours default-bwd grouped_mm", "default", "grouped_mm", False),
)
IMPLS = tuple(n for n, *_ in OURS) + ("deepspeed cf1.25", "deepspeed dropless", "megatron-core", "torchtitan")
DEFAULT_IMPLS = ("ours topk", "ours default", "ours topk grouped_mm", "deepspeed cf1.25", "deepspeed dropless", "megatron-core")
# Each row's expert computation, for the table (filled in by the builders).
EXPERTS_KIND = {n: f"ours, {backend}" for n, _, backend, _ in OURS}
EXPERTS_KIND.update({"deepspeed cf1.25": "nn.Module per expert", "deepspeed dropless": "nn.Module per expert"})


def _planted_crash(name: str) -> None:
    """The device check's CPU dry run plants a crash in one implementation (DEFAULT_MOE_PLANT_CRASH)
    to show that the other rows survive it."""
    if name in [n.strip() for n in os.environ.get("DEFAULT_MOE_PLANT_CRASH", "").split(",")]:
        raise RuntimeError(f"planted crash in {name!r} (DEFAULT_MOE_PLANT_CRASH)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def build(args, world, first=True):
    from default_moe import MoEConfig, MoELayer

    out = {}
    for name, router, backend, in_forward in OURS:
        if name not in args.impls:
            continue
        _planted_crash(name)
        torch.manual_seed(0)
        out[name] = MoELayer(
            MoEConfig(
                hidden_size=args.hidden,
                num_experts=args.experts,
                ffn_hidden_size=args.ffn,
                top_k=args.top_k,
                router=router,
                ep_size=world,
                experts_backend=backend,
                default_in_forward=in_forward,
            )
        )
    if any(n.startswith("deepspeed") for n in args.impls) and _importable("deepspeed"):
        _build_deepspeed(out, args, world, first)
    if "megatron-core" in args.impls and _importable("megatron.core"):
        _planted_crash("megatron-core")
        _build_megatron(out, args, world, first)
    if "torchtitan" in args.impls and _importable("torchtitan"):
        _planted_crash("torchtitan")
        if world > 1:
            raise SystemExit("--impls torchtitan: EP 1 only (its all-to-all dispatcher needs a device mesh)")
        _build_torchtitan(out, args)
    return out


def _build_torchtitan(out, args):
    """torchtitan's own MoE layer (models/common/moe.py) configured as its Qwen3-MoE builds it:
    softmax gate with route_norm, `torch._grouped_mm` experts in bf16, the local token reorderer,
    no shared expert; initialised by its own `param_init` (normal, std 0.02). Only the MoE module
    is imported (no trainer, so a GPU machine needs few wheels: spmd_types, tyro)."""
    import functools

    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    normal = functools.partial(torch.nn.init.normal_, std=0.02)
    cfg = MoE.Config(
        num_experts=args.experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(
                dim=args.hidden,
                hidden_dim=args.ffn,
                num_experts=args.experts,
                param_init={"w1_EFD": normal, "w2_EDF": normal, "w3_EFD": normal},
            ),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=args.experts, top_k=args.top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=args.experts,
            gate=Linear.Config(in_features=args.hidden, out_features=args.experts, bias=False, param_init={"weight": normal}),
            top_k=args.top_k,
            score_func="softmax",
            route_norm=True,
        ),
    )
    torch.manual_seed(0)
    moe = cfg.build()
    moe.init_states(buffer_device=torch.device("cpu"))
    EXPERTS_KIND["torchtitan"] = "torch._grouped_mm (bf16)"
    out["torchtitan"] = moe


def _build_deepspeed(out, args, world, first):
    import deepspeed
    from deepspeed.moe.layer import MoE

    import default_moe.integrations.deepspeed as dm_ds

    dm_ds.skip_cpu_jit_builds()
    if first:
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    for name, drop in (("deepspeed cf1.25", True), ("deepspeed dropless", False)):
        if name not in args.impls:
            continue
        _planted_crash(name)
        torch.manual_seed(0)
        moe = MoE(
            hidden_size=args.hidden,
            expert=SwiGLU(args.hidden, args.ffn),
            num_experts=args.experts,
            ep_size=world,
            k=args.top_k,
            capacity_factor=1.25,
            eval_capacity_factor=1.25,
            min_capacity=4,
            drop_tokens=drop,
            use_rts=False,
        )
        moe.set_deepspeed_parallelism()
        out[name] = moe


def _build_megatron(out, args, world, first):
    import megatron_cpu
    from default_moe.integrations import megatron_compat as compat

    if not torch.cuda.is_available():
        megatron_cpu.apply()
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.moe_layer import MoELayer as McoreMoE

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=4,
        num_moe_experts=args.experts,
        moe_router_topk=args.top_k,
        moe_ffn_hidden_size=args.ffn,
        ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type="alltoall",
        moe_router_pre_softmax=True,
        moe_aux_loss_coeff=0.01,
        use_cpu_initialization=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        expert_model_parallel_size=world,
    )
    spec = get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False)
    # Without Transformer Engine megatron-core's experts are a loop of MLPs (its grouped GEMM
    # needs TE or the grouped_gemm package): said in the table, not hidden.
    te = _importable("transformer_engine")
    EXPERTS_KIND["megatron-core"] = "SequentialMLP" + ("" if te else " (no Transformer Engine)")
    out["megatron-core"] = McoreMoE(cfg, compat.moe_spec_submodules(spec.submodules.mlp))


def parse_sizes(text: str):
    sizes = []
    for item in text.split(","):
        try:
            T, D, F_, E, k = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--sizes: {item!r} is not T:D:F:E:k (five integers)") from None
        sizes.append({"tokens": T, "hidden": D, "ffn": F_, "experts": E, "top_k": k})
    return sizes


def bench_size(size: dict, args, rank: int, world: int, first: bool) -> list:
    a = argparse.Namespace(**{**vars(args), **size})
    layers = build(a, world, first)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    for layer in layers.values():
        layer.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)
    grad = torch.randn(a.tokens, a.hidden, generator=g).to(device=device, dtype=dtype)

    def step(name, layer):
        if name == "megatron-core":
            xi = x.view(a.tokens, 1, a.hidden).detach().requires_grad_(True)
            out = layer(xi)[0].view(a.tokens, a.hidden)
        elif name.startswith("deepspeed"):
            xi = x.view(1, a.tokens, a.hidden).detach().requires_grad_(True)
            out = layer(xi)[0].view(a.tokens, a.hidden)
        elif name == "torchtitan":
            out = layer(x.view(1, a.tokens, a.hidden).detach().requires_grad_(True)).view(a.tokens, a.hidden)
        else:
            xi = x.detach().requires_grad_(True)
            out = layer(xi)
        (out * grad).sum().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    names = list(layers)
    for n in names:
        for _ in range(2):
            step(n, layers[n])
    extra = {}
    for n in names:
        records, acc = [], [0]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        with count_all_collectives(records), saved_bytes(acc), count_host_syncs() as syncs:
            step(n, layers[n])
        params = sum(p.numel() * p.element_size() for p in layers[n].parameters())
        mem = (torch.cuda.max_memory_allocated() - base_mem + params) if device.type == "cuda" else acc[0] + params
        ops = {}
        for op, nbytes in records:
            c, b = ops.get(op, (0, 0))
            ops[op] = (c + 1, b + nbytes)
        extra[n] = {
            "mem_bytes": mem,
            "saved_bytes": acc[0],
            "host_syncs": syncs.count,
            "host_sync_calls": syncs.calls,
            "collectives": sum(c for c, _ in ops.values()),
            "collective_bytes": sum(b for _, b in ops.values()),
            "by_op": ops,
        }
    times = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(n, layers[n])
            sync()
            times[n].append((time.perf_counter() - t0) / args.iters)
    if args.profile and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        for n in names:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(n, layers[n])
            print(f"\n### profile: {n} (3 steps, rank 0, self CPU time)\n")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40))
    # The same-run reference: ours topk (loop), else the first of ours in this run.
    baseline = next((n for n in ("ours topk", "ours topk grouped_mm") if n in times), None)
    base = statistics.median(times[baseline]) if baseline else None
    rows = []
    for n in names:
        t = statistics.median(times[n])
        q1, q3 = (statistics.quantiles(times[n], n=4)[0], statistics.quantiles(times[n], n=4)[2]) if len(times[n]) > 1 else (t, t)
        # Expert FLOPs actually needed (3 GEMMs of T*k rows, x3 for forward+backward), all ranks.
        flops = 3 * 2 * 3 * a.tokens * a.top_k * a.hidden * a.ffn * world
        rows.append(
            {
                "name": n,
                **size,
                "world": world,
                "ms": t * 1e3,
                "ms_iqr": [q1 * 1e3, q3 * 1e3],
                "tokens_per_s": a.tokens * world / t,
                "ratio_to_ours_topk": t / base if base else float("nan"),
                "baseline": baseline,
                "expert_tflops": flops / t / 1e12,
                # Of the device's dense bf16 peak (--peak-tflops; None on CPU), per rank.
                "peak_fraction": flops / world / t / 1e12 / args.peak_tflops if args.peak_tflops else None,
                "experts_kind": EXPERTS_KIND.get(n, "-"),
                **extra[n],
            }
        )
    del layers
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--sizes",
        default="4096:256:512:8:2",
        help="comma-separated T:D:F:E:k (tokens per rank, hidden, expert ffn, experts, top-k)",
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here (rank 0)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per implementation")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and activations")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated subset of {list(IMPLS)}")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak TFLOP/s in --dtype, per rank (H200 bf16: ~790 measured); adds the fraction of it",
    )
    args = ap.parse_args()
    args.impls = [n.strip() for n in args.impls.split(",") if n.strip()]
    bad = sorted(set(args.impls) - set(IMPLS))
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; allowed: {list(IMPLS)}")
    sizes = parse_sizes(args.sizes)

    from default_moe.parallel import init_distributed_from_env

    rank, world, _ = init_distributed_from_env()
    if not dist.is_initialized():  # one process: a world of one, for the engines
        # A caller (the device check) may choose the port: parts run back to back.
        port = os.environ.get("MASTER_PORT", "29511")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
        rank, world = 0, 1
    rows = []
    for i, size in enumerate(sizes):
        rows += bench_size(size, args, rank, world, first=i == 0)
        if rank == 0:
            print(f"[bench] EP={world} size {i + 1}/{len(sizes)} done", file=sys.stderr, flush=True)
    if rank == 0:
        dev = (
            f"{torch.cuda.get_device_name()}, {args.dtype}"
            if torch.cuda.is_available()
            else f"CPU ({os.cpu_count()} cores), {args.dtype}, gloo"
        )
        print(f"EP={world}: {world} process(es), {dev}; median of {args.rounds} interleaved rounds x {args.iters}")
        print(table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "device": dev, "args": vars(args), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def table(rows: list) -> str:
    out = [
        "| EP | T/rank | D | F | E | k | implementation | experts | ms / fwd+bwd | tokens/s | expert TFLOP/s | "
        "of peak | / same-run baseline | memory MiB | saved for bwd MiB | host syncs | collectives (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_fraction']:.1%}" if r.get("peak_fraction") is not None else "-"
        base = r.get("baseline") or "ours topk"
        out.append(
            f"| {r['world']} | {r['tokens']} | {r['hidden']} | {r['ffn']} | {r['experts']} | {r['top_k']} | "
            f"{r['name']} | {r.get('experts_kind', '-')} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['expert_tflops']:.2f} | {peak} | {r['ratio_to_ours_topk']:.3f} ({base}) | "
            f"{r['mem_bytes'] / 2**20:.1f} | {r.get('saved_bytes', 0) / 2**20:.1f} | {r.get('host_syncs', '-')} | "
            f"{r['collectives']} ({r['collective_bytes'] / 2**20:.2f} MiB) |"
        )
    return "\n".join(out)


def report(paths: list, out_dir: str) -> None:
    """Merges the EP=1 / EP=2 JSONs into results.md, results.json and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.load(open(p)) for p in paths if os.path.exists(p)]
    rows = [r for run in runs for r in run["rows"]]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(runs, f, indent=1)
    md = [
        "# MoE layer benchmark: ours vs DeepSpeed MoE vs megatron-core",
        "",
        f"Device: {runs[0]['device'] if runs else '-'}. Command: `bash launch/bench_engines.sh`.",
        "",
        table(rows),
        "",
    ]
    summary = []
    for (world, key), group in _groupby(
        rows, lambda r: (r["world"], (r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"]))
    ):
        by = {r["name"]: r for r in group}
        ours = by.get("ours topk")
        if ours is None:
            continue

        def vs(name, inverse=False, by=by, ours=ours):
            if name not in by:
                return "-"
            return f"{(ours['ms'] / by[name]['ms']) if inverse else (by[name]['ms'] / ours['ms']):.2f}"

        default_ratio = f"{by['ours default']['ratio_to_ours_topk']:.3f}" if "ours default" in by else "-"
        summary.append(
            f"| {world} | {':'.join(map(str, key))} | {default_ratio} | {vs('ours topk grouped_mm', True)} | "
            f"{vs('deepspeed cf1.25')} | {vs('deepspeed dropless')} | {vs('megatron-core')} |"
        )
    md += [
        "Speed-ups (time of the other / time of ours topk; > 1: ours faster), the Default overhead, and the "
        "grouped_mm backend's speed-up over the loop (time loop / time grouped_mm):",
        "",
        "| EP | T:D:F:E:k | default / topk | grouped_mm speed-up | DeepSpeed cf1.25 | DeepSpeed dropless | megatron-core |",
        "|---|---|---|---|---|---|---|",
        *summary,
        "",
    ]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    keys = sorted({(r["world"], r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"]) for r in rows})
    names = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(keys)), 3.8))
    width = 0.8 / max(1, len(names))
    for j, n in enumerate(names):
        vals = [
            next(
                (
                    r["tokens_per_s"]
                    for r in rows
                    if r["name"] == n and (r["world"], r["tokens"], r["hidden"], r["ffn"], r["experts"], r["top_k"]) == k
                ),
                0,
            )
            for k in keys
        ]
        ax.bar([i + j * width for i in range(len(keys))], [v / 1e3 for v in vals], width=width, label=n)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(keys))],
        [f"EP{k[0]}\nT{k[1]} D{k[2]}\nF{k[3]} E{k[4]} k{k[5]}" for k in keys],
        fontsize=7,
    )
    ax.set_ylabel("k tokens/s (fwd+bwd, all ranks)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=90)
    plt.close(fig)
    print("\n".join(md))


def _groupby(rows, key):
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out.items()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--report":
        report(sys.argv[3:], sys.argv[2])
    else:
        main()
