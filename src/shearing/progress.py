"""What a run tells the person watching it: where its outputs go, and the package's own log lines.

Composer prints the per-step progress itself (``log_to_console`` with ``console_log_interval``: step,
loss, ``throughput/tokens_per_sec`` from the ``speed_monitor`` callback, ``time/remaining_estimate``
from ``runtime_estimator``; or ``progress_bar``). What it does not show are this package's ``logging``
records: Python drops INFO records when nobody configured a handler, so the reference losses a run
computes before training, the domain proportions and "exported the model to ..." went nowhere. On rank 0
``setup_console_logging`` gives the ``shearing`` logger one stderr handler at INFO (other ranks: WARNING,
so an 8-GPU run does not print everything eight times); it never touches the root logger, so a host
application's own logging set-up stays as it was. ``announce_outputs`` prints, before any weights load,
where checkpoints and the export will be written.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from shearing.composer.callbacks.export import export_folder
from shearing.config import RunConfig

_HANDLER_NAME = "shearing-console"


def global_rank() -> int:
    """The launcher's rank (``RANK``, set by ``composer -n N``), readable before dist is initialised."""
    return int(os.environ.get("RANK", "0"))


def setup_console_logging(level: int = logging.INFO) -> logging.Logger:
    """Rank 0 shows the ``shearing`` logger's INFO records on stderr; idempotent."""
    logger = logging.getLogger("shearing")
    logger.setLevel(level if global_rank() == 0 else logging.WARNING)
    if not any(getattr(h, "name", None) == _HANDLER_NAME for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("[shearing] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # a root handler configured elsewhere would print every line twice
    return logger


def announce_outputs(cfg: RunConfig) -> None:
    """Rank 0: one line each for the checkpoints and the export, so nobody has to guess where they went."""
    if global_rank() != 0:
        return
    log = logging.getLogger("shearing.progress")
    if cfg.save_folder is None:
        log.info("checkpoints -> none (save_folder is not set: nothing is saved and a crash loses the run)")
    else:
        log.info("checkpoints -> %s (every %s)", Path(cfg.save_folder).resolve(), cfg.save_interval)
    folder = export_folder(cfg)  # raises for on_fit_end without a folder; validate_run says so first
    if folder is not None:
        log.info("export -> %s (when training ends)", folder.resolve())
    if cfg.log_to_console:
        log.info("progress: on the console every %s", cfg.console_log_interval)
    elif cfg.progress_bar:
        log.info("progress: progress bar")
    else:
        log.info("progress: off (log_to_console and progress_bar are false)")
