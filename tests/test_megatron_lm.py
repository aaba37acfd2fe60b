"""The real Megatron-LM pretrain_gpt.py, patched with our diff as a user would, under torchrun.

The Megatron-LM checkout is `$DEFAULT_MOE_MEGATRON_LM` (a checkout root holding pretrain_gpt.py,
or a folder of refs named like `core_r0.19.0`), by default `../shared/megatron-lm` beside this
repository; the ref is chosen by the installed megatron-core (0.16 -> core_v0.16.1, 0.19 ->
core_r0.19.0) and the diff by the ref. The checkout's files are copied to a temporary folder,
`git apply patches/megatron-lm-<ref>.diff` is run there, and pretrain_gpt.py trains a tiny
GPT-MoE on megatron's mock data on 2 gloo processes (EP 2); the CPU shims come from a test-only
sitecustomize (tests/megatron_lm_site), never from the diff or the plugin.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
pytestmark = [pytest.mark.megatron, pytest.mark.distributed]

ROOT = Path(__file__).resolve().parents[1]
REFS = {(0, 16): "core_v0.16.1", (0, 19): "core_r0.19.0"}
FLAGS = (
    "--distributed-backend gloo --transformer-impl local --mock-data --tokenizer-type NullTokenizer "
    "--vocab-size 1024 --no-gradient-accumulation-fusion --use-cpu-initialization --no-masked-softmax-fusion "
    "--no-bias-gelu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --num-layers 2 "
    "--hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 "
    "--global-batch-size 4 --num-experts 4 --moe-router-topk 2 --moe-router-pre-softmax --moe-ffn-hidden-size 64 "
    "--moe-token-dispatcher-type alltoall --expert-model-parallel-size 2 --lr 1e-3 --lr-decay-style constant "
    "--log-interval 1 --eval-iters 0 --eval-interval 1000 --clip-grad 0 --hidden-dropout 0 --attention-dropout 0 "
    "--ckpt-format torch"
).split()


def _ref() -> str:
    from default_moe.integrations import megatron_compat as compat

    ref = REFS.get(compat.MCORE)
    if ref is None:
        pytest.skip(f"no Megatron-LM ref is paired with megatron-core {compat.MCORE_VERSION} here")
    return ref


def _checkout(ref: str) -> Path:
    if "DEFAULT_MOE_MEGATRON_LM" in os.environ:
        bases = [Path(os.environ["DEFAULT_MOE_MEGATRON_LM"])]
    else:  # beside this repository; else where the development machines keep it
        bases = [ROOT.parent / "shared" / "megatron-lm", Path("/work/shared/megatron-lm")]
    for base in bases:
        for candidate in (base, base / ref):
            if (candidate / "pretrain_gpt.py").is_file():
                return candidate
    pytest.skip(f"no Megatron-LM checkout at {' or '.join(map(str, bases))} (set DEFAULT_MOE_MEGATRON_LM to a checkout of {ref})")


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    """(plain, patched): copies of the user's checkout, the second with our diff applied by git apply."""
    ref = _ref()
    src = _checkout(ref)
    base = tmp_path_factory.mktemp("megatron-lm")
    plain, patched = base / "plain", base / "patched"
    shutil.copytree(src, plain)
    shutil.copytree(src, patched)
    diff = ROOT / "patches" / f"megatron-lm-{ref}.diff"
    out = subprocess.run(["git", "apply", str(diff)], cwd=patched, capture_output=True, text=True)
    assert out.returncode == 0, f"git apply {diff.name} failed on {ref}: {out.stderr}"
    assert "default_moe_megatron" in (patched / "pretrain_gpt.py").read_text()
    return plain, patched


def _run(checkout: Path, *flags: str) -> list:
    env = {
        **os.environ,
        "DEFAULT_MOE_MEGATRON_CPU_SHIMS": "1",
        "DEFAULT_MOE_LAUNCH_DIR": str(ROOT / "launch"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "megatron_lm_site"), str(checkout)]),
        "TORCHDYNAMO_DISABLE": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "pretrain_gpt.py",
        *FLAGS,
        *flags,
    ]
    out = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return [(int(i), float(v)) for i, v in re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)", log)]


