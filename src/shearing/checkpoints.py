"""Pre-flight checks on the run folder: a corrupt latest checkpoint, a folder that cannot be written,
not enough disk for a checkpoint, what a failed write left behind. All run before any weights are loaded,
on global rank 0 while it holds the folder's lock (``shearing.composer.run_folder``), so no other writer is active.

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
writes (``run_folder.SupersededCheckpointSweep``, placed after Composer's saver). Neither deletes a good
checkpoint: only files that failed the check were renamed ``*.corrupt``.

**Keeping N checkpoints across resumes.** Composer 0.32.1's saver deletes only the checkpoints its own
process wrote (its list starts empty on every start and is not restored on resume), so with
``save_num_checkpoints_to_keep: 2`` every resume left the earlier processes' checkpoints on disk for good.
After each checkpoint the same sweep keeps the newest N of the folder (``remove_old_checkpoints``, N the run's
``save_num_checkpoints_to_keep``; -1 keeps all, 0 is left to Composer, which deletes each one as it writes
it). Only files named as Composer names this run's checkpoints (``ep{E}-ba{B}-rank0.pt``) are candidates;
never the one ``latest-rank0.pt`` points to, never one newer than it (a write in progress, or one the
start-up tidy is about to judge), never one Composer's saver still tracks (it deletes those itself).

**Loading a checkpoint runs no code** (``load_checkpoint_file``; the export and the run-metadata check use it).
``torch.save`` writes a pickle, and ``torch.load(weights_only=False)`` (what Composer 0.32.1 uses) calls any
function the file names: a ``.pt`` from elsewhere can run any command. shearing loads with ``weights_only=True``
plus an allow-list of exactly what a shearing run's Composer checkpoint holds beyond tensors and plain
containers (``COMPOSER_CHECKPOINT_GLOBALS``, found with ``torch.serialization.get_unsafe_globals_in_checkpoint``
on pruning, continued-pre-training and distillation runs; each entry names the field that needs it). A file
that needs anything else is refused (``UntrustedCheckpointError``) naming the file and the global, before
anything of it runs; a user who made such a file (a callback of their own saving other types) can allow
those names with ``SHEARING_TRUSTED_GLOBALS``. Composer's own autoresume load is unchanged: it reads the
files this run folder's runs wrote.
"""

from __future__ import annotations

import datetime
import errno
import importlib
import logging
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from shearing.folders import LATEST_CHECKPOINT

log = logging.getLogger(__name__)

LATEST = LATEST_CHECKPOINT
CHECKPOINTS = "ep*-ba*-rank0.pt"
CORRUPT = ".corrupt"  # suffix of a checkpoint moved aside
CHECKPOINT_NAME = re.compile(r"ep\d+-ba\d+-rank0\.pt")  # Composer's default save_filename, rank 0's file


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


