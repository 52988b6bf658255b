"""Knowledge distillation from a frozen teacher (by default the source model) during training.

Legend: B batch, T sequence, D hidden, V vocabulary, c positions per chunk.

The training loss becomes ``alpha · τ² · KL(p_teacher ‖ p_student) + (1 - alpha) · CE``, where both
distributions are softmaxes at temperature τ and the τ² keeps the KD gradient on the scale of the CE one
(Hinton et al., 2015). Both terms are means over the same tokens: those whose shifted label is not -100.

Memory. Teacher logits are never held for the whole sequence: the teacher runs once to its final
hidden states [B, T, D] (no grad), and its LM head is applied ``chunk_size`` positions at a time. For
each chunk the KL and its gradient with respect to the student's logits, ``τ · (p_s - p_t) / N``, are
computed in fp32 and the chunk's teacher probabilities are dropped at once. Autograd would instead keep
every chunk's teacher probabilities until the backward pass (B·T·V floats, the very tensor chunking is
meant to avoid), so the gradient is computed in the forward pass and handed to autograd by
``_PrecomputedGrad``; the one [B, T, V] buffer it needs is the size of the student's logits gradient,
which the backward pass would allocate anyway.

FSDP. ``Teacher`` is a direct child of the Composer model, so Composer shards it like the student: one
unit per decoder layer (its ``fsdp_wrap_fn``) and one for the rest (embeddings, final norm, LM head).
The whole teacher computation, including the chunked LM head, runs inside ``Teacher.forward`` under
no_grad, so FSDP has its parameters gathered exactly then and never in the backward pass.

Checkpoints. The teacher is frozen and rebuilt from its source at every start, so its weights are kept
out of the state dict (the export's ``rebuild()`` refuses unknown keys, and a 7B teacher would double the
checkpoint); a load fills the teacher's keys with the weights it already holds, so a strict load works.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shearing.metrics import IGNORE_INDEX
from shearing.models.llama import MaskedDecoderLayer, MaskedLlamaForCausalLM


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """τ² · mean over kept tokens of KL(softmax(teacher/τ) ‖ softmax(student/τ)), in fp32.

    ``student_logits``, ``teacher_logits``: [B, T, V]; ``targets``: [B, T] shifted labels (a position is
    kept when its target is not ``ignore_index``). No kept token gives 0.
    """
    keep = targets != ignore_index
    log_p_s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return temperature**2 * kl / keep.sum().clamp_min(1)


def mix_losses(lm_loss: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha · kd + (1 - alpha) · lm_loss`` (alpha = 0 gives ``lm_loss`` bit for bit)."""
    return alpha * kd + (1.0 - alpha) * lm_loss


