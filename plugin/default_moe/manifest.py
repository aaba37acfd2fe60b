"""Crash-consistent checkpoint folders: a commit protocol, a manifest, and resume from the newest
complete checkpoint.

A checkpoint folder `CKPT/` holds one sub-folder per tag (`CKPT/step300/`) and a pointer file
`CKPT/latest` naming the tag to resume from (DeepSpeed's layout). A save is committed in order:

1. every rank writes its files into `CKPT/<tag>/` (DeepSpeed's own, the expert and D files);
2. a barrier; the ranks fsync the files (split among them) and hash them (SHA-256, sizes);
3. rank 0 writes `CKPT/<tag>/default_moe_manifest.json` atomically (temporary name, fsync,
   `os.replace`, fsync of the folder): the files with sizes and hashes, the step and the layout;
4. only then rank 0 points `latest` at the tag (atomically), and deletes checkpoints beyond
   `keep_last` (never the one `latest` names);
5. a barrier.

A tag folder without a manifest, or whose files do not match it (missing, truncated, altered),
does not exist for resume: `resolve_tag` picks the newest complete checkpoint and warns naming each
newer one it skipped and why; a tag named explicitly that is torn is refused. A kill at any instant
therefore costs at most the steps since the last complete checkpoint.

Folders written before the protocol or by DeepSpeed alone (no manifest in any tag) are loaded from
`latest` (or the named tag) as before, with a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

MANIFEST = "default_moe_manifest.json"
MANIFEST_FORMAT = "default-moe-manifest-v1"
POINTER = "latest"
_CHUNK = 1 << 22


class TornCheckpointError(ValueError):
    """An explicitly named checkpoint is incomplete (a save was interrupted) or damaged."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def fsync_dir(path: str) -> None:
    """Makes a rename or a new file in `path` durable (the folder entry itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Writes `path` so that a reader (or a crash) sees the old content or the new, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _hash_file(path: str, fsync: bool) -> Tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())  # flushes the inode whoever wrote it (Linux)
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


def _payload_files(tag_dir: str) -> List[str]:
    """The files of a tag folder a resume reads (relative, sorted): all but the manifest and
    temporary files of a write in progress."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            if name == MANIFEST or ".tmp" in name:
                continue
            out.append(os.path.relpath(os.path.join(root, name), tag_dir))
    return sorted(out)


def commit(
    ckpt_dir: str,
    tag: str,
    step: int,
    layout: Optional[Dict[str, Any]] = None,
    keep_last: int = 0,
    save_latest: bool = True,
    group=None,
) -> None:
    """Commits the files every rank wrote into `ckpt_dir/tag` (collective when distributed: all
    ranks call it after writing their files).

    Args:
        step: the training step the checkpoint holds (recorded in the manifest).
        layout: the parallel layout it was written at (world size, EP size, ...), recorded.
        keep_last: keep this many complete checkpoints (0: all); older ones are deleted after
            the pointer moved. The checkpoint `latest` names is never deleted.
        save_latest: point `latest` at this tag (DeepSpeed's argument of the same name).
    """
    tag_dir = os.path.join(ckpt_dir, str(tag))
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if _distributed() else (0, 1)
    if world > 1:
        dist.barrier(group=group)  # every rank's files are written (renamed into place)
    files = _payload_files(tag_dir) if rank == 0 else None
    if world > 1:
        box = [files]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        files = box[0]
    # Ranks split the fsync + hashing (a shared filesystem, as DeepSpeed's layout assumes); a file
    # this rank cannot see is left to rank 0.
    mine = {
        f: _hash_file(os.path.join(tag_dir, f), fsync=True)
        for f in files[rank::world]
        if os.path.exists(os.path.join(tag_dir, f))
    }
    if world > 1:
        parts: List[Any] = [None] * world
        dist.all_gather_object(parts, mine, group=group)
    else:
        parts = [mine]
    if rank == 0:
        entries = {f: {"size": size, "sha256": digest} for part in parts for f, (size, digest) in part.items()}
        for f in files:
            if f not in entries:
                size, digest = _hash_file(os.path.join(tag_dir, f), fsync=True)
                entries[f] = {"size": size, "sha256": digest}
        for root, _, _ in os.walk(tag_dir):
            fsync_dir(root)
        manifest = {
            "format": MANIFEST_FORMAT,
            "tag": str(tag),
            "step": int(step),
            "time": time.time(),
            "layout": layout or {},
            "files": {f: entries[f] for f in files},
        }
        atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1))
        if save_latest:
            atomic_write_text(os.path.join(ckpt_dir, POINTER), str(tag))
        if keep_last > 0:
            prune(ckpt_dir, keep_last)
    if world > 1:
        dist.barrier(group=group)


