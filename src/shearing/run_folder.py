"""One run per save_folder, and a resume only ever continues the same run.

**Lock.** ``train_from_yaml`` holds an exclusive lock on ``<save_folder>/.shearing.lock`` for the whole
run (global rank 0 only; the other ranks write nothing of their own into the folder). It is an
``fcntl.flock`` on that file: the kernel releases it on any exit, SIGKILL and OOM-kill included, so a
crashed run never leaves a stale lock. The file records who holds it (host, pid, start time) so a
refused second run can say which run owns the folder. The file itself is never deleted (deleting a
flock'd file lets two processes lock two different inodes). On a filesystem without ``flock`` support
(some network filesystems answer ``ENOLCK``/``EOPNOTSUPP``) it falls back to creating
``<save_folder>/.shearing.lock.owner`` with ``O_EXCL`` and deleting it on exit; an owner file left by a
dead process on this host is stale and is taken over with a warning; one from another host cannot be
checked and is reported with the command to remove it.

**Run record.** ``<save_folder>/shearing_run.json`` (written atomically) holds what must not change
across a resume: the source model (path and shape), the target shape and mask families, the seed,
``max_seq_len`` and the training data folder. Composer's autoresume would otherwise load the
checkpoint's masks and silently keep the *checkpoint's* target while the yaml says another. On every
start that will resume (autoresume on and a checkpoint in the folder) the yaml's values are compared
with the record and a difference is a ``ValueError`` naming both values. A folder written before the
record existed is compared with the metadata every checkpoint carries (source shape, target,
families); if that cannot be read either, a warning. Values that may change on a resume
(``max_duration`` to extend a run, loggers, intervals, learning rates) are not recorded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from composer.utils import dist

from shearing.checkpoints import LATEST
from shearing.io import write_json_atomic
from shearing.models.shapes import resolve_source_shape, shape_from_hf_config
from shearing.pruning.plan import PruningPlan

log = logging.getLogger(__name__)

LOCK_NAME = ".shearing.lock"
OWNER_NAME = ".shearing.lock.owner"  # the O_EXCL fallback
RECORD_NAME = "shearing_run.json"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class SaveFolderLocked(RuntimeError):
    """Another live run holds the save_folder."""


def _holder_info() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "since_unix": time.time(),
    }


def _describe(holder: dict[str, Any] | None, lock_path: Path) -> str:
    if not holder:
        return f"another process (no owner recorded in {lock_path})"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SaveFolderLock:
    """Exclusive lock on a save_folder; ``acquire`` raises ``SaveFolderLocked`` naming the holder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner_path = self.folder / OWNER_NAME
        self._fd: int | None = None
        self._owner_file = False

    def acquire(self) -> SaveFolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal(_read_json(self.path), self.path) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("flock is not supported on %s (%s): using an O_EXCL owner file", self.folder, e)
            self._acquire_owner_file()
            return self
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        return self

    def _acquire_owner_file(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.owner_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_json(self.owner_path)
                same_host = holder is not None and holder.get("host") == socket.gethostname()
                if same_host and not _pid_alive(int(holder.get("pid", -1))):
                    message = (
                        f"taking over the stale lock {self.owner_path}: its owner ({_describe(holder, self.owner_path)}) "
                        "is no longer running"
                    )
                    warnings.warn(message, stacklevel=3)
                    log.warning(message)
                    self.owner_path.unlink(missing_ok=True)
                    continue
                raise self._refusal(holder, self.owner_path) from None
            with os.fdopen(fd, "w") as f:
                json.dump(_holder_info(), f)
            self._owner_file = True
            return
        raise SaveFolderLocked(f"could not take the lock {self.owner_path}: another run took it first")

    def _refusal(self, holder: dict[str, Any] | None, path: Path) -> SaveFolderLocked:
        hint = "wait for it to finish or stop it, or set save_folder to another folder"
        if path == self.owner_path and holder and holder.get("host") != socket.gethostname():
            hint += f"; if that run is gone, delete {path}"
        return SaveFolderLocked(
            f"save_folder {self.folder} is in use by another run ({_describe(holder, path)}; lock {path}): {hint}"
        )

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._owner_file:
            self.owner_path.unlink(missing_ok=True)
            self._owner_file = False


@contextlib.contextmanager
def hold_save_folder(save_folder: str | os.PathLike | None) -> Iterator[SaveFolderLock | None]:
    """Global rank 0 holds the save_folder's lock inside the block (nothing to do without a save_folder)."""
    if save_folder is None or dist.get_global_rank() != 0:
        yield None
        return
    lock = SaveFolderLock(save_folder).acquire()
    try:
        yield lock
    finally:
        lock.release()


def _resolve(path: Any) -> Any:
    return str(Path(path).resolve()) if isinstance(path, str | os.PathLike) and Path(path).exists() else path


def run_record(cfg) -> dict[str, Any]:
    """What must stay the same across a resume of ``cfg``'s run (all JSON types)."""
    target = families = None
    if cfg.pruning is not None:
        plan = PruningPlan.from_config(cfg)
        source, target, families = plan.source, plan.target.prunable(), list(plan.families)
    else:
        source = resolve_source_shape(cfg.model.source, cfg.model.source_shape)
    data = ((cfg.train_loader or {}).get("dataset") or {}).get("local")
    return {
        "source": dict(cfg.model.source)
        if isinstance(cfg.model.source, Mapping)
        else _resolve(cfg.model.source),
        "source_shape": source.prunable(),
        "target": target,
        "families": families,
        "seed": cfg.seed,
        "max_seq_len": cfg.max_seq_len,
        "train_data": _resolve(data),
    }


def _has_checkpoint(folder: Path) -> bool:
    return (
        (folder / LATEST).is_symlink() or (folder / LATEST).exists() or any(folder.glob("ep*-ba*-rank0.pt"))
    )


def record_from_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The comparable part of a run record, from the metadata in the folder's latest checkpoint."""
    import torch

    latest = folder / LATEST
    candidates = [latest] if latest.exists() else sorted(folder.glob("ep*-ba*-rank0.pt"))[-1:]
    if not candidates:
        return None
    try:
        raw = torch.load(candidates[0], map_location="cpu", mmap=True, weights_only=False)
        meta = raw["state"]["model"]["_extra_state"]
        return {
            "source_shape": shape_from_hf_config(meta["hf_config"]).prunable(),  # any family's config dict
            "target": meta.get("target"),
            "families": meta.get("families"),
        }
    except Exception as e:  # noqa: BLE001 (an unreadable checkpoint is reported by the checkpoint pre-flight)
        log.warning("could not read the run metadata from %s: %s", candidates[0], e)
        return None


def check_run_record(cfg) -> dict[str, Any] | None:
    """Rank 0, before any weights load: refuse a resume whose source/target/families/... differ; write the record."""
    if cfg.save_folder is None or dist.get_global_rank() != 0:
        return None
    folder = Path(cfg.save_folder)
    path = folder / RECORD_NAME
    current = run_record(cfg)
    resuming = cfg.autoresume_enabled and folder.is_dir() and _has_checkpoint(folder)
    if resuming:
        previous, where = _read_json(path), path
        if previous is None:
            previous, where = record_from_checkpoint(folder), folder / LATEST
        if previous is None:
            message = (
                f"save_folder {folder} has checkpoints but neither {RECORD_NAME} nor readable run metadata: "
                "cannot check that the resumed run has the same source, target and families"
            )
            warnings.warn(message, stacklevel=2)
            log.warning(message)
        else:
            differ = [key for key in previous if key in current and previous[key] != current[key]]
            if differ:
                lines = "; ".join(
                    f"{key}: the run has {previous[key]!r}, the yaml {current[key]!r}" for key in differ
                )
                raise ValueError(
                    f"save_folder {folder} holds a run that differs from this yaml ({lines}; recorded in {where}). "
                    "Resuming would silently keep the checkpoint's values: set save_folder to a new folder, or "
                    f"change the yaml back; if the change is intended (e.g. the same source moved), edit {path}"
                )
    write_json_atomic(path, current)
    return current


# ------------------------------------------------------------------------------ rerunning a finished run
def run_is_finished(trainer) -> bool:
    """The resumed timestamp has reached max_duration: Composer's ``fit()`` would refuse to train."""
    state = trainer.state
    if state.max_duration is None:
        return False
    return state.max_duration <= state.timestamp.get(state.max_duration.unit)


def finish_run(trainer) -> None:
    """Do what a finished run may still lack (the export at fit end, cut short by a crash); every rank calls it.

    The export is redone unless ``shearing_export.json`` in the export folder says it was written from
    this very batch. Rerunning a complete run is therefore a no-op that says where its result is.
    """
    from shearing.callbacks.export import ExportOnFitEnd
    from shearing.callbacks.guard import NonFiniteGuard
    from shearing.export import SUMMARY_NAME

    state = trainer.state
    step = int(state.timestamp.batch)
    done = f"trained to batch {step} (max_duration {state.max_duration})"
    exports = [cb for cb in state.callbacks if isinstance(cb, ExportOnFitEnd)]
    guards = [cb for cb in state.callbacks if isinstance(cb, NonFiniteGuard)]
    messages = []
    for export in exports:
        summary = _read_json(export.folder / SUMMARY_NAME) or {}
        if summary.get("checkpoint_batch") == step:
            messages.append(f"the export at {export.folder} is from batch {step}")
            continue
        for guard in guards:
            guard.check_weights(state, step, "before the export")
        log.info("the run is %s but its export at %s is missing or older: exporting now", done, export.folder)
        export.fit_end(state, trainer.logger)
        messages.append(f"exported it now to {export.folder}")
    if dist.get_global_rank() == 0:
        tail = "; ".join(messages) if messages else "nothing to export (export.on_fit_end is off)"
        message = f"the run is complete: {done}; {tail}. To train further, raise max_duration."
        log.info(message)
        print(message, flush=True)
