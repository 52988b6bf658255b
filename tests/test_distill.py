"""Distillation from a frozen teacher: the KD loss against a hand computation, its chunked form, the frozen
teacher module, and (below) real CPT runs with a ``distillation:`` section."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from shearing.distill import Teacher, attach_grad, chunked_kd_value_and_grad, kd_loss, mix_losses
from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import named_shape

B, T, V, D = 2, 7, 11, 5


def hand_kd(student, teacher, targets, tau):
    """τ² · mean over kept positions of Σ_v p_t (log p_t - log p_s), with explicit exp/log/sum in float64."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if int(targets[b, t]) == -100:
                continue
            s = [float(x) / tau for x in student[b, t]]
            q = [float(x) / tau for x in teacher[b, t]]
            zs, zq = sum(math.exp(x) for x in s), sum(math.exp(x) for x in q)
            p_s = [math.exp(x) / zs for x in s]
            p_t = [math.exp(x) / zq for x in q]
            total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
            count += 1
    return tau**2 * total / count


def random_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 3
    teacher = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[:, -1] = -100  # the last position never has a target (shift_labels)
    targets[0, 2] = -100
    targets[1, 4] = -100
    return student, teacher, targets


@pytest.mark.parametrize("tau", [0.7, 2.0])
def test_kd_loss_equals_the_hand_computation(tau):
    student, teacher, targets = random_case()
    got = kd_loss(student, teacher, targets, tau)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(hand_kd(student, teacher, targets, tau), rel=1e-5)
    # ignored positions do not count: changing their logits changes nothing
    student2 = student.clone()
    student2[0, 2] += 5.0
    assert float(kd_loss(student2, teacher, targets, tau)) == float(got)
    assert float(kd_loss(teacher, teacher, targets, tau)) == pytest.approx(0.0, abs=1e-6)


def test_mixed_loss_is_alpha_kd_plus_one_minus_alpha_ce():
    student, teacher, targets = random_case(1)
    ce = nn.functional.cross_entropy(student.flatten(0, 1), targets.flatten(), ignore_index=-100)
    alpha, tau = 0.3, 1.5
    want = alpha * hand_kd(student, teacher, targets, tau) + (1 - alpha) * float(ce)
    assert float(mix_losses(ce, kd_loss(student, teacher, targets, tau), alpha)) == pytest.approx(
        want, rel=1e-5
    )
    assert torch.equal(mix_losses(ce, torch.tensor(7.0), 0.0), ce)  # alpha 0: the CE bit for bit


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 100])  # 3 does not divide T=7
def test_chunked_kd_equals_unchunked_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    student, _, targets = random_case(2)
    head = nn.Linear(D, V, bias=False)
    hidden = torch.randn(B, T, D) * 2
    tau = 1.7

    s1 = student.clone().requires_grad_(True)
    ref = kd_loss(s1, head(hidden).detach(), targets, tau)
    (ref * 0.6).backward()
    s2 = student.clone().requires_grad_(True)
    # What Teacher.kd_loss does: value and gradient chunk by chunk, joined to the student's logits.
    got = attach_grad(
        s2, *chunked_kd_value_and_grad(s2.detach(), hidden, head, targets, tau, chunk_size=chunk)
    )
    (got * 0.6).backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
    assert head.weight.grad is None  # the teacher's head gets no gradient


def tiny_llama(seed):
    torch.manual_seed(seed)
    return MaskedLlamaForCausalLM(config_from_shape(named_shape("tiny_gqa_pruned")))


def test_teacher_is_frozen_in_eval_mode_and_out_of_the_state_dict():
    teacher = Teacher(tiny_llama(0), alpha=0.3, temperature=2.0, chunk_size=5)
    holder = nn.Module()
    holder.student = tiny_llama(1)
    holder.teacher = teacher
    holder.train()
    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    keys = list(holder.state_dict())
    assert keys and not any(k.startswith("teacher.") for k in keys)
    # a strict load of a checkpoint without the teacher keeps the teacher's weights
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    holder.load_state_dict(holder.state_dict(), strict=True)
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key

    ids = torch.randint(0, 512, (2, 12))
    student_logits = holder.student(ids).detach().requires_grad_(True)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    kd = teacher.kd_loss(ids, student_logits, targets)
    want = kd_loss(student_logits, teacher.model(ids), targets, 2.0)
    torch.testing.assert_close(kd, want, rtol=1e-6, atol=1e-6)
    kd.backward()
    assert student_logits.grad is not None and all(p.grad is None for p in teacher.parameters())


# Config checks (before any weights load) ---------------------------------------------------------

