"""Per-domain cross-entropy: equals a hand computation, ignores other domains, never NaN."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shearing.metrics import DomainLanguageCrossEntropy


def hand_ce(logits, labels, domain_idx, domain, ignore=-100):
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        if int(domain_idx[b]) != domain:
            continue
        for t in range(logits.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == ignore:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, 0) - row[target])
            count += 1
    return total / count, count


def test_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[1, 3] = -100
    domain_idx = torch.tensor([0, 1, 1, 2])
    metric = DomainLanguageCrossEntropy(1)
    metric.update(logits, labels, domain_idx)
    expected, count = hand_ce(logits, labels, domain_idx, 1)
    assert count == 9 and int(metric.total) == 9  # two rows of 5 predictions, one ignored
    assert math.isclose(float(metric.compute()), expected, rel_tol=1e-6)

    # A second update: the mean is over all tokens seen, not a mean of batch means.
    more = torch.randn(2, 6, 11)
    more_labels = torch.randint(0, 11, (2, 6))
    metric.update(more, more_labels, torch.tensor([1, 0]))
    both, n = hand_ce(
        torch.cat([logits, more]), torch.cat([labels, more_labels]), torch.tensor([0, 1, 1, 2, 1, 0]), 1
    )
    assert n == 14 and math.isclose(float(metric.compute()), both, rel_tol=1e-6)


def test_absent_domain_is_zero_not_nan():
    metric = DomainLanguageCrossEntropy(3)
    assert float(metric.compute()) == 0.0  # nothing seen at all
    metric.update(torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5)), torch.tensor([0, 1]))
    value = metric.compute()
    assert not torch.isnan(value) and float(value) == 0.0 and int(metric.total) == 0
    assert metric.per_domain  # the model passes (logits, labels, domain_idx) to such metrics


def test_states_reduce_by_sum_across_ranks():
    metric = DomainLanguageCrossEntropy(0)
    assert metric._reductions["sum_loss"].__name__ == "dim_zero_sum"
    assert metric._reductions["total"].__name__ == "dim_zero_sum"
    a, b = DomainLanguageCrossEntropy(0), DomainLanguageCrossEntropy(0)
    torch.manual_seed(1)
    x, y, d = torch.randn(3, 4, 5), torch.randint(0, 5, (3, 4)), torch.tensor([0, 0, 1])
    a.update(x[:1], y[:1], d[:1])
    b.update(x[1:], y[1:], d[1:])
    a.merge_state(b)  # what a two-rank sync computes
    expected, _ = hand_ce(x, y, d, 0)
    assert math.isclose(float(a.compute()), expected, rel_tol=1e-6)


def train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_domain_absent_from_a_batch_logs_no_train_loss(tmp_path, tiny_gqa_dir, tiny_data):
    """A real tiny pruning run with batches of one sequence: each batch holds exactly one domain.

    Composer logs every train metric every batch; the absent domain must log no key (not 0.0), the
    present one its loss, and the evaluation every domain.
    """
    from shearing.train import train_from_yaml

    run_dir = tmp_path / "run"
    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        "variables.max_duration=8ba",
        "variables.eval_interval=4ba",
        "variables.save_interval=8ba",
        "variables.reference_losses={code: 3.0, docs: 3.0}",
        "train_loader.dataset.proportions=[0.5, 0.5]",
        "global_train_batch_size=1",
        "device_train_microbatch_size=1",
    ]
    trainer = train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    trainer.close()
    domains = ["code", "docs"]
    train_keys = {f"metrics/train/{d}_LanguageCrossEntropy": d for d in domains}
    eval_keys = [f"metrics/eval/{d}_LanguageCrossEntropy" for d in domains]
    records = train_records(run_dir)
    per_step = {}
    for record in records:
        for key in train_keys.keys() & record.keys():
            per_step.setdefault(record["step"], []).append((train_keys[key], record[key]))
    assert sorted(per_step) == list(range(8))  # Composer logs batch b's train metrics at step b - 1
    assert all(len(logged) == 1 for logged in per_step.values()), per_step  # one domain per batch
    assert {d for logged in per_step.values() for d, _ in logged} == set(domains)  # both were drawn
    assert all(value > 1.0 for logged in per_step.values() for _, value in logged)  # real losses, no 0.0
    assert all("metrics/train/LanguageCrossEntropy" in r for r in records if train_keys.keys() & r.keys())
    evals = [r for r in records if any(k in r for k in eval_keys)]
    assert len(evals) == 2 and all(r[k] > 1.0 for r in evals for k in eval_keys)  # steps 4 and 8


def test_one_cross_entropy_pass_per_batch_feeds_the_loss_and_every_metric(tmp_path, tiny_gqa_dir, tiny_data):
    """A real tiny pruning run, with two micro-batches a step and evaluations: over the vocabulary, exactly one
    log-softmax/cross-entropy per model forward (each train micro-batch, each eval batch), though the loss, the
    overall and per-domain cross-entropies, the perplexity and dynamic loading all read it."""
    import torch.nn.functional as F

    from shearing.composer.model import ComposerShearedLlama
    from shearing.train import train_from_yaml

    vocab = json.loads((tiny_gqa_dir / "config.json").read_text())["vocab_size"]
    counts = {"passes": 0, "forwards": 0, "eval_forwards": 0}

    def counting(function):
        def wrapper(input, *args, **kwargs):
            if input.shape[-1] == vocab:
                counts["passes"] += 1
            return function(input, *args, **kwargs)

        return wrapper

    forward = ComposerShearedLlama.forward

    def counted_forward(self, batch):
        counts["forwards"] += 1
        counts["eval_forwards"] += not self.training
        return forward(self, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "log_softmax", counting(F.log_softmax))
        patch.setattr(F, "cross_entropy", counting(F.cross_entropy))
        patch.setattr(ComposerShearedLlama, "forward", counted_forward)
        trainer = train_from_yaml(
            "yamls/testing/prune_tiny.yaml",
            [
                f"variables.source_model={tiny_gqa_dir}",
                f"variables.data_local={tiny_data}",
                f"variables.save_folder={tmp_path / 'run'}",
                "variables.max_duration=4ba",
                "variables.eval_interval=2ba",
                "variables.save_interval=4ba",
                "variables.reference_losses={code: 3.0, docs: 3.0}",
                "global_train_batch_size=4",
                "device_train_microbatch_size=2",
            ],
        )
        trainer.close()
    train_forwards = counts["forwards"] - counts["eval_forwards"]
    assert train_forwards == 4 * 2 and counts["eval_forwards"] > 0, counts
    assert counts["passes"] == counts["forwards"], counts  # was 1 + 1 + 1 + one per domain's rows
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {key for record in records for key in record}
    assert {
        "metrics/train/LanguageCrossEntropy",
        "metrics/train/LanguagePerplexity",
        "metrics/eval/code_LanguageCrossEntropy",
        "metrics/eval/docs_LanguageCrossEntropy",
    } <= logged