def remove_old_checkpoints(
    save_folder: str | os.PathLike, keep: int, tracked: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """Rank 0, right after a checkpoint was written and linked: delete the folder's checkpoints beyond the
    newest ``keep`` (by batch), whichever process wrote them (see the module docstring). ``tracked``: the
    files Composer's saver will rotate itself, never touched here. Returns what was deleted."""
    folder = Path(save_folder)
    latest = folder / LATEST
    if keep <= 0 or not latest.is_file():  # -1: keep all; 0: Composer deletes each as it writes it
        return []
    current = latest.resolve()
    settled = [
        p
        for p in folder.iterdir()
        if CHECKPOINT_NAME.fullmatch(p.name)
        and not p.is_symlink()
        and p.is_file()
        and checkpoint_batch(p) <= checkpoint_batch(current)
    ]
    settled.sort(key=lambda p: (checkpoint_batch(p), p.stat().st_mtime_ns), reverse=True)
    spared = {current, *(Path(t).resolve() for t in tracked)}
    removed = [p for p in settled[keep:] if p.resolve() not in spared]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.info(
            "removed %s from %s: save_num_checkpoints_to_keep=%d keeps the newest (latest: %s)",
            ", ".join(p.name for p in removed),
            folder,
            keep,
            current.name,
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


# ------------------------------------------------------------------------------ loading without running code
TRUSTED_GLOBALS_ENV = "SHEARING_TRUSTED_GLOBALS"
_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array-unpickling function, whatever module it lives in

# What a shearing run's Composer 0.32.1 checkpoint holds beyond torch's weights_only set (tensors, plain
# containers, numbers, strings), by the name its pickle uses. Measured with
# ``torch.serialization.get_unsafe_globals_in_checkpoint`` and ``weights_only=True`` loads of pruning,
# continued-pre-training and distillation runs (progress bar and eval on); tests/test_trusted_loading.py
# loads a real run's checkpoints with exactly this list and no more.
COMPOSER_CHECKPOINT_GLOBALS: dict[str, Any] = {
    # state.timestamp: Composer's Timestamp keeps its wall-clock fields (total_wct, batch_wct, ...) as timedelta
    "datetime.timedelta": datetime.timedelta,
    # state.metadata.torch_version: a str subclass
    "torch.torch_version.TorchVersion": TorchVersion,
    # rng[rank].numpy: numpy's MT19937 state (np.random.get_state()) holds a uint32 array: the array class,
    # numpy's function that rebuilds it (numpy < 2 names it numpy.core...), its dtype and the dtype's class
    "numpy.ndarray": np.ndarray,
    "numpy._core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy.core.multiarray._reconstruct": _RECONSTRUCT,
    "numpy.dtype": np.dtype,
    "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32)),
}


class UntrustedCheckpointError(ValueError):
    """A checkpoint whose unpickling needs more than ``COMPOSER_CHECKPOINT_GLOBALS``: refused, nothing of it run."""


def _resolve_global(name: str) -> Any:
    """The object a pickle global ``module.attr`` (``module.Class.attr``) names, for ``SHEARING_TRUSTED_GLOBALS``."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(
        f"{TRUSTED_GLOBALS_ENV}: {name!r} is not an importable module attribute; give the names exactly as "
        "the refusal printed them (module.Class), separated by commas"
    )


def trusted_globals() -> dict[str, Any]:
    """``COMPOSER_CHECKPOINT_GLOBALS`` plus the names a user allowed in ``$SHEARING_TRUSTED_GLOBALS``."""
    extra = [n.strip() for n in os.environ.get(TRUSTED_GLOBALS_ENV, "").split(",") if n.strip()]
    return {**COMPOSER_CHECKPOINT_GLOBALS, **{name: _resolve_global(name) for name in extra}}


def _refused_globals(path: Path, error: Exception, allowed: dict[str, Any]) -> list[str]:
    """The globals of ``path`` outside ``allowed``: a static scan of its pickle (runs nothing), plus the one
    torch's error names (a class met only while building an object). Empty when neither names one."""
    names = set()
    try:
        names.update(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 (not a zip archive, or opcodes the scanner does not read)
        pass
    text = str(error)
    named = re.findall(r"GLOBAL (\S+) (?:was not an allowed|whose module)", text)
    names.update(n if "." in n else f"builtins.{n}" for n in named)  # torch's message drops "builtins."
    names.update(re.findall(r"but got <class '([^']+)'>", text))
    return sorted(n for n in names if n not in allowed)


def load_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """``torch.load`` of a checkpoint file on the CPU with ``weights_only=True`` and the allow-list of
    ``trusted_globals`` (scoped to this load): nothing in the file is run. A file that needs any other
    global is an ``UntrustedCheckpointError`` naming the file, the globals and what to do."""
    path = Path(path)
    allowed = trusted_globals()
    with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except pickle.UnpicklingError as e:
            error, refused = e, _refused_globals(path, e, allowed)
    trust = (
        "Only load checkpoints you made (a run folder written by shearing's train.py): unpickling a .pt from "
        "elsewhere can run any code."
    )
    if not refused:
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(error))
        raise UntrustedCheckpointError(
            f"checkpoint {path} cannot be loaded without running code from it "
            f"(torch's weights_only loader: {detail.group(1) if detail else error}); it was not loaded. {trust}"
        )
    names = ",".join(refused)
    raise UntrustedCheckpointError(
        f"checkpoint {path} was refused: unpickling it needs {', '.join(refused)}, which a shearing checkpoint "
        f"never holds (loading it would call or build that); nothing of it was run. {trust} If you trust this "
        f"file (you made it, e.g. with a callback of your own that saves these types), allow exactly these "
        f"names and retry: {TRUSTED_GLOBALS_ENV}={names}"
    )


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
