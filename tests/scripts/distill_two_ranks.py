"""Run under ``composer -n 2``: a tiny CPT run distilling from a teacher; each rank records how its teacher's
and student's parameters are held (DTensor placements, local vs full shapes) and the last logged loss parts.

    composer -n 2 tests/scripts/distill_two_ranks.py OUT_DIR RUN_YAML [key=value ...]
"""

import json
import sys
from pathlib import Path

from composer.utils import dist

from shearing.train import train_from_yaml


def layout(module) -> dict[str, dict]:
    out = {}
    for name, param in module.named_parameters():
        placements = [str(p) for p in getattr(param, "placements", [])]
        local = param.to_local() if hasattr(param, "to_local") else param
        out[name] = {
            "placements": placements,
            "local": list(local.shape),
            "full": list(param.shape),
            "requires_grad": param.requires_grad,
        }
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer = train_from_yaml(sys.argv[2], sys.argv[3:])
    model = trainer.state.model.module if hasattr(trainer.state.model, "module") else trainer.state.model
    record = {
        "teacher": layout(model.teacher),
        "student": layout(model.model),
        "loss": {k: float(v) for k, v in trainer.state.total_loss_dict.items()},
        "batch": int(trainer.state.timestamp.batch),
    }
    (out / f"layout_rank{dist.get_global_rank()}.json").write_text(json.dumps(record, indent=1))
