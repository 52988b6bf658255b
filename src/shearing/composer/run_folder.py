"""One run per save_folder, and a resume only ever continues the same run.

**Lock.** ``train_from_yaml`` holds an exclusive lock on ``<save_folder>/.shearing.lock`` for the whole
run (global rank 0 only; the other ranks write nothing of their own into the folder). A folder that
cannot hold it (read-only, permission denied, a file in the way, a full disk) is refused naming the path
and the fix (``checkpoints.unwritable_save_folder``). It is an
``fcntl.flock`` on that file: the kernel releases it on any exit, SIGKILL and OOM-kill included, so a
crashed run never leaves a stale lock. The file records who holds it (host, pid, start time) so a
refused second run can say which run owns the folder. The file itself is never deleted (deleting a
flock'd file lets two processes lock two different inodes). On a filesystem without ``flock`` support
(some network filesystems answer ``ENOLCK``/``EOPNOTSUPP``) it falls back to creating
``<save_folder>/.shearing.lock.owner`` with ``O_EXCL`` and deleting it on exit; an owner file left by a
dead process on this host is stale and is taken over with a warning; one from another host cannot be
checked and is reported with the command to remove it.

**Every rank, one verdict.** The lock, the run-record check and the save_folder checks run on global rank
0 only (``on_rank_zero``); in a multi-process run (``train_from_yaml`` starts the process group first) rank
0 then broadcasts whether it refused, so a refusal stops every rank on every node at once, naming rank 0's
error, instead of the other nodes waiting ``dist_timeout`` for a rank 0 that is gone. Nothing here is done
by "local rank 0", so N nodes on one shared folder never race each other.

**Shared folder.** A multi-node run needs one ``save_folder`` that every node mounts: rank 0 alone writes
checkpoints, and autoresume on every node must find them. Right after taking the lock, rank 0 writes a
small probe file there and every node's local rank 0 looks for it (``check_folder_is_shared``, waiting up
to 10 s for a network filesystem's cache); a node that cannot see it is named in a ``ValueError`` before
anything loads. On one node the check is skipped.

**Run record.** ``<save_folder>/shearing_run.json`` (written atomically) holds what must not change
across a resume: the source model (path and shape), the target shape and mask families, the seed,
``max_seq_len`` and the training data folder. Composer's autoresume would otherwise load the
checkpoint's masks and silently keep the *checkpoint's* target while the yaml says another. On every
start that will resume (autoresume on and a checkpoint in the folder) the yaml's values are compared
with the record and a difference is a ``ValueError`` naming both values. A folder written before the
record existed is compared with the metadata every checkpoint carries (source shape, target,
families); if that cannot be read either, a warning. Values that may change on a resume
(``max_duration`` to extend a run, loggers, intervals, learning rates) are not recorded. A record that
exists but cannot be read (not JSON, empty, not an object) is refused with its path, resuming or not: it
may be a user's broken edit, so it is never overwritten silently; restoring it or deleting it (to accept
the yaml's values) is the user's call.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from shearing.checkpoints import (
    CHECKPOINTS,
    LATEST,
    checkpoint_batch,
    load_checkpoint_file,
    remove_old_checkpoints,
    remove_superseded_corrupt,
    unwritable_save_folder,
)
from shearing.folders import RUN_RECORD
from shearing.io import pid_alive, read_json_or_none, write_json_atomic
from shearing.models.shapes import shape_from_hf_config

log = logging.getLogger(__name__)

LOCK_NAME = ".shearing.lock"
OWNER_NAME = ".shearing.lock.owner"  # the O_EXCL fallback
RECORD_NAME = RUN_RECORD
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
SHARED_PROBE = ".shearing.shared-check-"  # check_folder_is_shared's file, removed right after
SHARED_WAIT_S = 10.0
T = TypeVar("T")


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

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # read-only, permission denied, a file in the way: name it and the fix
            raise unwritable_save_folder(self.folder, e, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refusal(read_json_or_none(self.path), self.path) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in _NO_FLOCK:
                raise
            log.warning("flock is not supported on %s (%s): using an O_EXCL owner file", self.folder, e)
            self._acquire_owner_file()
            return self
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        except OSError as e:  # a full disk or quota
            self.release()
            raise unwritable_save_folder(self.folder, e, self.path) from None
        return self

    def _acquire_owner_file(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.owner_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_json_or_none(self.owner_path)
                same_host = holder is not None and holder.get("host") == socket.gethostname()
                if same_host and not pid_alive(int(holder.get("pid", -1))):
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


def on_rank_zero(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """``fn(*args, **kwargs)`` on global rank 0 only (its result there, None elsewhere). In a multi-process
    run every rank then learns whether it failed and raises too, naming ``what`` and rank 0's error: the
    other nodes stop at once instead of waiting ``dist_timeout`` for a rank 0 that has exited."""
    result, error = None, None
    if dist.get_global_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the other ranks were told)
            error = e
    if dist.get_world_size() > 1 and dist.is_initialized():
        verdict = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(verdict, src=0)
        if error is None and verdict[0] is not None:
            raise RuntimeError(f"global rank 0 stopped the run at {what}: {verdict[0]}")
    if error is not None:
        raise error
    return result


def _shows_file(path: Path, wait_s: float) -> bool:
    """``path`` is visible here within ``wait_s`` (listing its folder revalidates NFS's directory cache)."""
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.parent)
            if path.is_file():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def check_folder_is_shared(save_folder: str | os.PathLike, wait_s: float = SHARED_WAIT_S) -> None:
    """Multi-node runs: every node sees a file global rank 0 writes into ``save_folder`` (a collective).

    Rank 0 alone writes the checkpoints, the lock and the run record, while autoresume on every node must
    find the checkpoint; a node-local folder trains, but every resume would fail in Composer ("Downloading
    the checkpoint to all nodes failed") and a replaced node 0 would take the run with it. One small file,
    one broadcast and one gather at start-up: cheap enough to refuse up front, naming the nodes that are blind.
    """
    if dist.get_world_size() == dist.get_local_world_size() or not dist.is_initialized():
        return  # one node: nothing to share
    folder = Path(save_folder)
    token = [f"{SHARED_PROBE}{secrets.token_hex(8)}"]
    dist.broadcast_object_list(token, src=0)  # rank 0's name on every rank
    on_rank_zero("the shared save_folder check", (folder / token[0]).write_text, socket.gethostname())
    probe = folder / token[0]
    seen = _shows_file(probe, wait_s) if dist.get_local_rank() == 0 else True
    views = dist.all_gather_object((dist.get_node_rank(), socket.gethostname(), seen))
    if dist.get_global_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = sorted({f"node {node} ({host})" for node, host, ok in views if not ok})
    if blind:
        raise ValueError(
            f"save_folder {folder} is not shared between the nodes: {probe.name}, written there by global rank 0 "
            f"on {views[0][1]}, is not visible from {', '.join(blind)} after {wait_s:.0f} s. Multi-node runs "
            "need one save_folder on storage every node mounts (NFS, Lustre, a shared volume): rank 0 alone "
            "writes the checkpoints, and autoresume on every node must find them. Set variables.save_folder "
            "to such a path, the same on every node"
        )


