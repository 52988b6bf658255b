"""``MetricsFileLogger``: every logged metric of a run, as JSON lines in the run folder.

Each ``log_metrics`` call becomes one line ``{"step": <batch>, "<name>": value, ...}`` in
``metrics.jsonl``; ``python -m shearing.report`` reads it. Values are plain JSON numbers (tensors and
numpy scalars converted; a non-finite loss is written as Python's ``NaN``/``Infinity``, which
``json.loads`` reads back). Only global rank 0 writes. Several lines may share a step: the train loss,
the pruning statistics and an evaluation all log at batch N.

Where: ``folder`` if given (``{run_name}`` is filled in), else the checkpoint folder (``save_folder``,
found on Composer's ``CheckpointSaver`` as ``DynamicLoading`` does), else ``./<run_name>/``.

Durability: every line is flushed as it is written, so a killed run keeps what it logged (a
half-written last line is cut on the next start).

Resume without duplicates: each checkpoint records, in this callback's ``state_dict()``, how many bytes
of the file had been written when it was saved (and the last line, to recognise the file, also after the run folder was moved). When a
resumed run starts ``fit``, the file is cut back to exactly that point: what the killed process logged
after its last checkpoint is logged again by the resumed run. Composer logs a batch's train loss at the
step *before* the batch counter advances, so a cut by step number alone would either lose or repeat
the line at the checkpoint's step; the byte mark avoids both. Without a usable mark (a weights-only
load, a checkpoint from a run without this logger, or a file rewritten since) the fallback keeps the
earlier lines with ``step <= T`` (T the batch ``fit`` starts from), none when T = 0; then a few metrics
of batch T itself (``time/*``, and the train loss if the killed process got that far) may appear twice
(readers keep the last value, as ``shearing.reporting`` does). The cut is atomic (temporary file +
``os.replace``); lines this process wrote before ``fit`` (an evaluation before training) are kept.

W&B and MLflow with autoresume (``build_loggers``, what ``shearing.train`` uses for ``loggers:``).
Composer's autoresume, when ``save_folder`` has no ``latest-rank0.pt`` yet (every first start), asks
every logger destination to download the latest checkpoint (``Trainer._try_checkpoint_download`` ->
``get_file`` -> ``LoggerDestination.download_file``). Composer's ``WandBLogger`` always answers, via the
W&B API: online without an artifact it is a wasted network call, offline (``WANDB_MODE=offline``, no
entity) it raised ``RuntimeError`` and the run died at start-up. Our ``WandBLogger`` (same arguments)
answers "not found" unless the run uploads checkpoints to W&B (``log_artifacts: true``, Composer's
default is false) and is online, so autoresume then reads only the local ``save_folder``. MLflow never
downloads, but Composer opens a new MLflow run on every restart unless ``resume: true``; when autoresume
will load a checkpoint (a ``latest-rank0.pt`` in ``save_folder``) and the yaml does not set ``resume``,
it is set, so a resumed run goes on logging into the MLflow run (found by its ``run_name`` tag) that
it started; a fresh start with no checkpoint opens a new MLflow run even if an old one has the name.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from numbers import Number
from pathlib import Path
from typing import Any

from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.loggers import WandBLogger as ComposerWandBLogger
from composer.utils import dist, format_name_with_dist

from shearing.folders import METRICS_FILE

log = logging.getLogger(__name__)

__all__ = ["MetricsFileLogger", "WandBLogger", "build_loggers", "to_json_value"]


def to_json_value(value: Any) -> Any:
    """A metric value as a JSON-able Python value: tensors and numpy scalars -> float (arrays -> lists)."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        return float(value.item()) if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, Number):
        return float(value)
    if hasattr(value, "tolist"):  # numpy array
        return value.tolist()
    if isinstance(value, str | list | tuple | dict) or value is None:
        return value
    return str(value)


