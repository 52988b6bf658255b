"""Pre-flight checks on the run folder: a corrupt latest checkpoint, a folder that cannot be written,
not enough disk for a checkpoint, what a failed write left behind. All run before any weights are loaded,
on global rank 0 while it holds the folder's lock (``shearing.run_folder``), so no other writer is active.

Composer's autoresume loads whatever ``latest-rank0.pt`` points to. A checkpoint cut short (a node lost
power mid-write, a full disk) would make every restart crash on it, so before the trainer starts, rank 0
verifies the zip container and its CRCs (``torch.save`` writes a zip archive), and when the file is bad
it moves it aside as ``*.corrupt``, re-points ``latest-rank0.pt`` at the newest readable checkpoint, and
warns. Other ranks cannot race it: they wait for rank 0 at the start-up collectives (``train_from_yaml``).

**What a failed write leaves.** Composer 0.32.1 writes a monolithic checkpoint in place
(``open(ep0-baN-rank0.pt, "wb")``, no temporary name) and moves ``latest-rank0.pt`` only after the write
succeeded, so a full disk leaves a truncated ``ep0-baN-rank0.pt`` that ``latest`` does not point at; it
also removes ``latest`` before re-creating it, so a full disk (or a kill) between the two leaves none.
``tidy_save_folder`` handles both at start-up: a checkpoint whose zip central directory cannot be read (a
truncated one lacks it; a cheap read of the file's end, not a CRC pass over every checkpoint) is moved
aside as ``*.corrupt`` and reported, so nothing can load or export it; a missing ``latest`` is re-pointed
at the newest readable checkpoint (else autoresume would start again from step 0 and overwrite them);
top-level ``*.tmp`` files (a write cut short: ``write_json_atomic``, the metrics log, the ``latest``
symlink) are removed. ``*.corrupt`` files are deleted, and reported, once a good checkpoint at the same
or a later batch exists: at start-up against the verified latest, and after every checkpoint the run
writes (``run_folder.SupersededCheckpointSweep``, placed after Composer's saver). A good checkpoint is never
deleted: only files that failed the check were renamed ``*.corrupt``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest-rank0.pt"
CHECKPOINTS = "ep*-ba*-rank0.pt"
CORRUPT = ".corrupt"  # suffix of a checkpoint moved aside


def checkpoint_is_readable(path: Path) -> bool:
    """True when ``path`` is a complete ``torch.save`` archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def checkpoint_is_complete(path: Path) -> bool:
    """True when ``path``'s zip central directory (written last) can be read: cheap, catches truncation."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def checkpoint_batch(path: Path) -> int:
    """The batch count in a Composer checkpoint name (``ep0-ba320-rank0.pt`` -> 320); -1 if none."""
    match = re.search(r"ba(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
    log.warning(message)


def _move_aside(path: Path) -> Path:
    corrupt = path.with_name(path.name + CORRUPT)
    os.replace(path, corrupt)
    return corrupt


def _point_latest(folder: Path, checkpoint: Path) -> None:
    tmp = folder / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(checkpoint.name, tmp)
    os.replace(tmp, folder / LATEST)


def recover_latest_checkpoint(save_folder: str | os.PathLike) -> Path | None:
    """Make ``latest-rank0.pt`` point at a readable checkpoint; returns the checkpoint autoresume will load."""
    folder = Path(save_folder)
    latest = folder / LATEST
    if not latest.is_symlink() and not latest.exists():
        return None
    current = latest.resolve()
    if current.is_file() and checkpoint_is_readable(current):
        return current
    candidates = sorted(
        (p for p in folder.glob(CHECKPOINTS) if p.resolve() != current and p.is_file()),
        key=checkpoint_batch,
        reverse=True,
    )
    fallback = next((p for p in candidates if checkpoint_is_readable(p)), None)
    if current.is_file():
        _move_aside(current)
    if fallback is None:
        latest.unlink()
        raise ValueError(
            f"the latest checkpoint in {folder} ({current.name}) is corrupt and no earlier readable checkpoint "
            "exists; it was moved aside as *.corrupt. Restart to train from the beginning, or set load_path"
        )
    _point_latest(folder, fallback)
    _warn(
        f"checkpoint {current.name} in {folder} is corrupt (moved aside as *.corrupt); resuming from {fallback.name}"
    )
    return fallback


def remove_superseded_corrupt(folder: Path, good: Path) -> list[Path]:
    """Delete the ``*.corrupt`` checkpoints at or before ``good``'s batch (a complete checkpoint replaces them)."""
    removed = []
    for path in folder.glob(CHECKPOINTS + CORRUPT):
        if checkpoint_batch(path) <= checkpoint_batch(good):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info(
            "removed %s from %s: %s holds a later complete checkpoint",
            ", ".join(p.name for p in removed),
            folder,
            good.name,
        )
    return removed


