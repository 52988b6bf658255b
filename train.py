"""Entry point: ``composer train.py <yaml> [key=value ...]`` (or ``python train.py ...`` on one process).

A config refused before the model is built prints one message (what, which key, the fix) and exits 2; an
error during training keeps its traceback."""

import sys

from shearing.refusals import exit_on_refusal
from shearing.train import train_from_yaml

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: composer train.py <run.yaml> [key=value ...]")
    with exit_on_refusal("the run"):
        train_from_yaml(sys.argv[1], sys.argv[2:])
