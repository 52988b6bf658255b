"""What the L0 module computes with under Composer's FSDP2 wrapping and bf16 mixed precision (CPU/gloo, 2 ranks).

    python tests/scripts/fsdp2_l0_precision.py OUT_DIR [STEPS]

Composer's Trainer refuses ``amp_bf16`` on CPU, so this runs the two Composer pieces its
``parallelize_composer_model`` is made of: ``generate_composer_model_policy`` (every direct child of the
``ComposerModel`` is one FSDP2 unit: ``.model`` with a unit per decoder layer, and ``.l0``) and
``prepare_fully_shard`` with ``Precision.AMP_BF16`` and the recipes' ``mixed_precision: DEFAULT`` (parameters
gathered in bf16, gradients reduced in fp32), on the mesh Composer's ``State`` would build (what
``shearing.composer.parallelism`` makes of the recipes' FULL_SHARD). Then it trains ``STEPS`` steps under ``torch.autocast(bf16)``
like Composer's precision context: forward (``ComposerShearedLlama.forward``), LM loss + Lagrangian,
backward, ``build_optimizer``'s AdamW step.

A forward pre-hook on the L0 module (after FSDP2's own, which gathers the parameters) records the dtype
of each mask logit and multiplier as the L0 forward sees it and the largest difference from the stored
fp32 values (gathered before the step); a forward hook records the dtype of the masks and of the
Lagrangian; a pre-hook on the first decoder layer records its weight dtype (the bf16 policy must still
hold for the LLaMA). Last, a fresh L0 unit that ran a forward under the bf16 policy: ``keep_fp32`` must refuse it (its message
is saved). Each rank writes OUT_DIR/fsdp2_mp_rank{r}.pt (or .err with the traceback).
"""

import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from gloo_ranks import WORLD, free_port, rank_session, tiny_pruning_model


def run(rank: int, out: Path, steps: int, port: int) -> None:
    with rank_session(rank, port, out / f"fsdp2_mp_rank{rank}.err"):
        from composer.core.precision import Precision
        from composer.distributed.fsdp2 import prepare_fully_shard
        from composer.distributed.fsdp2_utils import generate_composer_model_policy
        from composer.utils.parallelism import FSDP2Config
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from shearing.composer.parallelism import keep_fp32
        from shearing.config import OptimizerConfig
        from shearing.pruning.l0 import L0Module, PruningClock
        from shearing.train import build_optimizer

        model = tiny_pruning_model()
        source, target = model.l0.source, model.l0.target
        config = FSDP2Config(mixed_precision="DEFAULT", reshard_after_forward=True, state_dict_type="full")
        config.device_mesh = init_device_mesh("cpu", (WORLD,))  # what Composer's State does
        prepare_fully_shard(model, config, Precision.AMP_BF16, generate_composer_model_policy(model))
        optimizer = build_optimizer(model, OptimizerConfig())
        l0 = model.l0

        seen: list[dict] = []

        def params_seen_in_forward(module, args):
            record = {"log_alpha_dtype": {}, "lambda_dtype": {}, "log_alpha_diff": {}}
            for name, p in module.log_alphas.items():
                record["log_alpha_dtype"][name] = str(p.dtype)
                record["log_alpha_diff"][name] = float((p.detach().float() - stored[name]).abs().max())
            for name, p in module.lambdas.items():
                record["lambda_dtype"][name] = str(p.dtype)
            seen.append(record)

        def outputs_of_forward(module, args, out):
            seen[-1]["mask_dtype"] = {name: str(z.dtype) for name, z in out.masks.items()}
            seen[-1]["lagrangian_dtype"] = str(out.lagrangian.dtype)

        def layer_weight_dtype(module, args, kwargs):
            seen[-1]["decoder_weight_dtype"] = str(next(module.parameters()).dtype)

        l0.register_forward_pre_hook(params_seen_in_forward)
        l0.register_forward_hook(outputs_of_forward)
        model.model.model.layers[0].register_forward_pre_hook(layer_weight_dtype, with_kwargs=True)
        model.train()
        gen = torch.Generator().manual_seed(rank)
        for step in range(steps):
            stored = {name: p.detach().full_tensor().float() for name, p in l0.log_alphas.items()}
            model.pruning_clock = PruningClock(step=step, progress=min(1.0, (step + 1) / 2))
            ids = torch.randint(0, source.vocab_size, (2, 32), generator=gen)
            batch = {"input_ids": ids, "labels": ids}
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs = model(batch)
            loss = model.loss(outputs, batch)["total"]  # LM loss + the Lagrangian term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final = {k: v.full_tensor().detach().clone() for k, v in l0.state_dict().items()}
        # Too late: an L0 unit whose first forward already gathered in bf16 is refused, not half-switched.
        late = L0Module(source, target, seed=17)
        bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        fully_shard(late, mesh=config.device_mesh, mp_policy=bf16)
        late.eval()
        late()
        try:
            keep_fp32(late)
            late_error = None
        except RuntimeError as error:
            late_error = str(error)
        torch.save({"seen": seen, "final": final, "late_error": late_error}, out / f"fsdp2_mp_rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    mp.spawn(run, args=(out, steps, free_port()), nprocs=WORLD, join=True)