def tidy_save_folder(save_folder: str | os.PathLike) -> Path | None:
    """Rank 0, holding the lock, before autoresume: what failed writes left is moved aside or removed (see
    the module docstring); returns the checkpoint autoresume will load (``recover_latest_checkpoint``)."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return None
    for tmp in folder.glob("*.tmp"):
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            log.info("removed %s: a write cut short by an earlier run", tmp)
    latest = folder / LATEST
    target = latest.resolve() if latest.is_symlink() or latest.exists() else None
    partial = [
        p
        for p in folder.glob(CHECKPOINTS)
        if p.is_file() and p.resolve() != target and not checkpoint_is_complete(p)
    ]
    for path in partial:
        _warn(
            f"checkpoint {path} is incomplete (a write cut short, e.g. by a full disk); moved aside as "
            f"{path.name}{CORRUPT}, removed once a later checkpoint is written"
        )
        _move_aside(path)
    if target is None:
        newest = max(folder.glob(CHECKPOINTS), key=checkpoint_batch, default=None)
        if newest is None:
            return None
        _point_latest(folder, newest)  # verified below like any latest
        _warn(f"{latest} was missing (a write cut short); pointed it at {newest.name}, the newest checkpoint")
    chosen = recover_latest_checkpoint(folder)
    if chosen is not None:
        remove_superseded_corrupt(folder, chosen)
    return chosen


def unwritable_save_folder(folder: Path, error: OSError, path: Path | None = None) -> ValueError:
    """The message for a save_folder that cannot be created or written: what is wrong, and the fix."""
    head = f"save_folder {folder} cannot be written"
    fix = "set save_folder (variables.save_folder) to a writable folder"
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "it is a file" if blocker == folder else f"{blocker} is a file"
        return ValueError(f"{head}: {what}, not a folder. Move the file away, or {fix}")
    where = f" on {path}" if path is not None else ""
    if error.errno == errno.EROFS:
        return ValueError(f"{head}: read-only file system{where}. Remount it read-write, or {fix}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ValueError(f"{head}: no space left{where} (disk full or quota). Free space there, or {fix}")
    if error.errno in (errno.EACCES, errno.EPERM):
        return ValueError(
            f"{head}: permission denied{where} for uid {os.geteuid()}. Give this user write access "
            f"(chmod/chown), or {fix}"
        )
    return ValueError(f"{head} ({error.strerror or error}{where}): {fix}")


def _probe_write(folder: Path, stem: str) -> None:
    """Create ``folder`` and write and remove a small file in it; raises ``OSError`` where that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f"{stem}-{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()


def check_save_folder(save_folder: str | os.PathLike, checkpoint_bytes: int) -> None:
    """The folder can be created and written, and has room for at least one checkpoint."""
    folder = Path(save_folder)
    try:
        _probe_write(folder, ".write-test")
    except OSError as e:
        raise unwritable_save_folder(folder, e) from None
    free = shutil.disk_usage(folder).free
    if free < checkpoint_bytes:
        raise ValueError(
            f"save_folder {folder} has {free / 2**30:.1f} GiB free but one checkpoint needs about "
            f"{checkpoint_bytes / 2**30:.1f} GiB (weights + optimizer state): free space or choose another folder"
        )


def check_writable_output(path: str | os.PathLike, flag: str = "--output") -> Path:
    """A CLI's output file can be written: its folder can be created and takes a file. Run before the work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file path, e.g. {path / 'results.json'}")
    try:
        _probe_write(path.parent, f".{path.name}.write-test")
    except OSError as e:
        raise ValueError(
            f"{flag} {path} cannot be written ({e.strerror or e}): choose a path in a writable folder"
        ) from None
    return path
