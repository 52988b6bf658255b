"""Pre-flight checks on the run folder: a corrupt latest checkpoint, a folder that cannot be written,
not enough disk for a checkpoint. All run before any weights are loaded.

Composer's autoresume loads whatever ``latest-rank0.pt`` points to. A checkpoint cut short (a node lost
power mid-write, a full disk) would make every restart crash on it, so before the trainer starts, rank 0
verifies the zip container and its CRCs (``torch.save`` writes a zip archive), and when the file is bad
it moves it aside as ``*.corrupt``, re-points ``latest-rank0.pt`` at the newest readable checkpoint, and
warns. Other ranks cannot race it: they block in the trainer's process-group start-up until rank 0 is done.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest-rank0.pt"


def checkpoint_is_readable(path: Path) -> bool:
    """True when ``path`` is a complete ``torch.save`` archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def checkpoint_batch(path: Path) -> int:
    """The batch count in a Composer checkpoint name (``ep0-ba320-rank0.pt`` -> 320); -1 if none."""
    match = re.search(r"ba(\d+)", path.name)
    return int(match.group(1)) if match else -1


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
        (p for p in folder.glob("ep*-ba*-rank0.pt") if p.resolve() != current and p.is_file()),
        key=checkpoint_batch,
        reverse=True,
    )
    fallback = next((p for p in candidates if checkpoint_is_readable(p)), None)
    if current.is_file():
        os.replace(current, current.with_name(current.name + ".corrupt"))
    if fallback is None:
        latest.unlink()
        raise ValueError(
            f"the latest checkpoint in {folder} ({current.name}) is corrupt and no earlier readable checkpoint "
            "exists; it was moved aside as *.corrupt. Restart to train from the beginning, or set load_path"
        )
    tmp = folder / f".{LATEST}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(fallback.name, tmp)
    os.replace(tmp, latest)
    message = f"checkpoint {current.name} in {folder} is corrupt (moved aside as *.corrupt); resuming from {fallback.name}"
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    return fallback


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
        raise ValueError(
            f"save_folder {folder} cannot be written ({e.strerror}): choose a writable folder"
        ) from None
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
