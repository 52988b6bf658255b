"""Run under ``composer -n 2``: a tiny pruning run; each rank saves its mask parameters for comparison,
and the dtypes its L0 module and first decoder layer compute with in one more forward after training."""

import json
import sys
from pathlib import Path

import torch
from composer.utils import dist

from shearing.models.llama import MaskedDecoderLayer
from shearing.train import train_from_yaml

if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = train_from_yaml(sys.argv[2], sys.argv[3:])
    l0 = trainer.state.model.module.l0 if hasattr(trainer.state.model, "module") else trainer.state.model.l0
    # Under FSDP the parameters are sharded DTensors: gather them (a collective, so every rank calls it).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in l0.state_dict().items()}
    torch.save({k: v.detach().cpu() for k, v in state.items()}, out / f"l0_rank{dist.get_global_rank()}.pt")
    # One more forward through the trained (wrapped) model: the dtypes the L0 forward and a decoder layer
    # see under the run's precision policy (every rank runs it: FSDP gathers are collectives).
    composer_model = (
        trainer.state.model.module if hasattr(trainer.state.model, "module") else trainer.state.model
    )
    seen: dict[str, str] = {}

    def record_l0(module, args):
        seen.update({f"l0.{name}": str(p.dtype) for name, p in module.named_parameters()})

    def record_layer(module, args, kwargs):
        seen["decoder_layer"] = str(next(module.parameters()).dtype)

    hooks = [
        l0.register_forward_pre_hook(record_l0),
        # The layer itself (the FSDP unit), not the activation-checkpoint wrapper around it.
        next(
            m for m in composer_model.modules() if isinstance(m, MaskedDecoderLayer)
        ).register_forward_pre_hook(record_layer, with_kwargs=True),
    ]
    ids = torch.randint(0, composer_model.model.config.vocab_size, (2, 16))
    with torch.no_grad():
        outputs = trainer.state.model({"input_ids": ids, "labels": ids})
    seen["lagrangian"] = str(outputs.lagrangian.dtype)
    for hook in hooks:
        hook.remove()
    (out / f"forward_dtypes_rank{dist.get_global_rank()}.json").write_text(json.dumps(seen, indent=1))
