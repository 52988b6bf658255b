"""The Composer glue: everything that knows the APIs of Composer (mosaicml 0.32.1) and llm-foundry (0.22.0).

The method (``shearing.pruning``), the model (``shearing.models``), the data (``shearing.data``) and the
export (``shearing.export``) import none of this; ``shearing.train`` assembles a run from it:

- ``model``: ``ComposerShearedLlama``, the ``ComposerModel`` over the masked LLaMA and its L0 module
  (loss parts, metrics, parameter groups); ``builder``: the registered model builder (a ``RunSpec`` in).
- ``trainer``, ``callbacks`` (dynamic loading, the Lagrangian clock, the fit-end export, the non-finite
  guard), ``loggers``, ``parallelism`` (the yaml's ``fsdp_config``), ``registry`` (llm-foundry's registries).
- ``run_folder``: one run per save_folder, the run record, the checkpoint sweep (``shearing.checkpoints``, below
  this package since the export reads checkpoints too, holds the folder's pre-flight and the safe loader).

What Composer 0.32.1 does that a shearing run cannot live with, and where it is handled. This is the checklist
for a Composer or torch upgrade: re-read each place, run the named test.

1. Node signal files (``compat.apply``): the name is broadcast from global rank 0, so on a shared save_folder
   every node creates and deletes node 0's file. ``tests/test_multinode.py``.
2. A torch newer than the tested ones (``compat.warn_if_torch_untested``): warned once, not refused.
   ``tests/test_composer_compat.py`` keeps ``TESTED_TORCH`` equal to ``locks/``.
3. Train metrics of a domain absent from the batch would log 0.0 (``trainer.ShearingTrainer`` overrides the
   private ``Trainer._compute_and_log_metrics``). ``tests/test_metrics.py``.
4. A dict ``fsdp_config`` becomes FSDP1 (CUDA only), and under ``FSDP_VERSION=2`` HYBRID_SHARD silently
   becomes FULL_SHARD (``parallelism.build_parallelism_config`` builds the FSDP2 config itself).
   ``tests/test_parallelism.py``, ``tests/test_multiprocess.py``.
5. Checkpoints are written in place and ``latest-rank0.pt`` is removed before it is re-created, so a full disk
   or a kill leaves a truncated file or no ``latest`` (``shearing.checkpoints.tidy_save_folder`` at start-up).
   ``tests/test_checkpoints.py``.
6. The saver's ``save_num_checkpoints_to_keep`` forgets the checkpoints of earlier processes on resume
   (``run_folder.SupersededCheckpointSweep``). ``tests/test_checkpoints.py``.
7. ``torch.load(weights_only=False)`` runs whatever a checkpoint names (``shearing.checkpoints.load_checkpoint_file``:
   ``weights_only`` plus an allow-list). ``tests/test_trusted_loading.py``.
8. Autoresume asks W&B / MLflow to download a checkpoint on every first start (``loggers.build_loggers``).
   ``tests/test_loggers.py``.
9. A train loss is logged at the step before the batch counter moves, so a resumed metrics log cannot be cut
   by step alone (``loggers.MetricsFileLogger`` keeps a byte mark). ``tests/test_loggers.py``.
10. Which steps save is private to the saver (``callbacks.guard.NonFiniteGuard`` copies its interval rule so
    the weights are checked exactly where a checkpoint is written). ``tests/test_guard.py``.
11. ``fit()`` on a finished run raises "No training would occur" (``shearing.train.finish_run`` finishes what a
    crash cut short instead). ``tests/test_resume.py``.
"""
