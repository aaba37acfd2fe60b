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
