"""Export the model as a Hugging Face directory when training ends (``export.on_fit_end: true``).

For a pruning run this is the exact target shape (final masks folded in and cut out); for continued
pre-training or pre-training, the model as it is. Same code path as ``python -m shearing.export``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

log = logging.getLogger(__name__)


class ExportOnFitEnd(Callback):
    def __init__(self, folder: str | Path, dtype: str = "float32"):
        self.folder = Path(folder)
        self.dtype = dtype

    def fit_end(self, state: State, logger: Logger) -> None:
        from shearing.export import export_model_state

        model_state = state.get_model_state_dict()  # collective under FSDP: every rank calls it
        if dist.get_global_rank() == 0:
            summary = export_model_state(model_state, self.folder, dtype=self.dtype)
            logger.log_metrics({"export/num_params": float(summary["target"]["num_params"])})
            log.info("exported the model to %s", self.folder)
        dist.barrier()
