"""The names of the files shearing writes into a run folder and an export folder, named once here: their
writers and their readers (``shearing.reporting``, the export, the run-folder checks) import them."""

METRICS_FILE = (
    "metrics.jsonl"  # composer.loggers.MetricsFileLogger: every logged metric, one JSON line a call
)
DYNAMIC_LOADING_STEM = "dynamic_loading"  # composer.callbacks.dynamic_loading: .json (history) and .csv
RUN_RECORD = "shearing_run.json"  # composer.run_folder.check_run_record: what a resume must keep
LATEST_CHECKPOINT = "latest-rank0.pt"  # Composer's link to the newest checkpoint (checkpoints.LATEST)
EXPORT_SUMMARY = "shearing_export.json"  # export.hf: what an export folder holds besides the model

__all__ = ["DYNAMIC_LOADING_STEM", "EXPORT_SUMMARY", "LATEST_CHECKPOINT", "METRICS_FILE", "RUN_RECORD"]
