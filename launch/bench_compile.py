"""torch.compile readiness of the layer, measured on CPU: graphs and graph breaks
(`torch._dynamo.explain`), new graphs compiled per training step over steps whose routing differs
(recompiles), the compiled step time against eager after warm-up (inductor, default mode), and aten
ops per forward+backward (each a kernel launch on a GPU).

    python launch/bench_compile.py [--steps 20] [--threads 1]
    python launch/bench_compile.py --main-job [--steps 60]    # the main job, eager vs --compile true
    bash launch/torchrun_local.sh launch/bench_compile.py      # EP = number of ranks (2 here)

Prints one table; same-run ratios only. `--main-job` runs `launch/train.py` (one process, one
thread, its default 2048 tokens per step) eagerly and with per-block compile, and prints the
median step time after warm-up, the compiled graphs over the run and the loss difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
from default_moe import MoEConfig, MoELayer  # noqa: E402


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


DEVICE = torch.device("cpu")


GATES = {
    "softmax": {},
    "dsv3-sigmoid-bias": dict(score_function="sigmoid", normalize_topk=True, expert_bias=True),
}


EP = 1  # the world size when launched on several ranks (torchrun): expert parallelism over all


def build(router, D, F, E, k, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=k, router=router, ep_size=EP, **kw)
    return MoELayer(cfg).to(DEVICE)


def graph_table(D, F, E, k, T) -> list:
    """Graphs and breaks per experts backend and gate form (explain only); printed, and returned
    as rows."""
    rows = []
    print("| experts backend, dtype | gate | router | graphs | breaks | break reasons |")
    print("|---|---|---|---|---|---|")
    for backend, dtype in (("loop", torch.float32), ("grouped_mm", torch.bfloat16)):
        for gate, kw in GATES.items():
            for router in ("topk", "default"):
                torch._dynamo.reset()
                layer = build(router, D, F, E, k, experts_backend=backend, **kw).to(dtype)
                ex = torch._dynamo.explain(layer)(torch.randn(T, D, device=DEVICE, dtype=dtype))
                reasons = ", ".join(sorted({b.reason.splitlines()[0] for b in ex.break_reasons})) or "-"
                print(
                    f"| {backend}, {str(dtype)[6:]} | {gate} | {router} | {ex.graph_count} | {ex.graph_break_count} | {reasons} |"
                )
                rows.append(
                    {
                        "backend": backend,
                        "dtype": str(dtype)[6:],
                        "gate": gate,
                        "router": router,
                        "graphs": ex.graph_count,
                        "breaks": ex.graph_break_count,
                        "break_reasons": reasons,
                    }
                )
    return rows


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    if EP > 1:
        torch.distributed.barrier()  # every rank's step is timed over the same interval


def train_steps(layer, fn, steps, T, D, seed=1):
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    rank = torch.distributed.get_rank() if EP > 1 else 0
    g = torch.Generator().manual_seed(seed + rank)  # other tokens on every rank
    new_graphs, times = [], []
    for _ in range(steps):
        x = torch.randn(T, D, generator=g).to(DEVICE)  # other tokens: other routing, other split sizes
        before = counters["stats"]["unique_graphs"]
        _sync()
        t0 = time.perf_counter()
        fn(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
    return new_graphs, times


def ops_per_step(router, T, D, F, E, k):
    layer = build(router, D, F, E, k)
    x = torch.randn(T, D, device=DEVICE)
    layer(x).square().mean().backward()  # warm (lazy state)
    with _CountOps() as c:
        layer(x).square().mean().backward()
    return c.n


def main_job(steps: int, router: str, repeats: int) -> int:
    """The main job eagerly and with `--compile true`, same seed: step time, graphs, losses.

    The two jobs of a repeat run at the same time, one thread each on its own core, so both see
    the same machine (this shared 2-core host's step times drift by 10-20% between minutes);
    each repeat's ratio is of medians after warm-up, and the median over repeats is reported.
    """
    import json
    import os
    import socket
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    warm = 5
    rows = []
    for rep in range(repeats):
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            procs = {}
            for name, extra in (("eager", []), ("compiled", ["--compile", "true"])):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                env = {
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "RANK": "0",
                    "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1",
                    "LOCAL_WORLD_SIZE": "1",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port),
                }
                cmd = [
                    sys.executable,
                    str(root / "launch" / "train.py"),
                    "--router",
                    router,
                    "--ep-size",
                    "1",
                    "--run-dir",
                    str(Path(tmp) / name),
                    "--steps",
                    str(steps),
                    "--eval-every",
                    str(steps),
                    "--ckpt-every",
                    str(steps),
                    "--log-every",
                    "1",
                    *extra,
                ]
                procs[name] = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL)
            for name, proc in procs.items():
                if proc.wait() != 0:
                    raise SystemExit(f"the {name} main job failed (exit {proc.returncode})")
                out[name] = json.loads((Path(tmp) / name / "metrics.json").read_text())["history"]
        t = {n: statistics.median(h["step_time"][warm:]) for n, h in out.items()}
        graphs = [g for _, g in out["compiled"]["compiled_graphs"]]
        diff = max(abs(a[1] - b[1]) for a, b in zip(out["eager"]["train"], out["compiled"]["train"]))
        rows.append((rep, t["eager"], t["compiled"], graphs, diff))
    print(
        "| router | repeat | steps | eager step ms | compiled step ms | eager/compiled | graphs after step 1, 5, last | "
        "max loss difference |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for rep, te, tc, graphs, diff in rows:
        print(
            f"| {router} | {rep + 1} | {steps} | {te * 1e3:.0f} | {tc * 1e3:.0f} | {te / tc:.2f} | "
            f"{graphs[0]}, {graphs[4]}, {graphs[-1]} | {diff:.1e} |"
        )
    ratio = statistics.median(te / tc for _, te, tc, _, _ in rows)
    print(
        f"eager/compiled, median of {repeats} repeats: {ratio:.2f}. Main job (configs/gpt_tiny.json, 2048 tokens/step), "
        f"1 process and 1 thread per job, the two jobs of a repeat side by side, medians after step {warm}, "
        f"torch {torch.__version__}"
    )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size", default="2048,128,256,8,2", help="T,D,F,E,k of the compile runs")
    ap.add_argument("--ops-size", default="4096,256,512,8,2", help="T,D,F,E,k of the op count")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU device check runs it)")
    ap.add_argument("--main-job", action="store_true", help="time the main job eager vs --compile true instead")
    ap.add_argument("--router", default="default", help="the main job's router (--main-job)")
    ap.add_argument("--repeats", type=int, default=3, help="eager/compiled pairs (--main-job)")
    ap.add_argument("--json", default=None, help="also write the rows (and the graph table) here as JSON")
    args = ap.parse_args(argv)
    if args.main_job:
        return main_job(args.steps, args.router, args.repeats)
    global DEVICE, EP
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rank = 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from default_moe.parallel import init_distributed_from_env

        rank, EP, _ = init_distributed_from_env()
    T, D, F, E, k = map(int, args.size.split(","))
    rows = []
    for router in ("topk", "default"):
        torch._dynamo.reset()
        ex = torch._dynamo.explain(build(router, D, F, E, k))(torch.randn(T, D, device=DEVICE))
        torch._dynamo.reset()
        counters.clear()
        compiled = build(router, D, F, E, k)
        new_graphs, t_comp = train_steps(compiled, torch.compile(compiled), args.steps, T, D)
        eager = build(router, D, F, E, k)
        _, t_eager = train_steps(eager, eager, args.steps, T, D)
        ops = ops_per_step(router, *map(int, args.ops_size.split(",")))
        w = args.warmup
        rows.append(
            {
                "router": router,
                "graphs": ex.graph_count,
                "breaks": ex.graph_break_count,
                "new_graphs_per_step": new_graphs,
                "recompiles_after_warmup": sum(new_graphs[w:]),
                "eager_ms": statistics.median(t_eager[w:]) * 1e3,
                "compiled_ms": statistics.median(t_comp[w:]) * 1e3,
                "first_steps_s": [round(t, 2) for t in t_comp[:w]],
                "ops": ops,
                "break_reasons": sorted({b.reason.splitlines()[0] for b in ex.break_reasons}),
            }
        )
    if rank != 0:
        return 0
    print(
        f"| router | graphs | breaks | new graphs per step (first {args.steps}) | graphs after step {args.warmup} | "
        f"eager ms | compiled ms | eager/compiled | aten ops fwd+bwd ({args.ops_size}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['router']} | {r['graphs']} | {r['breaks']} | {' '.join(map(str, r['new_graphs_per_step']))} | "
            f"{r['recompiles_after_warmup']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
            f"{r['eager_ms'] / r['compiled_ms']:.2f} | {r['ops']} |"
        )
    print(
        f"Default/TopK aten ops: {rows[1]['ops'] / rows[0]['ops']:.3f}; break reasons: "
        + "; ".join(f"{r['router']}: {', '.join(r['break_reasons'])}" for r in rows)
    )
    print(f"T,D,F,E,k = {args.size} (per rank), EP {EP}, {DEVICE}, {args.threads} thread(s), torch {torch.__version__}")
    table = []
    if EP == 1:  # (with EP the loop's split sizes and the all-to-all's break the graph alike)
        print()
        table = graph_table(D, F, E, k, T)
    if args.json:
        import json

        meta = {"size": args.size, "ep": EP, "device": str(DEVICE), "threads": args.threads, "torch": torch.__version__}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows, "graph_table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