CPT = "yamls/testing/cpt_tiny.yaml"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir):
    """A random HF model of cpt_tiny's expected shape (tiny_gqa_pruned): the student of these runs."""
    from tiny import TINY_TARGET, make_hf_llama

    return make_hf_llama(tmp_path_factory.mktemp("student"), tokenizer_dir, seed=1, **TINY_TARGET)


def cpt_overrides(student_dir, data, *extra):
    return [f"variables.source_model={student_dir}", f"variables.data_local={data}", *extra]


@pytest.mark.parametrize(
    "override, message",
    [
        ("distillation.alpha=1.5", "distillation.alpha=1.5 must be a number in [0, 1]"),
        ("distillation.temperature=0", "distillation.temperature=0.0 must be a positive number"),
        ("distillation.chunk_size=-2", "distillation.chunk_size=-2 must be 0"),
        ("distillation.teacher=/nonexistent/teacher", "is not a Hugging Face checkpoint folder"),
        ("distillation.tmperature=2", "did you mean 'temperature'"),
    ],
)
def test_bad_distillation_values_are_refused_before_loading(student_dir, tiny_data, override, message):
    from shearing.config import load_config
    from shearing.train import validate_run

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_run(
            load_config(CPT, cpt_overrides(student_dir, tiny_data, "distillation.alpha=0.5", override))
        )


def test_teacher_of_another_vocabulary_is_refused(student_dir, tiny_data, tmp_path, tokenizer_dir):
    from tiny import make_hf_llama

    from shearing.config import load_config
    from shearing.train import validate_run

    other = make_hf_llama(tmp_path / "other", vocab_size=600)
    cfg = load_config(CPT, cpt_overrides(student_dir, tiny_data, f"distillation.teacher={other}"))
    with pytest.raises(ValueError, match="vocab_size=600 but model.source has 512"):
        validate_run(cfg)


def test_teacher_reference_losses_need_a_distillation_section(student_dir, tiny_data):
    from shearing.config import load_config
    from shearing.train import validate_run

    cfg = load_config(CPT, cpt_overrides(student_dir, tiny_data, "variables.reference_losses=teacher"))
    with pytest.raises(ValueError, match="reference_losses='teacher' .* no distillation: section"):
        validate_run(cfg)
    validate_run(
        load_config(
            CPT,
            cpt_overrides(
                student_dir, tiny_data, "variables.reference_losses=teacher", "distillation.alpha=0.5"
            ),
        )
    )


# Real CPT runs (cpt_tiny: a 3-layer student distilling from the 4-layer tiny source) ------------------

REPO = Path(__file__).resolve().parents[1]
STEPS = ["max_duration=40ba", "save_interval=10ba", "eval_interval=10ba"]


def run_trace(out: Path, overrides: list[str]) -> dict[int, dict]:
    from test_resume import read_trace, run

    run(out, CPT, [*overrides, f"variables.save_folder={out / 'run'}"])
    return read_trace(out / "trace.jsonl")


@pytest.fixture(scope="module")
def plain_and_alpha0(tmp_path_factory, student_dir, tiny_gqa_dir, tiny_data):
    root = tmp_path_factory.mktemp("alpha0")
    base = [*cpt_overrides(student_dir, tiny_data), *STEPS]
    plain = run_trace(root / "plain", base)
    alpha0 = run_trace(
        root / "alpha0", [*base, "distillation.alpha=0", f"distillation.teacher={tiny_gqa_dir}"]
    )
    return plain, alpha0


@pytest.mark.slow
def test_alpha_zero_is_plain_cpt_bit_for_bit_with_the_kd_term_computed(plain_and_alpha0):
    plain, alpha0 = plain_and_alpha0
    assert sorted(plain) == sorted(alpha0) == list(range(1, 41))
    for step in plain:
        assert alpha0[step]["loss/train/total"] == plain[step]["loss/train/total"], step
        # the KD term was computed (a different teacher: never 0) and logged, only weighted by 0
        assert alpha0[step]["loss/train/kd_loss"] > 0.01, step
        assert alpha0[step]["loss/train/lm_loss"] == plain[step]["loss/train/total"], step
    assert "loss/train/kd_loss" not in plain[1]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, student_dir, tiny_gqa_dir, tiny_data):
    """alpha=0.5 with reference_losses: teacher, killed at step 27 and resumed (tests/test_resume.py)."""
    from test_resume import kill_and_resume

    overrides = [
        *cpt_overrides(student_dir, tiny_data, *STEPS),
        "distillation.alpha=0.5",
        "distillation.temperature=2.0",
        "distillation.chunk_size=24",  # 64 positions: chunks of 24, 24, 16
        f"distillation.teacher={tiny_gqa_dir}",
        "variables.reference_losses=teacher",
    ]
    tmp = tmp_path_factory.mktemp("distilled")
    return kill_and_resume(tmp, CPT, overrides)  # asserts the resumed trace equals the straight one