class MetricsFileLogger(LoggerDestination):
    """Append every ``log_metrics`` call to ``<folder>/<filename>`` as one JSON line (rank 0 only).

    Args:
        folder: where to write; ``None``: the run's ``save_folder``, else ``./<run_name>``.
            May contain ``{run_name}``.
        filename: the file name inside the folder.
    """

    def __init__(self, folder: str | os.PathLike | None = None, filename: str = METRICS_FILE):
        if not filename or Path(filename).name != filename:
            raise ValueError(f"metrics_file: filename must be a plain file name, got {filename!r}")
        self.folder = None if folder is None else str(folder)
        self.filename = filename
        self.path: Path | None = None
        self._file = None
        self._pending: list[bytes] = []  # lines logged before INIT, when the path is not known yet
        self._last_line = b""
        self._inherited_bytes = 0  # what an earlier process left in the file
        self._mark: dict[str, Any] | None = None  # from the checkpoint this run resumes from
        self._reconciled = False

    # ------------------------------------------------------------------------------------ events
    def init(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self.path = (self._resolve_folder(state) / self.filename).absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._inherited_bytes = _cut_partial_last_line(self.path)
        self._file = open(self.path, "ab")
        for line in self._pending:
            self._write(line)
        self._pending.clear()

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or self._reconciled or self._file is None:
            return
        self._reconciled = True
        if self._inherited_bytes == 0:
            return
        self._file.close()
        with open(self.path, "rb") as f:
            inherited = f.read(self._inherited_bytes)
            ours = f.read()
        resumed_at = int(state.timestamp.batch)
        kept = self._kept_prefix(inherited, resumed_at)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(kept + ours)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if len(kept) < len(inherited):
            log.info(
                "%s: fit starts at batch %d; cut %d bytes logged after it",
                self.path,
                resumed_at,
                len(inherited) - len(kept),
            )
        self._file = open(self.path, "ab")

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if dist.get_global_rank() != 0 or not metrics:
            return
        record: dict[str, Any] = {"step": None if step is None else int(step)}
        record.update((name, to_json_value(v)) for name, v in metrics.items() if name != "step")
        line = (json.dumps(record) + "\n").encode()
        if self._file is None:
            self._pending.append(line)
        else:
            self._write(line)

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self._file is None:
            return {}
        return {"bytes": self._file.tell(), "last_line": self._last_line.decode()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mark = dict(state) if state else None

    # --------------------------------------------------------------------------------- internals
    def _write(self, line: bytes) -> None:
        self._file.write(line)
        self._file.flush()
        self._last_line = line

    def _kept_prefix(self, inherited: bytes, resumed_at: int) -> bytes:
        """What an earlier process wrote that the resumed run keeps (see the module docstring)."""
        mark = self._mark or {}
        end = mark.get("bytes")
        if (
            isinstance(end, int)
            and 0 < end <= len(inherited)
            and inherited[:end].endswith(mark.get("last_line", "").encode())
        ):
            return inherited[:end]
        if resumed_at == 0:
            return b""
        lines = inherited.splitlines(keepends=True)
        return b"".join(line for line in lines if (step := _step_of(line)) is not None and step <= resumed_at)

    def _resolve_folder(self, state: State) -> Path:
        if self.folder is not None:
            return Path(format_name_with_dist(self.folder, state.run_name))
        from composer.callbacks import CheckpointSaver

        for callback in state.callbacks:
            if isinstance(callback, CheckpointSaver):
                return Path(format_name_with_dist(str(callback.folder), state.run_name))
        return Path(state.run_name)


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return int(step) if isinstance(step, int | float) and math.isfinite(step) else None


def _cut_partial_last_line(path: Path, chunk: int = 1 << 16) -> int:
    """Cut a half-written last line (a process killed mid-write); returns the file's size after."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end != f.seek(0, os.SEEK_END):
            f.truncate(end)
    return end


# ------------------------------------------------------------------------------ W&B / MLflow


class WandBLogger(ComposerWandBLogger):
    """Composer's ``WandBLogger`` whose checkpoint download says "not found" when it cannot have one.

    That is: the run does not upload checkpoints (``log_artifacts: false``), or W&B runs offline. Then
    Composer's autoresume looks only in the local ``save_folder`` (see the module docstring).
    """

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
    ) -> None:
        if not self._log_artifacts:
            raise FileNotFoundError(f"{remote_file_name}: this run does not upload checkpoints to W&B")
        if _wandb_offline(self._init_kwargs):
            raise FileNotFoundError(f"{remote_file_name}: W&B is offline, its artifacts cannot be fetched")
        super().download_file(remote_file_name, destination, overwrite=overwrite, progress_bar=progress_bar)


def _wandb_offline(init_kwargs: Mapping[str, Any] | None) -> bool:
    import wandb

    if wandb.run is not None:
        return bool(getattr(wandb.run, "offline", False)) or getattr(wandb.run, "mode", "") == "disabled"
    mode = (init_kwargs or {}).get("mode") or os.environ.get("WANDB_MODE", "")
    return mode in ("offline", "dryrun", "disabled")


def has_latest_checkpoint(save_folder: str | None, run_name: str | None) -> bool:
    """Whether Composer's autoresume will load a checkpoint from this (local) ``save_folder``."""
    if save_folder is None or "://" in save_folder or ("{run_name}" in save_folder and not run_name):
        return False
    return os.path.exists(
        Path(format_name_with_dist(save_folder, run_name)) / "latest-rank0.pt"
    )  # as Composer


def build_loggers(
    loggers: Mapping[str, Any], *, save_folder: str | None, run_name: str | None, autoresume: bool
) -> list[LoggerDestination]:
    """The yaml's ``loggers:`` built through llm-foundry's registry, W&B and MLflow made resume-safe."""
    from llmfoundry.utils.builders import build_logger

    built: list[LoggerDestination] = []
    for name, kwargs in loggers.items():
        kwargs = dict(kwargs or {})
        if name == "wandb":
            built.append(WandBLogger(**kwargs))
            continue
        if name == "mlflow" and autoresume and "resume" not in kwargs:
            kwargs["resume"] = has_latest_checkpoint(save_folder, run_name)
        built.append(build_logger(name, kwargs))
    return built
