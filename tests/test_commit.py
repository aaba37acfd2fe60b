"""The checkpoint commit protocol (`default_moe.manifest`, issue 25): a tag counts only once its
manifest is written, and only while its files match it; resume takes the newest complete tag and
names what it skipped; a named torn tag is refused; retention never deletes the only complete one.
Two gloo ranks split the hashing (each rank writes its own file)."""

import json
import os
import warnings

import pytest

from default_moe import manifest


def _write_tag(ckpt, tag, files, step, commit=True, world=None):
    d = ckpt / tag
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    if commit:
        manifest.commit(str(ckpt), tag, step=step, layout={"world_size": 1})


def _files(step):
    return {"model.pt": bytes([step]) * 1000, f"rank{step % 2}.pt": b"x" * (100 + step), "zero/w/fp32.pt": b"z" * 50}


def test_commit_verify_and_fall_back_from_each_kind_of_damage(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        _write_tag(ckpt, f"step{step}", _files(step), step)
    assert (ckpt / "latest").read_text() == "step4"
    m = json.loads((ckpt / "step4" / manifest.MANIFEST).read_text())
    assert m["step"] == 4 and set(m["files"]) == set(_files(4)) and m["layout"] == {"world_size": 1}
    assert all(manifest.verify(str(ckpt / f"step{s}")) is None for s in (1, 2, 3, 4))

    # A save that did not finish (no manifest; `latest` still names step4) is newer but skipped.
    _write_tag(ckpt, "step5", _files(5), 5, commit=False)
    # Damage: a truncated file, a missing rank file, a manifest whose checksum is wrong.
    with open(ckpt / "step4" / "model.pt", "r+b") as f:
        f.truncate(10)
    os.remove(ckpt / "step3" / "rank1.pt")
    m2 = json.loads((ckpt / "step2" / manifest.MANIFEST).read_text())
    m2["files"]["model.pt"]["sha256"] = "0" * 64
    (ckpt / "step2" / manifest.MANIFEST).write_text(json.dumps(m2))
    assert "no manifest" in manifest.verify(str(ckpt / "step5"))
    assert "model.pt has 10 bytes" in manifest.verify(str(ckpt / "step4"))
    assert "rank1.pt is missing" in manifest.verify(str(ckpt / "step3"))
    assert "does not match its SHA-256" in manifest.verify(str(ckpt / "step2"))

    with pytest.warns(UserWarning) as rec:
        assert manifest.resolve_tag(str(ckpt)) == "step1"
    text = str(rec[0].message)
    for tag, why in (("step5", "no manifest"), ("step4", "truncated"), ("step3", "missing"), ("step2", "SHA-256")):
        assert f"'{tag}'" in text and why in text, text
    assert "resuming from the newest complete checkpoint 'step1'" in text
    # Named explicitly: refused, pointing at the good one; a complete one loads without a warning.
    with pytest.raises(manifest.TornCheckpointError, match="step4 is not complete: model.pt has 10 bytes.*'step1'"):
        manifest.resolve_tag(str(ckpt), "step4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manifest.resolve_tag(str(ckpt), "step1") == "step1"
    # Everything damaged: nothing to resume (has_checkpoint says so, resolve_tag gives None).
    os.remove(ckpt / "step1" / "model.pt")
    with pytest.warns(UserWarning, match="no complete checkpoint is left"):
        assert manifest.resolve_tag(str(ckpt)) is None
    # has_checkpoint (the main job's --auto-resume test before any process group) checks sizes only:
    # step2's bad checksum passes it; resolve_tag's full check does not.
    assert manifest.has_checkpoint(str(ckpt))
    os.remove(ckpt / "step2" / "model.pt")
    assert not manifest.has_checkpoint(str(ckpt))


def test_legacy_folders_and_retention(tmp_path):
    legacy = tmp_path / "legacy"
    _write_tag(legacy, "global_step7", _files(7), 7, commit=False)
    (legacy / "latest").write_text("global_step7")
    assert manifest.has_checkpoint(str(legacy))
    with pytest.warns(UserWarning, match="before default-moe's commit protocol"):
        assert manifest.resolve_tag(str(legacy)) == "global_step7"

    ckpt = tmp_path / "ckpt"
    _write_tag(ckpt, "step1", _files(1), 1)
    _write_tag(ckpt, "step2", _files(2), 2, commit=False)  # torn, older than what follows: deleted
    for step in (3, 4, 5):
        _write_tag(ckpt, f"step{step}", _files(step), step)
    _write_tag(ckpt, "step6", _files(6), 6, commit=False)  # a save in progress: kept
    removed = manifest.prune(str(ckpt), keep_last=2)
    assert sorted(removed) == ["step1", "step2", "step3"]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step4", "step5", "step6"]
    # The checkpoint `latest` names is never deleted, even when damage makes it the only one left.
    (ckpt / "latest").write_text("step4")
    os.remove(ckpt / "step5" / "model.pt")
    assert manifest.prune(str(ckpt), keep_last=1) == []
    # Through commit: keep_last applies after the pointer moved.
    for step in (7, 8, 9):
        _write_tag(ckpt, f"step{step}", _files(step), step, commit=False)
        manifest.commit(str(ckpt), f"step{step}", step=step, keep_last=2)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step8", "step9"]
    assert (ckpt / "latest").read_text() == "step9"


def _two_ranks(rank, world, ckpt):
    import torch.distributed as dist

    tag_dir = os.path.join(ckpt, "step3")
    os.makedirs(tag_dir, exist_ok=True)
    with open(os.path.join(tag_dir, f"rank{rank}.pt"), "wb") as f:
        f.write(bytes([rank]) * (1000 * (rank + 1)))
    manifest.commit(ckpt, "step3", step=3, layout={"world_size": world})
    assert manifest.verify(tag_dir) is None
    m = manifest.read_manifest(tag_dir)
    assert sorted(m["files"]) == ["rank0.pt", "rank1.pt"] and m["files"]["rank1.pt"]["size"] == 2000
    dist.barrier()
    if rank == 1:
        with open(os.path.join(tag_dir, "rank1.pt"), "ab") as f:
            f.write(b"!")
    dist.barrier()
    # Rank 0 decides, both ranks get the same error.
    with pytest.raises(manifest.TornCheckpointError, match="rank1.pt has 2001 bytes"):
        manifest.resolve_tag(ckpt, "step3", collective=True)


@pytest.mark.distributed
def test_commit_over_two_ranks(tmp_path):
    from dist import run_distributed

    run_distributed(_two_ranks, 2, str(tmp_path / "ckpt"))


def test_rollback_the_pointer_is_the_truth_and_retention_follows_commit_order(tmp_path):
    """Issue 37: an operator rolls back past a loss spike (resume step200 explicitly, train on,
    save 210 and 220). The next automatic resume takes what `latest` names (220), not the
    abandoned branch's highest step (300); retention keeps the newest N in commit order plus the
    pointed one; a torn pointed checkpoint falls back to the newest complete one in commit order,
    saying which and why."""
    ckpt = tmp_path / "ckpt"
    for step in (100, 200, 300):
        _write_tag(ckpt, f"global_step{step}", _files(step % 7), step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manifest.resolve_tag(str(ckpt), "global_step200") == "global_step200"  # the rollback
    for step in (210, 220):
        _write_tag(ckpt, f"global_step{step}", _files(step % 7), step)
    assert (ckpt / "latest").read_text() == "global_step220"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert manifest.resolve_tag(str(ckpt)) == "global_step220"  # was global_step300 (by step)
    assert manifest.prune(str(ckpt), keep_last=2) == ["global_step300", "global_step200", "global_step100"]
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["global_step210", "global_step220"]
    with open(ckpt / "global_step220" / "model.pt", "r+b") as f:
        f.truncate(3)
    with pytest.warns(UserWarning) as rec:
        assert manifest.resolve_tag(str(ckpt)) == "global_step210"
    text = str(rec[0].message)
    assert "latest names 'global_step220', which is not complete" in text and "truncated" in text, text
    assert "resuming from the newest complete checkpoint 'global_step210' (in commit order)" in text
    # A pointer file that names no folder of this checkpoint is data too: refused by name.
    (ckpt / "latest").write_text("../elsewhere")
    with pytest.warns(UserWarning, match="not a tag folder name"):
        assert manifest.resolve_tag(str(ckpt)) == "global_step210"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("craft", ["absolute", "dotdot", "device", "link_out", "link_in", "size", "bad_size", "bad_hash"])
def test_crafted_manifest_entries_are_refused_by_name(tmp_path, craft):
    """A manifest is data from disk: an absolute name, `..`, a device file, a link (out of or
    inside the folder), a size mismatch or a malformed entry make the checkpoint incomplete with
    an error naming the entry; nothing outside the folder is opened, and /dev/zero is never hashed
    (it made a collective resume hang every rank)."""
    ckpt = tmp_path / "ckpt"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"o" * 10)
    _write_tag(ckpt, "step1", _files(1), 1)
    _write_tag(ckpt, "step2", _files(2), 2)
    tag_dir = ckpt / "step2"
    m = json.loads((tag_dir / manifest.MANIFEST).read_text())
    good = {"size": 10, "sha256": "a" * 64}
    name, needle = {
        "absolute": (str(outside), "outside the checkpoint folder"),
        "dotdot": ("../../outside.bin", "outside the checkpoint folder"),
        "device": ("/dev/zero", "outside the checkpoint folder"),
        "link_out": ("devzero", "resolves outside the checkpoint folder"),
        "link_in": ("alias.pt", "not a regular file"),
        "size": ("model.pt", "has 1000 bytes, the manifest says 10"),
        "bad_size": ("model.pt", "no valid size"),
        "bad_hash": ("model.pt", "no valid SHA-256"),
    }[craft]
    if craft == "link_out":
        os.symlink("/dev/zero", tag_dir / "devzero")
    if craft == "link_in":
        os.symlink("model.pt", tag_dir / "alias.pt")
        good = {"size": 1000, "sha256": m["files"]["model.pt"]["sha256"]}
    entry = dict(good)
    if craft == "bad_size":
        entry["size"] = "1000"
    if craft == "bad_hash":
        entry = {"size": 1000, "sha256": None}
    m["files"][name] = entry
    (tag_dir / manifest.MANIFEST).write_text(json.dumps(m))
    why = manifest.verify(str(tag_dir))
    assert why is not None and needle in why and (name in why or craft == "link_out"), why
    with pytest.raises(manifest.TornCheckpointError, match="step2 is not complete"):
        manifest.resolve_tag(str(ckpt), "step2")
    with pytest.warns(UserWarning, match="latest names 'step2', which is not complete"):
        assert manifest.resolve_tag(str(ckpt)) == "step1"


def test_retention_never_deletes_through_a_link_and_says_when_a_delete_fails(tmp_path):
    """A symlinked tag folder (`archived -> /elsewhere/step050`) is neither counted nor deleted;
    a delete that fails warns with the path instead of silently leaving a half-deleted folder."""
    import subprocess

    elsewhere = tmp_path / "elsewhere"
    _write_tag(elsewhere, "step050", _files(5), 50)
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3):
        _write_tag(ckpt, f"step{step}", _files(step), step)
    os.symlink(elsewhere / "step050", ckpt / "archived")
    os.utime(elsewhere / "step050", None)
    assert manifest.prune(str(ckpt), keep_last=1) == ["step2", "step1"]
    assert (elsewhere / "step050" / manifest.MANIFEST).exists() and manifest.verify(str(ckpt / "archived")) is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["archived", "latest", "step3"]
    # A file that cannot be deleted (immutable): warned with its path.
    for step in (4, 5):
        _write_tag(ckpt, f"step{step}", _files(step), step)
    stuck = ckpt / "step3" / "model.pt"
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem that supports it)")
    try:
        with pytest.warns(UserWarning, match=f"could not delete {ckpt / 'step3'}.*{stuck}"):
            assert manifest.prune(str(ckpt), keep_last=1) == ["step4"]
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
