"""Pruning steps under plain PyTorch FSDP1 (FULL_SHARD) on CPU/gloo, two processes.

    python tests/scripts/fsdp1_prune.py OUT_DIR USE_ORIG_PARAMS(true|false) [STEPS]

``use_orig_params: false`` is not a supported pruning setup (the project's FSDP translation refuses it):
one flat parameter then holds both the mask logits and the multipliers, which need learning rates of
opposite sign, and the per-parameter clamp cannot reach the logits inside it. (On CPU/gloo that mode
also crashed the process in this script, so it is not exercised here.)

Composer's own FSDP1 needs CUDA, so this wraps the project's model (``ComposerShearedLlama`` over
``MaskedLlamaForCausalLM`` + ``L0Module``) in ``torch.distributed.fsdp.FullyShardedDataParallel``
directly, builds the optimizer with ``shearing.train.build_optimizer`` (which installs the stored-logit
clamp), and runs forward / Lagrangian / backward / step with the reference learning rates. Each rank
writes OUT_DIR/fsdp1_rank{r}.pt with the gathered mask logits and the per-step maximum of the stored
shard, or OUT_DIR/fsdp1_rank{r}.err with the traceback when a step raises.
"""

import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from gloo_ranks import WORLD, free_port, rank_session, tiny_pruning_model


def run(rank: int, out: Path, use_orig_params: bool, steps: int, port: int) -> None:
    with rank_session(rank, port, out / f"fsdp1_rank{rank}.err"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from shearing.composer.callbacks.pruning import find_l0
        from shearing.config import OptimizerConfig
        from shearing.models.llama import MaskedDecoderLayer
        from shearing.pruning.l0 import L0Module, PruningClock
        from shearing.train import build_optimizer

        model = tiny_pruning_model()
        source = model.l0.source
        model = FSDP(
            model,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            auto_wrap_policy=ModuleWrapPolicy({MaskedDecoderLayer, L0Module}),
            use_orig_params=use_orig_params,
            device_id=torch.device("cpu"),
        )
        optimizer = build_optimizer(model, OptimizerConfig())
        l0 = find_l0(model)  # the L0Module inside its FSDP wrapper
        model.train()
        gen = torch.Generator().manual_seed(rank)
        stored_max = []
        for step in range(steps):
            model.module.pruning_clock = PruningClock(step=step, progress=min(1.0, step / 5))
            ids = torch.randint(0, source.vocab_size, (2, 32), generator=gen)
            batch = {"input_ids": ids, "labels": ids}
            loss = model.loss(model(batch), batch)["total"]  # LM loss + the Lagrangian term
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # With use_orig_params each logit is a view into this rank's flat shard (empty if not held).
            local = [p.detach().reshape(-1) for p in l0.log_alphas.values()]
            stored_max.append(max([float(t.max()) for t in local if t.numel()], default=float("-inf")))
        with FSDP.summon_full_params(model, writeback=False):
            logits = {name: p.detach().clone() for name, p in l0.log_alphas.items()}
        torch.save({"log_alphas": logits, "stored_max": stored_max}, out / f"fsdp1_rank{rank}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    use_orig_params = sys.argv[2].lower() == "true"
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    mp.spawn(run, args=(out, use_orig_params, steps, free_port()), nprocs=WORLD, join=True)