@torch.no_grad()
def chunked_kd_value_and_grad(
    student_logits: torch.Tensor,
    teacher_hidden: torch.Tensor,
    lm_head: nn.Module,
    targets: torch.Tensor,
    temperature: float,
    chunk_size: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_loss`` and its gradient with respect to ``student_logits``, teacher logits made per chunk.

    ``teacher_hidden``: [B, T, D], what ``lm_head`` reads; ``chunk_size``: positions per chunk (0: all T).
    Returns (fp32 scalar, gradient shaped and typed like ``student_logits``).
    """
    B, T, V = student_logits.shape
    chunk = T if chunk_size <= 0 else min(chunk_size, T)
    keep = targets != ignore_index
    count = keep.sum().clamp_min(1).float()
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    grad = torch.empty_like(student_logits)  # every position is written below
    # Vocabulary-wide work is most of the cost (B·c·V elements per op): two log-softmaxes, one exp each way,
    # and the rest in place on their buffers; no division when temperature is 1.
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        kept = keep[:, start:stop].float()  # B c
        z_s = student_logits[:, start:stop].float()
        z_t = lm_head(teacher_hidden[:, start:stop]).float()
        if temperature != 1.0:
            z_s, z_t = z_s / temperature, z_t / temperature
        log_p_s = F.log_softmax(z_s, dim=-1)  # B c V
        log_p_t = F.log_softmax(z_t, dim=-1)
        p_t = log_p_t.exp()
        kl = torch.sub(log_p_t, log_p_s, out=log_p_t).mul_(p_t).sum(-1)  # B c: KL(p_t || p_s) per position
        total += (kl * kept).sum()
        # d/dz_s of τ² Σ_v p_t (log p_t - log softmax(z_s / τ)) = τ (p_s - p_t)
        scale = (temperature * kept / count)[..., None]
        grad[:, start:stop] = log_p_s.exp_().sub_(p_t).mul_(scale)
    return temperature**2 * total / count, grad


class _PrecomputedGrad(torch.autograd.Function):
    """Returns ``value``; backward hands ``grad`` (× the incoming gradient) to ``logits``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def attach_grad(student_logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` as a differentiable function of ``student_logits`` whose gradient is ``grad``."""
    return _PrecomputedGrad.apply(student_logits, value, grad)


class Teacher(nn.Module):
    """A frozen teacher LLaMA and the KD settings (``alpha``, ``temperature``, ``chunk_size``): always in
    eval mode, no gradients, kept out of checkpoints.

    ``forward(input_ids, student_logits, targets)`` returns the KD loss value and its gradient with
    respect to the student's logits (both without autograd history; ``attach_grad`` joins them).
    """

    def __init__(
        self, model: MaskedLlamaForCausalLM, alpha: float = 0.5, temperature: float = 1.0, chunk_size: int = 0
    ):
        super().__init__()
        self.model = model
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.chunk_size = int(chunk_size)
        self.model.activation_checkpointing = False  # runs under no_grad: nothing to recompute
        self.model.requires_grad_(False)
        self.train(False)
        self._register_state_dict_hook(_drop_own_keys)
        self.register_load_state_dict_pre_hook(_fill_own_keys)

    def train(self, mode: bool = True) -> Teacher:
        """Stays in eval mode whatever the trainer asks for."""
        return super().train(False)

    # One FSDP unit per decoder layer, as for the student (Composer asks the Composer model's children).
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return isinstance(module, MaskedDecoderLayer)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return False

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.hidden_states(input_ids)
        return chunked_kd_value_and_grad(
            student_logits.detach(), hidden, self.model.lm_head, targets, self.temperature, self.chunk_size
        )

    def kd_loss(
        self, input_ids: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """The KD loss as a differentiable function of ``student_logits`` (the teacher runs in ``self(...)``,
        so FSDP gathers its weights around it)."""
        value, grad = self(input_ids, student_logits.detach(), targets)
        return attach_grad(student_logits, value, grad)


def _own_tensors(module: nn.Module):
    persistent = (
        (f"{name}.{buffer_name}" if name else buffer_name, buffer)
        for name, sub in module.named_modules()
        for buffer_name, buffer in sub._buffers.items()
        if buffer is not None and buffer_name not in sub._non_persistent_buffers_set
    )
    return itertools.chain(module.named_parameters(), persistent)


def _drop_own_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _fill_own_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for name, tensor in _own_tensors(module):
        state_dict.setdefault(prefix + name, tensor.detach())


def build_teacher(
    spec: Any,
    attn_impl: str = "sdpa",
    seed: int = 17,
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 0,
) -> Teacher:
    """Load the teacher (an HF checkpoint folder, or the source spec itself) and freeze it.

    The load runs under a forked RNG: a random-init teacher must not shift the run's random stream, so a
    distillation run with ``alpha: 0`` is the plain run bit for bit.
    """
    from shearing.models.hf_io import load_source_model

    with torch.random.fork_rng(devices=[]):
        model, _ = load_source_model(spec, attn_impl=attn_impl, seed=seed)
    return Teacher(model, alpha=alpha, temperature=temperature, chunk_size=chunk_size)
