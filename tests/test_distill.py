"""Distillation from a frozen teacher: the KD loss against a hand computation, its chunked form, the frozen
teacher module, and (below) real CPT runs with a ``distillation:`` section."""

import math

import pytest
import torch
from torch import nn

from shearing.distill import Teacher, chunked_kd_loss, kd_loss, mix_losses
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
    got = chunked_kd_loss(s2, hidden, head, targets, tau, chunk_size=chunk)
    (got * 0.6).backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
    assert head.weight.grad is None  # the teacher's head gets no gradient


def tiny_llama(seed):
    torch.manual_seed(seed)
    return MaskedLlamaForCausalLM(config_from_shape(named_shape("tiny_gqa_pruned")))


def test_teacher_is_frozen_in_eval_mode_and_out_of_the_state_dict():
    teacher = Teacher(tiny_llama(0), temperature=2.0, chunk_size=5)
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