@contextlib.contextmanager
def hold_save_folder(save_folder: str | os.PathLike | None) -> Iterator[SaveFolderLock | None]:
    """Global rank 0 holds the save_folder's lock inside the block (nothing to do without a save_folder);
    in a multi-node run every node must see the folder (``check_folder_is_shared``). Every rank calls it."""
    if save_folder is None:
        yield None
        return
    lock = on_rank_zero("the save_folder lock", lambda: SaveFolderLock(save_folder).acquire())
    try:
        check_folder_is_shared(save_folder)
        yield lock
    finally:
        if lock is not None:
            lock.release()


class SupersededCheckpointSweep(Callback):
    """After each checkpoint (placed after Composer's saver), rank 0 deletes the ``*.corrupt`` it supersedes
    and keeps only the newest ``keep`` checkpoints of the folder, earlier processes' included (``keep`` is
    the run's ``save_num_checkpoints_to_keep``; -1 keeps all): ``checkpoints.remove_old_checkpoints``."""

    def __init__(self, save_folder: str | os.PathLike, keep: int = -1):
        self.folder = Path(save_folder)
        self.keep = keep

    def _sweep(self, state: State | None) -> None:
        latest = self.folder / LATEST  # written complete: Composer links it afterwards
        if dist.get_global_rank() != 0 or not latest.exists():
            return
        remove_superseded_corrupt(self.folder, latest.resolve())
        callbacks = state.callbacks if state is not None else []
        # The files Composer's saver wrote in this process: it rotates those itself
        tracked = [
            path for cb in callbacks if isinstance(cb, CheckpointSaver) for path in cb.saved_checkpoints
        ]
        remove_old_checkpoints(self.folder, self.keep, tracked)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._sweep(state)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._sweep(state)

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._sweep(state)


def _has_checkpoint(folder: Path) -> bool:
    return (folder / LATEST).is_symlink() or (folder / LATEST).exists() or any(folder.glob(CHECKPOINTS))


def record_from_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The comparable part of a run record, from the metadata in the folder's latest checkpoint."""
    latest = folder / LATEST
    newest = max(folder.glob(CHECKPOINTS), key=checkpoint_batch, default=None)
    candidates = [latest] if latest.exists() else [newest] if newest is not None else []
    if not candidates:
        return None
    try:
        raw = load_checkpoint_file(candidates[0], mmap=True)  # weights_only: runs nothing from the file
        meta = raw["state"]["model"]["_extra_state"]
        return {
            "source_shape": shape_from_hf_config(meta["hf_config"]).prunable(),  # any family's config dict
            "target": meta.get("target"),
            "families": meta.get("families"),
        }
    except Exception as e:  # noqa: BLE001 (an unreadable checkpoint is reported by the checkpoint pre-flight)
        log.warning("could not read the run metadata from %s: %s", candidates[0], e)
        return None


def read_run_record(path: Path) -> dict[str, Any] | None:
    """The run record at ``path`` (None when there is none); a damaged one is a ``ValueError`` naming the fix."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    else:
        try:
            record = json.loads(text)
        except ValueError as e:
            problem = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        else:
            if isinstance(record, dict):
                return record
            problem = f"holds a {type(record).__name__}, not the run record's JSON object"
    raise ValueError(
        f"the run record {path} {problem}; it says what this folder's run is (source, target, families, seed, "
        "data) and is never overwritten silently. Restore it (from a backup, or fix the edit), or delete it to "
        "accept this yaml's values (a resume then compares them with the latest checkpoint's metadata)"
    )


def check_run_record(cfg: Any, record: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0, before any weights load: refuse a resume whose source/target/families/... differ, or a damaged
    record; write the record. Every rank calls it (rank 0's refusal stops them all: ``on_rank_zero``)."""
    if cfg.save_folder is None:
        return None
    return on_rank_zero("the run record check", _check_run_record, cfg, record)


def _check_run_record(cfg: Any, current: dict[str, Any]) -> dict[str, Any]:
    folder = Path(cfg.save_folder)
    path = folder / RECORD_NAME
    recorded = read_run_record(path)  # a damaged record is refused, resuming or not
    resuming = cfg.autoresume_enabled and folder.is_dir() and _has_checkpoint(folder)
    if resuming:
        previous, where = recorded, path
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
