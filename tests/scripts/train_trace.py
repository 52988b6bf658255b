"""Run a training yaml and record, per step, the losses (and at the end the masks and proportions).

    python tests/scripts/train_trace.py OUT_DIR RUN_YAML [key=value ...]

Appends ``{"step", "loss/train/total", ...}`` to OUT_DIR/trace.jsonl after every batch (flushed, so a
killed run keeps what it recorded) and, when training ends, saves the L0 state (pruning runs) to
OUT_DIR/final_l0.pt. Used by the kill-and-resume tests.
"""

import json
import sys
import time
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from llmfoundry import registry

from shearing.train import train_from_yaml


class LossTrace(Callback):
    def __init__(self, path: str, sleep: float = 0.0):
        self.path = Path(path)
        self.sleep = sleep

    def batch_end(self, state: State, logger: Logger) -> None:
        record = {"step": int(state.timestamp.batch)}
        record.update({k: float(v) for k, v in state.total_loss_dict.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        time.sleep(self.sleep)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    registry.callbacks.register("loss_trace", func=LossTrace)
    overrides = [*sys.argv[3:], f"callbacks.loss_trace.path={out / 'trace.jsonl'}"]
    trainer = train_from_yaml(sys.argv[2], overrides)
    l0 = getattr(trainer.state.model, "l0", None)
    if l0 is not None:
        torch.save({k: v.detach().cpu() for k, v in l0.state_dict().items()}, out / "final_l0.pt")
