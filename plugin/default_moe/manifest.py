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
does not exist for resume. **The pointer is the truth**: `resolve_tag` without a tag resumes the
checkpoint `latest` names (an operator's rollback — resume an older tag, train on, save — moves
it, and the next automatic resume follows); only when the pointed one is torn or missing does it
fall back, to the newest complete checkpoint *in commit order* (the manifests' commit times, not
their step numbers: an abandoned branch's higher steps are older), warning which and why. A tag
named explicitly that is torn is refused. A kill at any instant therefore costs at most the steps
since the last complete checkpoint. Retention (`prune`) keeps the newest `keep_last` complete
checkpoints in commit order plus whatever `latest` names, and never deletes through a symbolic
link (an archived tag linked into the folder is neither counted nor touched).

A manifest is data from disk: its file names must be relative paths inside the tag folder (no
absolute path, no `..`) naming regular files (no device, fifo or link), and no more bytes are
hashed than the size it records; anything else makes the checkpoint incomplete, named.

Folders written before the protocol or by DeepSpeed alone (no manifest in any tag) are loaded from
`latest` (or the named tag) as before, with a warning that they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
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


def _entry_problem(tag_dir: str, name: Any, entry: Any) -> Optional[str]:
    """Why a manifest entry cannot name a file of this checkpoint (None: it can): a relative path
    inside the tag folder, with an integer size and a hex SHA-256."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return f"manifest entry {name!r} is not a file name"
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or ".." in parts:
        return f"manifest entry {name!r} points outside the checkpoint folder (absolute or '..')"
    if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
        return f"manifest entry {name!r} has no valid size"
    if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        return f"manifest entry {name!r} has no valid SHA-256"
    root = os.path.realpath(tag_dir)
    real = os.path.realpath(os.path.join(tag_dir, name))
    if os.path.commonpath([root, real]) != root:
        return f"manifest entry {name!r} resolves outside the checkpoint folder ({real})"
    return None


def _hash_prefix(path: str, size: int) -> str:
    """SHA-256 of at most `size` bytes (a manifest never makes a resume read more than it records)."""
    h = hashlib.sha256()
    left = size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def verify(tag_dir: str, hashes: bool = True) -> Optional[str]:
    """Why the checkpoint in `tag_dir` is not complete, or None when it is (every file in its
    manifest a regular file inside the folder, present with its size and, with `hashes`, its
    SHA-256)."""
    if not os.path.isdir(tag_dir):
        return "no such folder"
    if not os.path.exists(os.path.join(tag_dir, MANIFEST)):
        return "no manifest (the save did not finish)"
    manifest = read_manifest(tag_dir)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is unreadable"
    for name, entry in manifest["files"].items():
        problem = _entry_problem(tag_dir, name, entry)
        if problem is not None:
            return problem
        path = os.path.join(tag_dir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a regular file (a link, device or fifo: refused)"
        if st.st_size != entry["size"]:
            return f"{name} has {st.st_size} bytes, the manifest says {entry['size']} (truncated or rewritten)"
        if hashes and _hash_prefix(path, entry["size"]) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (altered or corrupt)"
    return None


def _commit_time(ckpt_dir: str, tag: str) -> float:
    """When the tag was committed (its manifest's time), or for a folder without a manifest (a
    save in progress, or torn) when it was last written."""
    manifest = read_manifest(os.path.join(ckpt_dir, tag))
    t = manifest.get("time") if manifest is not None else None
    return float(t) if isinstance(t, (int, float)) else os.path.getmtime(os.path.join(ckpt_dir, tag))


def _tags_newest_first(ckpt_dir: str) -> List[str]:
    """Tag folders in commit order, newest first (see `_commit_time`; not by step: after a
    rollback the abandoned branch's higher steps are the older commits)."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: _commit_time(ckpt_dir, t), reverse=True)


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
    """(The newest complete checkpoint's tag in commit order or None, [(newer tag skipped, why)])."""
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
    pointed = _pointer(ckpt_dir)
    if pointed is not None and _tag_name_ok(pointed) and verify(os.path.join(ckpt_dir, pointed), hashes=False) is None:
        return True
    return newest_complete(ckpt_dir, hashes=False)[0] is not None


def _tag_name_ok(tag: str) -> bool:
    """A tag is one folder name inside the checkpoint folder (the pointer file is data too)."""
    return bool(tag) and "/" not in tag and "\\" not in tag and tag not in (".", "..")


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
    pointed = _pointer(ckpt_dir)
    pointed_why = None
    if pointed is not None:
        pointed_why = (
            verify(os.path.join(ckpt_dir, pointed))
            if _tag_name_ok(pointed)
            else "not a tag folder name (the pointer file is damaged)"
        )
        if pointed_why is None:
            return pointed, None
    good, skipped = newest_complete(ckpt_dir)
    skipped = [(t, why) for t, why in skipped if t != pointed]
    parts = []
    if pointed is not None:
        parts.append(f"{POINTER} names {pointed!r}, which is not complete ({pointed_why})")
    if skipped:
        parts.append("skipped " + "; ".join(f"{t!r} ({why})" for t, why in skipped))
    warning = None
    if parts:
        warning = (
            f"checkpoint folder {ckpt_dir}: "
            + "; ".join(parts)
            + (
                f"; resuming from the newest complete checkpoint {good!r} (in commit order)"
                if good
                else "; no complete checkpoint is left"
            )
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
    """Deletes all but the `keep_last` newest complete checkpoints in commit order (and the one
    `latest` names), and torn folders older than the newest complete one (a save in progress is
    newer, so it is kept). A tag that is a symbolic link (an archived checkpoint linked in) is
    neither counted nor deleted: nothing is ever deleted through a link. The manifest goes first:
    a deletion interrupted half-way leaves a folder that no longer counts as complete. A delete
    that fails warns with the path (never silently)."""
    if keep_last <= 0:
        return []
    pointed = _pointer(ckpt_dir)
    complete_seen, removed = 0, []
    for tag in _tags_newest_first(ckpt_dir):
        tag_dir = os.path.join(ckpt_dir, tag)
        if os.path.islink(tag_dir):
            continue
        is_complete = verify(tag_dir, hashes=False) is None
        if is_complete:
            complete_seen += 1
            if complete_seen <= keep_last or tag == pointed:
                continue
        elif complete_seen == 0 or tag == pointed:
            continue  # newer than every complete checkpoint: a save in progress
        failed = []
        try:
            os.remove(os.path.join(tag_dir, MANIFEST))
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append((os.path.join(tag_dir, MANIFEST), e))
        shutil.rmtree(tag_dir, onerror=lambda fn, path, exc, failed=failed: failed.append((path, exc[1])))
        if failed:
            warnings.warn(
                f"checkpoint retention (keep_last={keep_last}) could not delete {tag_dir}: "
                + "; ".join(f"{path}: {e}" for path, e in failed),
                stacklevel=2,
            )
        else:
            removed.append(tag)
    return removed
