"""Entry point: ``composer train.py <yaml> [key=value ...]`` (or ``python train.py ...`` on one process)."""

import sys

from shearing.train import train_from_yaml

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: composer train.py <run.yaml> [key=value ...]")
    train_from_yaml(sys.argv[1], sys.argv[2:])
