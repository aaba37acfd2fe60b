"""Checkpoints are data, not code (issue 13): a crafted pickle whose payload touches a marker file is
refused by every reader — `checkpoint.load`, `checkpoint-info`, `convert-deepspeed`, the
DeepSpeed resume path — and the marker never appears; old pickled-object checkpoints load only
through the explicit trusted upgrade; `extra` must be JSON values; the token cache holds no pickles."""

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from default_moe import MoEConfig, MoELayer, checkpoint, manifest

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(hidden_size=8, num_experts=4, ffn_hidden_size=16)


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_file(path, marker, payload_key="extra"):
    good = {"format": checkpoint.FORMAT, "model": {}, "moe_configs": {}, "extra": {}}
    good[payload_key] = {"x": Payload(marker)}
    torch.save(good, path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "default_moe.cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(MoELayer(MoEConfig(**BASE)))


def test_the_payload_runs_when_unpickled_unrestricted(tmp_path):
    """The test's payload is real: plain unpickling does touch the marker."""
    marker = tmp_path / "marker"
    evil_file(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_load_and_checkpoint_info_refuse_a_malicious_pickle(tmp_path):
    marker = tmp_path / "marker"
    evil_file(tmp_path / "evil.pt", marker)
    with pytest.raises(checkpoint.UntrustedCheckpointError, match="could run code, so it is refused"):
        checkpoint.load(model(), str(tmp_path / "evil.pt"))
    out = cli("checkpoint-info", tmp_path / "evil.pt")
    assert out.returncode == 2 and "could run code" in out.stderr and "checkpoint-upgrade --trust-pickle" in out.stderr
    assert not marker.exists()


def test_convert_deepspeed_refuses_malicious_module_and_expert_files(tmp_path):
    marker = tmp_path / "marker"
    tag = tmp_path / "ds" / "step1"
    tag.mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("step1")
    m = model()
    expert = {
        "ep_size": 1,
        "ep_rank": 0,
        "experts": {"0": {n: p.detach() for n, p in m[0].experts.named_parameters()}},
        "moe_configs": {"0": m[0].config.to_dict()},
    }
    torch.save(expert, tag / "default_moe_experts_ep1_rank0.pt")
    torch.save({"module": {"x": Payload(marker)}}, tag / "mp_rank_00_model_states.pt")
    out = cli("convert-deepspeed", tmp_path / "ds", tmp_path / "out.pt")
    assert out.returncode == 2 and "posix.system" in out.stderr and "refused" in out.stderr, out.stderr
    torch.save({"module": {}, "x": Payload(marker)}, tag / "default_moe_experts_ep1_rank0.pt")
    out = cli("convert-deepspeed", tmp_path / "ds", tmp_path / "out.pt")
    assert out.returncode == 2 and "refused" in out.stderr, out.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_old_pickled_checkpoints_load_only_through_the_trusted_upgrade(tmp_path):
    m = model()
    sd = checkpoint.consolidated_state_dict(m)
    old = tmp_path / "old.pt"
    # What an older version could write: objects beyond plain data in `extra`.
    torch.save(
        {
            "format": checkpoint.FORMAT,
            "model": sd,
            "moe_configs": {"0": m[0].config.to_dict()},
            "extra": {"step": 7, "when": datetime.date(2026, 1, 2)},
        },
        old,
    )
    with pytest.raises(checkpoint.UntrustedCheckpointError, match="checkpoint-upgrade --trust-pickle"):
        checkpoint.load(model(), str(old))
    out = cli("checkpoint-upgrade", old, tmp_path / "new.pt")
    assert out.returncode == 2 and "--trust-pickle" in out.stderr and not (tmp_path / "new.pt").exists()
    out = cli("checkpoint-upgrade", "--trust-pickle", old, tmp_path / "new.pt")
    assert out.returncode == 0, out.stderr
    torch.load(tmp_path / "new.pt", weights_only=True)  # data only now
    fresh = torch.nn.Sequential(MoELayer(MoEConfig(**BASE)))
    extra = checkpoint.load(fresh, str(tmp_path / "new.pt"))
    assert extra == {"step": 7, "when": "2026-01-02"}
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # The trusted path in the API, with a warning.
    with pytest.warns(UserWarning, match="trust_pickle=True"):
        assert checkpoint.load(model(), str(old), trust_pickle=True)["step"] == 7


def test_extra_must_be_json_values(tmp_path):
    path = tmp_path / "ck.pt"
    with pytest.raises(ValueError, match=r"extra\['when'\] is a PosixPath"):
        checkpoint.save(model(), str(path), extra={"step": 1, "when": Path("/x")})
    assert not path.exists()
    checkpoint.save(model(), str(path), extra={"step": 1, "hist": [[1, 2.5]], "name": None})
    torch.load(path, weights_only=True)
    assert checkpoint.load(model(), str(path))["hist"] == [[1, 2.5]]


def test_token_cache_refuses_pickled_arrays(tmp_path, monkeypatch):
    from default_moe import data

    monkeypatch.setenv("DEFAULT_MOE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world\n\nagain\n")
    tokens = data.load_tokens(str(tmp_path / "docs"))
    cached = next((tmp_path / "cache").glob("tokens-*.npy"))
    np.save(cached, np.array([Payload(tmp_path / "marker")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="is refused, never unpickled"):
        data.load_tokens(str(tmp_path / "docs"))
    assert not (tmp_path / "marker").exists() and len(tokens) > 0


@pytest.mark.distributed
def test_main_job_resume_refuses_a_planted_pickle(tmp_path):
    """The main job's --resume goes through DeepSpeed's unrestricted unpickling: our hook checks the
    checkpoint's files first. A crafted optimizer file is refused and its payload never runs."""
    job = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "launch/train.py",
        "--steps",
        "2",
        "--micro-batch",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(job, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "ckpt" / "step2"
    victim = next(ckpt.glob("zero_pp_rank_1_*optim_states.pt"))
    shutil.copy(victim, tmp_path / "orig.pt")
    torch.save({"x": Payload(tmp_path / "marker")}, victim)
    # The commit manifest already catches the swap (a file that does not match its checksum)...
    assert "(truncated or rewritten)" in manifest.verify(str(ckpt))  # a different size: caught before hashing
    # ...so the attacker rewrites the manifest too: the trust check still refuses the file.
    m = json.loads((ckpt / manifest.MANIFEST).read_text())
    m["files"][victim.name] = {"size": victim.stat().st_size, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
    (ckpt / manifest.MANIFEST).write_text(json.dumps(m))
    assert manifest.verify(str(ckpt)) is None
    again = subprocess.run(
        job[:-2] + ["--steps", "3", "--run-dir", str(tmp_path / "run"), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0
    assert "posix.system" in again.stderr and "refused" in again.stderr, again.stderr[-3000:]
    assert not (tmp_path / "marker").exists()


def test_the_check_covers_every_file_deepspeed_reads_and_the_load_is_the_check(tmp_path):
    """ZeRO/universal checkpoints keep .pt files in subfolders (a crafted `zero/w/fp32.pt` ran its
    payload before); `latest_universal` names the tag DeepSpeed loads with load_universal; and the
    loader itself is the weights-only unpickler with DeepSpeed's allow-list, so a file swapped
    after the check is refused too."""
    marker = tmp_path / "marker"
    tag = tmp_path / "ds" / "global_step2"
    (tag / "zero" / "w").mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, tag / "mp_rank_00_model_states.pt")
    torch.save({"fp32": Payload(marker)}, tag / "zero" / "w" / "fp32.pt")
    with pytest.raises(checkpoint.UntrustedCheckpointError, match="zero/w/fp32.pt holds Python objects"):
        checkpoint.check_deepspeed_files(str(tag))
    (tmp_path / "ds" / "latest").write_text("global_step1")
    (tmp_path / "ds" / "latest_universal").write_text("global_step2")
    assert checkpoint.latest_tag(str(tmp_path / "ds")) == "global_step1"
    assert checkpoint.latest_tag(str(tmp_path / "ds"), universal=True) == "global_step2"
    # The load refuses on its own (no check before it), and a clean DeepSpeed-style file loads.
    with pytest.raises(checkpoint.UntrustedCheckpointError, match="could run code"):
        checkpoint.load_deepspeed_file(str(tag / "zero" / "w" / "fp32.pt"))
    assert torch.equal(checkpoint.load_deepspeed_file(str(tag / "mp_rank_00_model_states.pt"))["module"]["w"], torch.ones(2))
    assert not marker.exists()