def read_manifest(tag_dir: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def verify(tag_dir: str, hashes: bool = True) -> Optional[str]:
    """Why the checkpoint in `tag_dir` is not complete, or None when it is (every file in its
    manifest present with its size and, with `hashes`, its SHA-256)."""
    if not os.path.isdir(tag_dir):
        return "no such folder"
    if not os.path.exists(os.path.join(tag_dir, MANIFEST)):
        return "no manifest (the save did not finish)"
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return f"{MANIFEST} is unreadable"
    for name, entry in manifest["files"].items():
        path = os.path.join(tag_dir, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if hashes and _hash_file(path, fsync=False)[1] != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (altered or corrupt)"
    return None


def _tags_newest_first(ckpt_dir: str) -> List[str]:
    """Tag folders, newest first: by the manifest's step, else the last number in the name, then
    the folder's modification time (a torn save has no manifest)."""

    def key(tag):
        manifest = read_manifest(os.path.join(ckpt_dir, tag))
        if manifest is not None:
            step = manifest["step"]
        else:
            nums = re.findall(r"\d+", tag)
            step = int(nums[-1]) if nums else -1
        return (step, os.path.getmtime(os.path.join(ckpt_dir, tag)))

    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=key, reverse=True)


def _legacy(ckpt_dir: str) -> bool:
    """Written before the protocol (or by DeepSpeed alone): no manifest in any tag folder."""
    return not any(os.path.exists(os.path.join(ckpt_dir, t, MANIFEST)) for t in _tags_newest_first(ckpt_dir))


def _pointer(ckpt_dir: str) -> Optional[str]:
    try:
        with open(os.path.join(ckpt_dir, POINTER)) as f:
            return f.read().strip() or None
    except OSError:
        return None


def newest_complete(ckpt_dir: str, hashes: bool = True) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """(The newest complete checkpoint's tag or None, [(newer tag skipped, why)])."""
    skipped = []
    for tag in _tags_newest_first(ckpt_dir):
        why = verify(os.path.join(ckpt_dir, tag), hashes=hashes)
        if why is None:
            return tag, skipped
        skipped.append((tag, why))
    return None, skipped


def has_checkpoint(ckpt_dir: str) -> bool:
    """Whether a resume from `ckpt_dir` finds something (cheap: sizes only; `resolve_tag` checks
    the hashes)."""
    if _legacy(ckpt_dir):
        return _pointer(ckpt_dir) is not None
    return newest_complete(ckpt_dir, hashes=False)[0] is not None


def _resolve_here(ckpt_dir: str, tag: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(tag, warning) on this process; raises for a torn explicit tag."""
    if _legacy(ckpt_dir):
        named = str(tag) if tag is not None else _pointer(ckpt_dir)
        if named is None:
            return None, None
        return named, (
            f"checkpoint folder {ckpt_dir} was written before default-moe's commit protocol (no "
            f"manifest): resuming from {named!r} without verifying it"
        )
    if tag is not None:
        why = verify(os.path.join(ckpt_dir, str(tag)))
        if why is not None:
            good, _ = newest_complete(ckpt_dir)
            raise TornCheckpointError(
                f"checkpoint {os.path.join(ckpt_dir, str(tag))} is not complete: {why}. "
                + (
                    f"The newest complete checkpoint is {good!r}; load that tag (or pass no tag to take the newest complete one)"
                    if good
                    else "There is no complete checkpoint in that folder"
                )
            )
        return str(tag), None
    good, skipped = newest_complete(ckpt_dir)
    warning = None
    if skipped:
        warning = (
            f"checkpoint folder {ckpt_dir}: skipped "
            + "; ".join(f"{t!r} ({why})" for t, why in skipped)
            + (f"; resuming from the newest complete checkpoint {good!r}" if good else "; no complete checkpoint is left")
        )
    return good, warning


def resolve_tag(ckpt_dir: str, tag: Optional[str] = None, collective: bool = False) -> Optional[str]:
    """The tag to load from `ckpt_dir`: `tag` if complete (else `TornCheckpointError`), or with
    `tag=None` the newest complete checkpoint (None if there is none), warning about each newer
    torn one it skipped.

    Args:
        collective: every rank of the default group calls it (an engine's load): rank 0 decides
            and every rank gets its answer (or its error). False: this process alone decides
            (offline conversion, one rank of a running job).
    """
    collective = collective and _distributed() and dist.get_world_size() > 1
    result: List[Any] = [None, None, None]
    if not collective or dist.get_rank() == 0:
        try:
            result[0], result[1] = _resolve_here(ckpt_dir, tag)
        except TornCheckpointError as e:
            result[2] = str(e)
    if collective:
        dist.broadcast_object_list(result, src=0)
    if result[2] is not None:
        raise TornCheckpointError(result[2])
    if result[1] is not None and (not collective or dist.get_rank() == 0):
        warnings.warn(result[1], stacklevel=2)
    return result[0]


def prune(ckpt_dir: str, keep_last: int) -> List[str]:
    """Deletes all but the `keep_last` newest complete checkpoints, and torn folders older than
    the newest complete one (a save in progress is newer, so it is kept). The manifest goes first:
    a deletion interrupted half-way leaves a folder that no longer counts as complete."""
    if keep_last <= 0:
        return []
    pointed = _pointer(ckpt_dir)
    complete_seen, removed = 0, []
    for tag in _tags_newest_first(ckpt_dir):
        tag_dir = os.path.join(ckpt_dir, tag)
        is_complete = verify(tag_dir, hashes=False) is None
        if is_complete:
            complete_seen += 1
            if complete_seen <= keep_last or tag == pointed:
                continue
        elif complete_seen == 0 or tag == pointed:
            continue  # newer than every complete checkpoint: a save in progress
        try:
            os.remove(os.path.join(tag_dir, MANIFEST))
        except FileNotFoundError:
            pass
        shutil.rmtree(tag_dir, ignore_errors=True)
        removed.append(tag)
    return removed