def _defaults(ckpt: Path, iteration: int) -> dict:
    """{rank folder: {key: D}} from a --ckpt-format torch checkpoint (one file per EP rank)."""
    import torch

    found = {}
    for f in sorted((ckpt / f"iter_{iteration:07d}").glob("mp_rank_*/model_optim_rng.pt")):
        # Our own test checkpoint: Megatron-LM stores its argparse Namespace in it.
        model = torch.load(f, map_location="cpu", weights_only=False)["model"]
        found[f.parent.name] = {k: v for k, v in model.items() if k.endswith("defaults.defaults_ED")}
    return found


def test_patched_pretrain_gpt_trains_saves_and_resumes(megatron_lm, tmp_path):
    """Default MoE through the diff: finite losses, D non-zero and identical on both EP ranks, D in
    the checkpoint, and a --load resume continues exactly like an uninterrupted run."""
    import torch

    _, patched = megatron_lm
    default = ["--moe-router-type", "default", "--moe-default-beta", "0.9"]
    # Interrupted at 4 of 6 iterations (as a job that hit its time limit), with a checkpoint.
    first = _run(
        patched, *default, "--train-iters", "6", "--exit-interval", "4", "--save", str(tmp_path / "a"), "--save-interval", "4"
    )
    assert [i for i, _ in first] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in first), first
    saved = _defaults(tmp_path / "a", 4)
    assert len(saved) == 2, saved.keys()  # one file per expert-parallel rank
    (r0, d0), (r1, d1) = saved.items()
    assert sorted(d0) == ["decoder.layers.0.mlp.defaults.defaults_ED", "decoder.layers.1.mlp.defaults.defaults_ED"]
    for key in d0:
        assert d0[key].shape == (4, 64) and d0[key].abs().sum() > 0, key
        assert torch.equal(d0[key], d1[key]), f"{key} differs between {r0} and {r1}"

    # Plain Megatron-LM's own resume is exact for the next iteration only (measured with
    # --moe-router-type topk: iteration 6 differs after a --load at 4), so both runs stop at 5.
    straight = _run(
        patched, *default, "--train-iters", "6", "--exit-interval", "5", "--save", str(tmp_path / "c"), "--save-interval", "5"
    )
    resumed = _run(
        patched,
        *default,
        "--train-iters",
        "6",
        "--exit-interval",
        "5",
        "--load",
        str(tmp_path / "a"),
        "--save",
        str(tmp_path / "b"),
        "--save-interval",
        "5",
    )
    assert straight[:4] == first
    assert resumed == straight[4:5], (resumed, straight)  # D restored: the step after the resume is the same
    after, want = _defaults(tmp_path / "b", 5), _defaults(tmp_path / "c", 5)
    for rank in after:
        for key in after[rank]:
            assert torch.equal(after[rank][key], want[rank][key]), (rank, key)
            assert not torch.equal(after[rank][key], d0[key])  # the EMA moved on after the resume


def test_patched_topk_is_plain_megatron_and_routers_run(megatron_lm):
    """--moe-router-type topk through the diff reproduces unpatched Megatron-LM's losses exactly;
    default differs (it is active); the token-id router (hash) gets the built model's input ids."""
    plain, patched = megatron_lm
    base = _run(plain, "--train-iters", "3")
    topk = _run(patched, "--train-iters", "3", "--moe-router-type", "topk")
    assert topk == base and len(base) == 3
    default = _run(patched, "--train-iters", "3", "--moe-router-type", "default")
    assert default != base
    hashed = _run(patched, "--train-iters", "3", "--moe-router-type", "hash")
    assert len(hashed) == 3 and all(math.isfinite(v) for _, v in hashed) and hashed != base
