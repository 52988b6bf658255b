"""The L0 module: every mask family of a pruning run, its Lagrange multipliers, and expected sizes.

Families (SPEC §1) and the shapes of their ``log_alpha``, with D hidden, L layers, H query heads,
G key/value groups, F MLP width:

=============  =======  ==============================================================
family         shape    gates
=============  =======  ==============================================================
hidden         [D]      one residual channel everywhere (``hidden_z``)
head           [L, H]   one attention head's context before ``o_proj`` (``head_z``)
kv_group       [L, G]   a KV head and all query heads of its group (``kv_group_z``; GQA only)
intermediate   [L, F]   one MLP channel before ``down_proj`` (``intermediate_z``)
layer          [L]      a whole decoder block (``layer_z``)
head_layer     [L]      the attention block of a layer (``head_layer_z``; CoFi-style alternative)
mlp            [L]      the MLP block of a layer (``mlp_z``; CoFi-style alternative)
=============  =======  ==============================================================

A family is created only when the target needs it (its target size is below the source's). The
user chooses which families may be pruned (``families``, default hidden, head, intermediate, layer);
a target that changes a dimension no chosen family can remove is an error, never a wrong shape.

Grouped-query attention (beyond the reference code, which is MHA-only): a valid HF model needs every
KV group to keep the same number of query heads. With multi-head attention (one KV head per query
head) the ``head`` family gates query and KV heads together and the final top-k is per layer. With
GQA, ``kv_group`` [L, G] appears when the target has fewer KV heads, and the ``head`` family's final
top-k is taken per group: each group keeps exactly H_t / G_t query heads. The ``head`` family's target
sparsity is then the within-group fraction removed, 1 - (H_t / G_t) / (H / G).

Deterministic masks: zero the k smallest soft values per row, keep the others at their soft value
(see ``hard_concrete``). k is the exact (source - target) for the final masks and the expected number
of zeros, round(row size - sum p), for evaluations during pruning. The ``head_layer``/``mlp`` pair
drops the same layers at the end (ranked by the product of the two soft values) so the result is a
standard decoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from shearing.models.masks import count_masked_params
from shearing.models.shapes import LlamaShape, count_params
from shearing.pruning import hard_concrete as hc
from shearing.pruning.plan import DEFAULT_FAMILIES, USER_FAMILIES, FamilySpec, PruningPlan, plan_families


@dataclass(frozen=True)
class PruningClock:
    """Where a training forward is in the run: the optimizer step and the Lagrangian warmup progress (0 -> 1)."""

    step: int = 0
    progress: float = 0.0


class L0Output(NamedTuple):
    """What a clocked ``L0Module`` forward returns (a tuple, so FSDP/DDP see its tensors)."""

    masks: dict[str, torch.Tensor]  # "<family>_z" -> mask (a sample in training, deterministic in eval)
    lagrangian: torch.Tensor  # the constraint term to add to the loss (differentiable)
    stats: dict[str, torch.Tensor]  # detached values to log (``mask_stats``)


class L0Module(nn.Module):
    """Mask logits and Lagrange multipliers for one pruning run (one ``PruningPlan``).

    ``l0()`` returns deterministic masks (keys ``<family>_z``): the expected number of zeros per row, or
    the exact target when ``use_final_masks`` is set. ``l0(clock)`` returns an ``L0Output``: the masks (a
    fresh hard-concrete sample in training mode), the Lagrangian term at ``clock.progress`` and the stats
    to log. Both run inside ``forward`` so FSDP has the parameters materialised.

    The sampling noise comes from a generator seeded by (seed, step, rank, micro-batch), not from the
    global RNG: a resumed run draws exactly the masks the uninterrupted run drew, whatever else consumed
    random numbers in between (Composer does not restore the global RNG when the dataset resumes itself).
    The micro-batch index counts the clocked training forwards of one step.
    """

    def __init__(
        self,
        source: LlamaShape,
        target: LlamaShape,
        families: Sequence[str] = DEFAULT_FAMILIES,
        seed: int = 17,
        *,
        plan: PruningPlan | None = None,
    ):
        super().__init__()
        self.plan = plan if plan is not None else PruningPlan.build(source, target, families)
        self.source, self.target = source, target
        self.specs = self.plan.spec_by_name
        self.log_alphas = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(spec.shape)) for name, spec in self.specs.items()}
        )
        self.lambdas = nn.ParameterDict()
        for name in self.specs:
            self.lambdas[f"{name}_1"] = nn.Parameter(torch.zeros(1))  # 1-D: FSDP2 shards no scalars
            self.lambdas[f"{name}_2"] = nn.Parameter(torch.zeros(1))
        self.use_final_masks = False
        self.seed = seed
        self._noise_step, self._micro_batch = -1, 0
        self.reset_parameters()

    @classmethod
    def from_plan(cls, plan: PruningPlan, seed: int = 17) -> L0Module:
        return cls(plan.source, plan.target, plan.families, seed=seed, plan=plan)

    def reset_parameters(self) -> None:
        for log_alpha in self.log_alphas.values():
            hc.init_log_alpha(log_alpha)
        for lam in self.lambdas.values():
            nn.init.zeros_(lam)

    @torch.no_grad()
    def init_log_alphas_(self, values: Mapping[str, torch.Tensor]) -> None:
        """Start from given logits (e.g. ``pruning.init: importance``): family name -> tensor of its shape,
        copied in and clamped to the logit range. Families not named keep their current values."""
        unknown = sorted(set(values) - set(self.log_alphas))
        if unknown:
            raise ValueError(
                f"initial mask logits for {unknown}, but this run's families are {sorted(self.specs)}"
            )
        for name, value in values.items():
            log_alpha = self.log_alphas[name]
            if tuple(value.shape) != tuple(log_alpha.shape):
                raise ValueError(
                    f"initial mask logits for {name} have shape {tuple(value.shape)}, the family has "
                    f"{tuple(log_alpha.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"initial mask logits for {name} are not finite")
            log_alpha.copy_(value.to(log_alpha.dtype))
            hc.clamp_log_alpha_(log_alpha)

    # ----------------------------------------------------------------------------------- masks
    def forward(self, clock: PruningClock | None = None) -> dict[str, torch.Tensor] | L0Output:
        if clock is None:
            if self.training:
                return self._sample_masks(PruningClock())
            return self.deterministic_masks(exact=self.use_final_masks)
        lagrangian, expected = self.lagrangian(clock.progress)
        stats = mask_stats(self, clock.progress, expected)
        if self.training:
            masks = self._sample_masks(clock)
        else:
            masks = self.deterministic_masks(exact=self.use_final_masks)
        return L0Output(masks, lagrangian, stats)

    def _sample_masks(self, clock: PruningClock) -> dict[str, torch.Tensor]:
        generator = self._noise_generator(clock.step)
        return {f"{name}_z": hc.sample_gates(la, generator) for name, la in self.clamped_log_alphas().items()}

    def clamped_log_alphas(self) -> dict[str, torch.Tensor]:
        """Every family's logits clamped to [ln 0.01, ln 100] out of place (see ``hard_concrete``): the
        stored values are kept in range after every optimizer step, so this is the identity in training."""
        return {name: hc.clamped(la) for name, la in self.log_alphas.items()}

    def clamp_stored_(self) -> None:
        """Clamp the stored logits (their local shards under FSDP) in place; call after an optimizer step."""
        for log_alpha in self.log_alphas.values():
            hc.clamp_log_alpha_(log_alpha)

    def clamp_after_steps(self, optimizer: torch.optim.Optimizer):
        """Clamp the stored logits after every ``optimizer.step()`` (a step post-hook; returns its handle).

        The logits are looked up at each step, so this holds for the parameters FSDP installs later."""
        return hc.register_log_alpha_clamp(optimizer, lambda: self.log_alphas.values())

    def mask_parameters(self) -> list[nn.Parameter]:
        """The mask logits (the optimizer's ``mask_lr`` group)."""
        return list(self.log_alphas.values())

    def multiplier_parameters(self) -> list[nn.Parameter]:
        """The Lagrange multipliers (the optimizer's ``lambda_lr`` group, ascended)."""
        return list(self.lambdas.values())

    def _noise_generator(self, step: int) -> torch.Generator:
        from composer.utils import dist

        if step != self._noise_step:
            self._noise_step, self._micro_batch = step, 0
        device = next(iter(self.log_alphas.values())).device
        generator = torch.Generator(device=device)
        key = ((self.seed * 1_000_003 + step) * 10_007 + dist.get_global_rank()) * 1_009 + self._micro_batch
        generator.manual_seed(key % (2**63 - 1))
        self._micro_batch += 1
        return generator

    @torch.no_grad()
    def deterministic_masks(self, exact: bool) -> dict[str, torch.Tensor]:
        """Masks with exactly-zero pruned units and soft-valued kept units (see the module docstring)."""
        masks = {}
        log_alphas = {name: la.detach() for name, la in self.clamped_log_alphas().items()}
        for name, spec in self.specs.items():
            log_alpha = log_alphas[name]
            values = hc.soft_value(log_alpha)
            if exact and spec.group:
                blocks = values.reshape(*values.shape[:-1], -1, spec.group)
                ranking = log_alpha.reshape(blocks.shape)
                masks[name] = hc.topk_mask(blocks, spec.group - spec.keep, ranking).reshape(values.shape)
            elif exact:
                masks[name] = hc.topk_mask(values, spec.row_size - spec.keep, log_alpha)
            else:
                expected_zeros = torch.round(spec.row_size - hc.keep_probability(log_alpha).sum(-1)).long()
                masks[name] = hc.topk_mask(values, expected_zeros, log_alpha)
        if exact and "head_layer" in masks:
            # Drop the same layers from both sub-blocks so the result is a standard decoder.
            score = hc.soft_value(log_alphas["head_layer"]) * hc.soft_value(log_alphas["mlp"])
            keep = hc.topk_mask(score, self.source.num_hidden_layers - self.target.num_hidden_layers) > 0
            for name in ("head_layer", "mlp"):
                masks[name] = hc.soft_value(log_alphas[name]) * keep
        return {f"{name}_z": mask for name, mask in masks.items()}

    # ----------------------------------------------------------------------- expected sparsity
    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        return {name: hc.keep_probability(la) for name, la in self.clamped_log_alphas().items()}

    def expected_sparsity(self) -> dict[str, torch.Tensor]:
        """Per family, 1 - sum(p) / row size for each row (a vector of L for per-layer families)."""
        return {name: 1.0 - p.sum(-1) / p.shape[-1] for name, p in self.keep_probabilities().items()}

    def target_sparsity(self, progress: float) -> dict[str, float]:
        """The sparsity each family is held to at ``progress`` (0 → 1) through the Lagrangian warmup."""
        fraction = min(max(progress, 0.0), 1.0)
        return {name: spec.target_sparsity * fraction for name, spec in self.specs.items()}

    def lagrangian(self, progress: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """sum over families of mean_rows[lambda1 (s - t) + lambda2 (s - t)^2]; and s per family."""
        expected = self.expected_sparsity()
        targets = self.target_sparsity(progress)
        total = torch.zeros((), device=next(self.parameters()).device)
        for name, sparsity in expected.items():
            gap = sparsity - targets[name]
            term = self.lambdas[f"{name}_1"] * gap + self.lambdas[f"{name}_2"] * gap.pow(2)
            total = total + term.mean()
        return total, expected

    # ----------------------------------------------------------------------- parameter counts
    def expected_num_params(self) -> torch.Tensor:
        """Expected parameter count of the masked model (embeddings, norms and LM head included)."""
        return count_masked_params(self.source, self.keep_probabilities())

    @torch.no_grad()
    def final_num_params(self) -> int:
        """Exact parameter count of the model the final masks cut out."""
        keep = {
            name[: -len("_z")]: (mask > 0).float()
            for name, mask in self.deterministic_masks(exact=True).items()
        }
        return int(round(float(count_masked_params(self.source, keep))))


def mask_stats(
    l0: L0Module, progress: float, expected: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Values to log every step (detached tensors, no host sync): expected sparsity and current target
    per family, the multipliers, the expected and target parameter counts."""
    with torch.no_grad():
        stats: dict[str, torch.Tensor] = {}
        targets = l0.target_sparsity(progress)
        expected = l0.expected_sparsity() if expected is None else expected
        for name, sparsity in expected.items():
            stats[f"pruning/expected_sparsity/{name}"] = sparsity.detach().mean()
            stats[f"pruning/target_sparsity/{name}"] = torch.tensor(targets[name])
            stats[f"pruning/lambda_1/{name}"] = l0.lambdas[f"{name}_1"].detach().sum()
            stats[f"pruning/lambda_2/{name}"] = l0.lambdas[f"{name}_2"].detach().sum()
        stats["pruning/expected_num_params"] = l0.expected_num_params().detach()
        stats["pruning/target_num_params"] = torch.tensor(float(count_params(l0.target)))
    return stats


def warmup_progress(step: int, warmup_steps: int) -> float:
    """Fraction of the target sparsity in force at ``step`` (linear ramp over ``warmup_steps``)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


__all__ = [
    "DEFAULT_FAMILIES",
    "USER_FAMILIES",
    "FamilySpec",
    "L0Module",
    "L0Output",
    "PruningClock",
    "PruningPlan",
    "count_masked_params",
    "mask_stats",
    "plan_families",
    "warmup_progress",
]
