"""Shared set-up of the plain-PyTorch two-process CPU scripts (``fsdp1_prune.py``, ``fsdp2_l0_precision.py``):
a gloo process group on this machine and the tiny GQA pruning model every rank builds identically."""

from __future__ import annotations

import gc
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from tiny import free_port  # noqa: E402, F401  (the scripts import it from here)

WORLD = 2


def init_gloo(rank: int, port: int) -> None:
    """The environment torchrun would set, one thread per rank, and the gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), NODE_RANK="0")
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=WORLD)


@contextmanager
def rank_session(rank: int, port: int, error_file: Path) -> Iterator[None]:
    """One rank's gloo group for the block; a failure's traceback goes to ``error_file`` for the test to show."""
    init_gloo(rank, port)
    try:
        yield
        # Both ranks leave together: a rank that tore its group down while the other still had gloo work
        # in flight aborted at exit ("terminate called without an active exception"), once in ~10 runs.
        torch_dist.barrier()
    except Exception:
        error_file.write_text(traceback.format_exc())
        raise
    finally:
        gc.collect()  # FSDP's handles and the gloo work objects go before the group does
        torch_dist.destroy_process_group()


def tiny_pruning_model():
    """``ComposerShearedLlama`` over the random-init ``tiny_gqa`` source with an L0 module to ``tiny_gqa_pruned``."""
    from shearing.composer.model import ComposerShearedLlama
    from shearing.models.hf_io import load_source_model
    from shearing.models.shapes import named_shape, resolve_target_shape
    from shearing.pruning.l0 import L0Module

    source = named_shape("tiny_gqa")
    llama, _ = load_source_model("tiny_gqa", seed=17)
    target = resolve_target_shape(source, "tiny_gqa_pruned")
    torch.manual_seed(17)  # the same L0 init on every rank
    return ComposerShearedLlama(llama, l0=L0Module(source, target, seed=17))