@pytest.mark.slow
def test_distillation_resumes_exactly_and_logs_its_loss_parts(distilled, plain_and_alpha0):
    from test_resume import read_trace

    straight, _ = distilled
    trace = read_trace(straight / "trace.jsonl")
    plain, _ = plain_and_alpha0
    for step, record in trace.items():
        parts = 0.5 * record["loss/train/kd_loss"] + 0.5 * record["loss/train/lm_loss"]
        assert record["loss/train/total"] == pytest.approx(parts, rel=1e-5), step
    assert trace[1]["loss/train/lm_loss"] == plain[1]["loss/train/total"]  # same start, same batch
    assert any(trace[s]["loss/train/total"] != plain[s]["loss/train/total"] for s in trace)
    assert trace[40]["loss/train/lm_loss"] != plain[40]["loss/train/total"]  # KD changed the weights
    # The checkpoint holds no teacher weights (rebuilt from the source at start).
    state = torch.load(straight / "run" / "ep0-ba40-rank0.pt", weights_only=False)["state"]["model"]
    assert state and not any(".teacher." in k or k.startswith("teacher.") for k in state)


@pytest.mark.slow
def test_reference_losses_teacher_are_the_teachers_eval_losses(distilled, tiny_gqa_dir, tiny_data):
    from shearing.models.hf_io import load_source_model
    from shearing.reference_losses import domain_eval_losses

    straight, _ = distilled
    got = json.loads((straight / "run" / "dynamic_loading.json").read_text())["reference_losses"]
    teacher, _ = load_source_model(tiny_gqa_dir)
    want = domain_eval_losses(teacher, tiny_data / "eval", batch_size=8, max_seqs=16, progress=False)
    assert got.keys() == want.keys()
    for domain in want:
        assert got[domain] == pytest.approx(want[domain], rel=1e-6), domain


@pytest.mark.multiprocess
def test_two_rank_fsdp2_distillation_shards_the_teacher(tmp_path, student_dir, tiny_gqa_dir, tiny_data):
    from tiny import run_two_ranks

    run_two_ranks(
        tmp_path,
        REPO / "tests/scripts/distill_two_ranks.py",
        str(tmp_path),
        str(REPO / CPT),
        *cpt_overrides(student_dir, tiny_data, f"variables.save_folder={tmp_path / 'run'}"),
        "max_duration=6ba",
        "eval_interval=6ba",
        "save_interval=6ba",
        "distillation.alpha=0.5",
        "distillation.chunk_size=16",
        f"distillation.teacher={tiny_gqa_dir}",
        "fsdp_config={sharding_strategy: FULL_SHARD, mixed_precision: DEFAULT, state_dict_type: full}",
    )
    for rank in (0, 1):
        record = json.loads((tmp_path / f"layout_rank{rank}.json").read_text())
        assert record["batch"] == 6 and record["loss"]["loss/train/kd_loss"] > 0
        layer = record["teacher"]["model.model.layers.0.self_attn.q_proj.weight"]
        assert layer["placements"] == ["S(0)"] and layer["local"][0] * 2 == layer["full"][0]
        assert not any(p["requires_grad"] for p in record["teacher"].values())
        assert record["teacher"]["model.lm_head.weight"]["placements"] == ["S(0)"]


@pytest.mark.slow
def test_pruning_run_distils_from_its_source(tmp_path, tiny_gqa_dir, tiny_data):
    """Stage 1 with distillation: the loss is alpha·kd + (1-alpha)·CE + the Lagrangian term, every step."""
    from tiny import run_overrides

    from shearing.train import train_from_yaml

    run = tmp_path / "run"
    overrides = run_overrides(
        tiny_gqa_dir,
        tiny_data,
        run,
        "variables.max_duration=12ba",
        "variables.save_interval=12ba",
        "variables.eval_interval=12ba",
        "distillation.alpha=0.3",
        "distillation.chunk_size=20",
    )
    trainer = train_from_yaml(REPO / "yamls/testing/prune_tiny.yaml", overrides)
    assert trainer.state.model.teacher is not None and trainer.state.model.l0 is not None
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in steps if "loss/train/kd_loss" in r]
    assert len(losses) == 12
    for r in losses:
        # at step 0 the masks are ~1 and the student is the teacher: kd ~ 0, later it grows
        expected = 0.3 * r["loss/train/kd_loss"] + 0.7 * r["loss/train/lm_loss"] + r["loss/train/lagrangian"]
        assert r["loss/train/total"] == pytest.approx(expected, rel=1e-5, abs=1e-6), r["step"]
    assert max(r["loss/train/kd_loss"] for r in losses) > 1e-3
    assert any(r["loss/train/lagrangian"] != 0 for r in losses)
