"""Run under ``composer -n 2``: a tiny pruning run; each rank saves its mask parameters for comparison."""

import sys
from pathlib import Path

import torch
from composer.utils import dist

from shearing.train import train_from_yaml

if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = train_from_yaml(sys.argv[2], sys.argv[3:])
    l0 = trainer.state.model.module.l0 if hasattr(trainer.state.model, "module") else trainer.state.model.l0
    # Under FSDP the parameters are sharded DTensors: gather them (a collective, so every rank calls it).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in l0.state_dict().items()}
    torch.save({k: v.detach().cpu() for k, v in state.items()}, out / f"l0_rank{dist.get_global_rank()}.pt")
