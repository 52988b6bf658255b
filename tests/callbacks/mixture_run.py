"""A tiny end-to-end Composer run on the domain mixture, for the dynamic-loading tests.

Importable (``from callbacks.mixture_run import ...``) and a script for ``composer -n 2``::

    composer -n 2 tests/callbacks/mixture_run.py DATA_ROOT OUT_DIR NUM_WORKERS

which trains 10 steps uninterrupted, then 5 steps + checkpoint + resume to 10, on two ranks, and
writes ``OUT_DIR/result.json`` (rank 0) with both runs' per-rank sample ids and losses, the callback
histories, and the two-rank eval cross-entropies next to a single-process recomputation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Callback, Evaluator, State
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerModel

from shearing.composer.callbacks.dynamic_loading import DynamicLoading
from shearing.data.dataloader import build_domain_eval_dataloader, build_domain_mixture_dataloader
from shearing.metrics import DomainLanguageCrossEntropy

REFERENCE_LOSSES = {"cc": 4.5, "code": 5.2, "wiki": 6.0}  # a random 256-token model sits near ln 256 = 5.55


class TinyMixtureModel(ComposerModel):
    """A 1-layer ``LlamaForCausalLM`` reporting ``<domain>_LanguageCrossEntropy`` for train and eval."""

    def __init__(self, domains: list[str], seed: int = 0):
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)
        self.train_metrics = {
            f"{d}_LanguageCrossEntropy": DomainLanguageCrossEntropy(i) for i, d in enumerate(domains)
        }
        self.eval_metrics = {
            f"{d}_LanguageCrossEntropy": DomainLanguageCrossEntropy(i) for i, d in enumerate(domains)
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"]).logits

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            outputs[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Any) -> None:
        metric.update(outputs, batch["labels"], batch["domain_idx"])


class Recorder(Callback):
    """Records each trained batch's (domain, sample id) pairs and the loss."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.losses: list[float] = []

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        self.batches.append(list(zip(batch["domain_idx"].tolist(), batch["sample_id"].tolist())))

    def batch_end(self, state: State, logger: Logger) -> None:
        self.losses.append(float(state.loss))


def make_trainer(
    data_root: Path,
    run_dir: Path,
    max_duration: str,
    workers: int = 0,
    load_path: str | None = None,
    save_interval: str | None = None,
    callback: DynamicLoading | None = None,
    eval_subset_num_batches: int = -1,
    eval_domains: list[str] | None = None,
) -> tuple[Trainer, Recorder, DynamicLoading, InMemoryLogger]:
    train = build_domain_mixture_dataloader(
        None, 2, {"local": str(data_root / "train"), "seed": 5}, num_workers=workers, prefetch_factor=2
    )
    eval_cfg: dict[str, Any] = {"local": str(data_root / "eval"), "max_seqs_per_domain": 3}
    if eval_domains is not None:
        eval_cfg["domains"] = eval_domains
    domains = train.dataloader.dataset.domains
    evaluators = [
        Evaluator(label="eval", dataloader=build_domain_eval_dataloader(None, 4, dict(eval_cfg))),
        Evaluator(
            label="other",
            dataloader=build_domain_eval_dataloader(None, 4, dict(eval_cfg)),
            eval_interval="3ba",
        ),
    ]
    recorder = Recorder()
    callback = callback or DynamicLoading(REFERENCE_LOSSES, output_dir=run_dir / "dynamic")
    memory = InMemoryLogger()
    model = TinyMixtureModel(domains)
    trainer = Trainer(
        model=model,
        train_dataloader=train,
        eval_dataloader=evaluators,
        eval_interval="2ba",
        eval_subset_num_batches=eval_subset_num_batches,
        max_duration=max_duration,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        device="cpu",
        seed=17,
        save_folder=str(run_dir / "ckpt") if save_interval else None,
        save_interval=save_interval or "1000ba",
        save_filename="ba{batch}.pt",
        save_overwrite=True,
        load_path=load_path,
        callbacks=[callback, recorder],
        loggers=[memory],
        progress_bar=False,
        log_to_console=False,
        run_name="mixture-test",
    )
    return trainer, recorder, callback, memory


def uninterrupted_and_resumed(data_root: Path, out: Path, workers: int) -> dict[str, Any]:
    """Train 10 steps in one go, and 5 + checkpoint + 5 resumed; return what each run saw."""
    full, full_rec, full_cb, _ = make_trainer(data_root, out / "full", "10ba", workers)
    full.fit()
    full.close()
    first, first_rec, _, _ = make_trainer(data_root, out / "part", "5ba", workers, save_interval="5ba")
    first.fit()
    first.close()
    second, second_rec, second_cb, memory = make_trainer(
        data_root, out / "part", "10ba", workers, load_path=str(out / "part" / "ckpt" / "ba5.pt")
    )
    second.fit()
    eval_values = {k: float(v) for k, v in second.state.eval_metric_values.items()}
    second.close()
    return {
        "full": {"batches": full_rec.batches, "losses": full_rec.losses, "history": full_cb.history},
        "resumed": {
            "batches": first_rec.batches + second_rec.batches,
            "losses": first_rec.losses + second_rec.losses,
            "history": second_cb.history,
        },
        "eval_values": eval_values,
        "logged": sorted(k for k in memory.data if k.startswith("metrics/dynamic_loading")),
        "model": getattr(second.state.model, "module", second.state.model),  # unwrap DDP
    }


def single_process_eval(model: TinyMixtureModel, data_root: Path) -> dict[str, float]:
    """Per-domain eval cross-entropy of ``model`` over the same eval set, read by one process."""
    spec = build_domain_eval_dataloader(
        None, 4, {"local": str(data_root / "eval"), "max_seqs_per_domain": 3, "rank": 0, "world_size": 1}
    )
    domains = spec.dataloader.dataset.domains
    metrics = {d: DomainLanguageCrossEntropy(i, sync_on_compute=False) for i, d in enumerate(domains)}
    model.eval()
    with torch.no_grad():
        for batch in spec.dataloader:
            logits = model(batch)
            for metric in metrics.values():
                metric.update(logits, batch["labels"], batch["domain_idx"])
    return {f"{d}_LanguageCrossEntropy": float(m.compute()) for d, m in metrics.items()}


def main(argv: list[str]) -> None:
    from composer.utils import dist

    data_root, out, workers = Path(argv[0]), Path(argv[1]), int(argv[2])
    result = uninterrupted_and_resumed(data_root, out, workers)  # one folder: rank 0 writes checkpoints
    mine = {k: result[k] for k in ("full", "resumed")}
    gathered = dist.all_gather_object(mine)
    if dist.get_global_rank() == 0:
        record = {
            "world_size": dist.get_world_size(),
            "ranks": gathered,
            "eval_values": result["eval_values"],
            "single_process_eval": single_process_eval(result["model"], data_root),
        }
        with open(out / "result.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1:])
