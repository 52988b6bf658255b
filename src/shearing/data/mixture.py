"""Deterministic domain mixing: how many samples of each domain fill every global batch, and which.

A global batch (``device_batch_size × world_size`` samples) is split among k domains by a pure function
of (seed, step, proportion schedule). Every rank computes the same composition without talking to
the others, and a resumed run composes exactly the batches an uninterrupted run would have. Nothing here
does I/O; ``shearing.data.dataloader`` reads the samples.

Allocation
----------
Let ``p(t)`` be the proportions in effect for batch t, ``B`` the global batch size,
``I_i(t) = sum_{s<=t} p_i(s) * B`` the ideal cumulative count of domain i and ``C_i(t)`` the samples it
actually got. The residual ``r_i = I_i - C_i`` (ideal minus drawn) is carried from batch to batch, in
exact integers: proportions are quantised to integer weights summing to ``RESOLUTION = 2**32``
(largest remainder, < 2.4e-10 per slot off the float proportion) and residuals count in those units,
so every process does the same integer arithmetic and no float drift can split the ranks.

A batch is filled slot by slot with Tijdeman's chairman-assignment rule: at each slot every residual
grows by its domain's proportion; among the domains whose residual is at least ``1/(2k-2)`` (eligible),
the slot goes to the one that would first fall ``1 - 1/(2k-2)`` behind (earliest deadline), ties to the
larger residual, then the lower index. If that leaves some domain a full sample or more from its ideal,
the batch is redone by water-filling: slots go one at a time to the domain with the largest remaining
residual, which minimises the largest residual left (greedy on the maximum is optimal for that).

What this guarantees (each is a test in ``tests/data/test_mixture.py``):

1. Counts never decrease and every batch holds exactly B samples.
2. No domain ever gets a full sample ahead of its ideal: ``C_i - I_i < 1`` after every batch, for any
   schedule. (Tijdeman only serves a residual >= 1/(2k-2) > 0 and is kept only if all residuals stay in
   (-1, 1). Water-filling serves a domain only while its residual is the largest, hence >= the mean of
   the remaining ones, which is > 0 while slots remain; a domain it skips keeps ``r + p*B >= r > -1``.)
3. If any allocation of a batch keeps every domain strictly within 1 sample of its ideal, the chosen
   one does (Tijdeman's if it does, else water-filling, whose largest residual is the smallest possible).
4. With proportions constant since the start, ``|C_i - I_i| <= 1 - 1/(2k-2)`` after every batch
   (R. Tijdeman, "The chairman assignment problem", Discrete Math. 32, 1980). The water-filling
   fallback never triggers then.
5. No rule whatsoever can keep every domain within 1 sample for every schedule: with 7 domains two
   batches force some domain a full sample behind and a third more than that (1.25 on the main line),
   whatever the rule does (``test_no_rule_can_promise_one_sample`` enumerates every allocation of
   every rule). Such schedules swing a domain between ~0 and most of the
   batch on consecutive steps. Dynamic batch loading changes proportions only at evaluations, by
   multiplicative factors; on such schedules (1,000 batches, updates every 1 to 50 batches, gaps of
   up to ~2 nats) every domain stays within 1 sample, in practice within ``1 - 1/(2k-2)``. On random
   adversarial schedules (sparse mixes jumping every batch, k = 7) the worst seen is ~1.1 samples.

Which samples
-------------
Domain i's n-th drawn sample is ``perm(seed, i, e)[n mod N_i]`` with epoch ``e = n // N_i``: each domain
walks its own reshuffled epochs, so no sample repeats within a domain's epoch, a domain that runs out
starts a new epoch (the caller logs it) and nothing is ever padded. The permutation is seeded by
(seed, crc32(domain name), epoch), so reordering the domain list does not change a domain's order.

Slots to ranks
--------------
A batch's slots are listed domain by domain (each domain's samples in stream order) and dealt
round-robin, slot j to rank ``j mod W``, so each rank's share of every domain is within one sample of
1/W of the batch's; each rank then shuffles its device batch (seed, step, rank) so microbatches mix too.

State
-----
``MixtureState`` is O(k): the next step, per-domain counts (= stream cursors; the epoch is
``count // N``), residuals, the proportions in effect and the updates not yet in effect. No list of
used sample ids is kept anywhere.
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

RESOLUTION = 1 << 32  # one sample = RESOLUTION units of residual; weights sum to RESOLUTION
PROPORTION_TOLERANCE = 1e-6  # |sum(p) - 1| allowed before we refuse (we never renormalise beyond it)
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------
# Proportions


def validate_proportions(
    proportions: Sequence[float] | Mapping[str, float], domains: Sequence[str]
) -> list[float]:
    """Proportions aligned with ``domains``, checked: finite, >= 0, one per domain, summing to 1 (± 1e-6).

    A mapping must name exactly the domains; a sequence must have one entry per domain, in order.
    """
    if isinstance(proportions, Mapping):
        unknown = sorted(set(proportions) - set(domains))
        missing = [d for d in domains if d not in proportions]
        if unknown or missing:
            raise ValueError(
                f"proportions must name exactly the domains {list(domains)}: "
                f"missing {missing}, unknown {unknown}"
            )
        values = [proportions[d] for d in domains]
    else:
        values = list(proportions)
        if len(values) != len(domains):
            raise ValueError(
                f"got {len(values)} proportions for {len(domains)} domains {list(domains)}: "
                "give one proportion per domain, in the same order"
            )
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"proportions must be numbers, got {values!r}") from err
    for domain, value in zip(domains, out):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"proportion of domain {domain!r} is {value}: proportions must be finite and >= 0"
            )
    total = math.fsum(out)
    if abs(total - 1.0) > PROPORTION_TOLERANCE:
        raise ValueError(
            f"proportions sum to {total!r}, not 1 (tolerance {PROPORTION_TOLERANCE}): "
            "normalise them yourself; the loader does not rescale"
        )
    return out


def quantize(proportions: Sequence[float]) -> list[int]:
    """Integer weights summing to ``RESOLUTION``, by largest remainder (ties to the lower index)."""
    total = math.fsum(proportions)
    raw = [p / total * RESOLUTION for p in proportions]
    weights = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - weights[i]), i))
    for i in order[: RESOLUTION - sum(weights)]:
        weights[i] += 1
    assert sum(weights) == RESOLUTION
    return weights


# ---------------------------------------------------------------------------------------------------
# Allocation


def _tijdeman(
    residuals: Sequence[int], weights: Sequence[int], batch_size: int
) -> tuple[list[int], list[int]]:
    """Fill ``batch_size`` slots one by one with Tijdeman's rule (see the module docstring)."""
    k = len(weights)
    r = list(residuals)
    counts = [0] * k
    if k == 1:
        counts[0] = batch_size
        r[0] += (weights[0] - RESOLUTION) * batch_size
        return counts, r
    m = 2 * k - 2  # eligible: r*m >= Q; deadline of i: ((m-1)Q - m r_i) / w_i
    target = (m - 1) * RESOLUTION
    domains = range(k)
    for _ in range(batch_size):
        best = -1
        best_num = best_w = best_r = 0
        for i in domains:
            ri = r[i] + weights[i]
            r[i] = ri
            if ri * m < RESOLUTION:
                continue
            num, wi = target - m * ri, weights[i]
            if best < 0:
                best, best_num, best_w, best_r = i, num, wi, ri
                continue
            if wi == 0:  # never urgent: only beats another never-urgent domain with a smaller residual
                better = best_w == 0 and ri > best_r
            elif best_w == 0:
                better = True
            else:
                lhs, rhs = num * best_w, best_num * wi
                better = lhs < rhs or (lhs == rhs and ri > best_r)
            if better:
                best, best_num, best_w, best_r = i, num, wi, ri
        assert best >= 0, "some residual is >= 1/k >= 1/(2k-2) since they sum to one slot"
        r[best] -= RESOLUTION
        counts[best] += 1
    return counts, r


def _water_fill(
    residuals: Sequence[int], weights: Sequence[int], batch_size: int
) -> tuple[list[int], list[int]]:
    """Pour the whole batch, then give each slot to the largest remaining residual (lower index on ties)."""
    r = [ri + wi * batch_size for ri, wi in zip(residuals, weights)]
    counts = [0] * len(r)
    for _ in range(batch_size):
        best = max(range(len(r)), key=lambda i: (r[i], -i))
        r[best] -= RESOLUTION
        counts[best] += 1
    return counts, r


def allocate(
    residuals: Sequence[int], weights: Sequence[int], batch_size: int
) -> tuple[list[int], list[int]]:
    """Samples per domain for the next batch and the residuals after it (both in exact integers).

    ``residuals`` are ideal-minus-drawn counts in units of ``1/RESOLUTION`` sample and sum to 0;
    ``weights`` are quantised proportions (``quantize``). Pure: the same inputs give the same batch.
    """
    if batch_size <= 0:
        raise ValueError(f"the global batch size must be positive, got {batch_size}")
    counts, after = _tijdeman(residuals, weights, batch_size)
    if all(-RESOLUTION < x < RESOLUTION for x in after):
        return counts, after
    return _water_fill(residuals, weights, batch_size)


# ---------------------------------------------------------------------------------------------------
# Per-domain sample order


def domain_seed(seed: int, domain: str, epoch: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(domain.encode()), epoch])


class DomainOrder:
    """The order in which one domain's samples are drawn: reshuffled epochs, concatenated forever."""

    def __init__(self, domain: str, num_samples: int, seed: int, shuffle: bool):
        if num_samples <= 0:
            raise ValueError(f"domain {domain!r} has no samples")
        self.domain = domain
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most a few epochs; keep the newest
                del self._perms[min(self._perms)]
            dtype = np.uint32 if self.num_samples < 2**32 else np.int64
            if self.shuffle:
                perm = np.random.default_rng(domain_seed(self.seed, self.domain, epoch)).permutation(
                    self.num_samples
                )
                self._perms[epoch] = perm.astype(dtype)
            else:
                self._perms[epoch] = np.arange(self.num_samples, dtype=dtype)
        return self._perms[epoch]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at stream positions (position n is the domain's n-th drawn sample)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[offsets[sel]]
        return out


# ---------------------------------------------------------------------------------------------------
# Mixture state and the batch plan


@dataclass
class MixtureState:
    """Everything needed to continue the batch sequence exactly (O(number of domains))."""

    step: int  # the next global batch to compose
    counts: list[int]  # samples drawn so far per domain (the stream cursors)
    residuals: list[int]  # ideal minus drawn, in 1/RESOLUTION sample
    proportions: list[float]  # in effect for the next batch (before pending updates due)
    pending: list[tuple[int, list[float]]] = field(default_factory=list)  # (effective step, proportions)

    @classmethod
    def initial(cls, proportions: Sequence[float]) -> MixtureState:
        k = len(proportions)
        return cls(step=0, counts=[0] * k, residuals=[0] * k, proportions=list(proportions))

    def copy(self) -> MixtureState:
        return MixtureState(
            self.step,
            list(self.counts),
            list(self.residuals),
            list(self.proportions),
            [(e, list(p)) for e, p in self.pending],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "counts": list(self.counts),
            # JSON-safe and exact: residuals may exceed 2**53
            "residuals": [str(x) for x in self.residuals],
            "proportions": list(self.proportions),
            "pending": [[e, list(p)] for e, p in self.pending],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MixtureState:
        return cls(
            step=int(raw["step"]),
            counts=[int(x) for x in raw["counts"]],
            residuals=[int(x) for x in raw["residuals"]],
            proportions=[float(x) for x in raw["proportions"]],
            pending=[(int(e), [float(x) for x in p]) for e, p in raw["pending"]],
        )


@dataclass
class BatchPlan:
    """One global batch: how many samples each domain gives and where its stream stood before."""

    step: int
    counts: list[int]
    starts: list[int]  # each domain's stream position before this batch
    new_epochs: list[tuple[str, int]]  # (domain, epoch) entered during this batch


class Mixture:
    """The deterministic batch sequence of a domain mixture (pure computation, no I/O).

    Args:
        domains: domain names; ``domain_idx`` in batches indexes this list.
        num_samples: samples available per domain (train split).
        global_batch_size: ``device_batch_size × world_size``.
        seed: seeds every per-domain permutation and per-rank shuffle.
        shuffle: shuffle each domain's epochs and each device batch; ``False`` reads in storage order.
        state: where to continue from; ``None`` starts at step 0 with ``proportions``.
    """

    def __init__(
        self,
        domains: Sequence[str],
        num_samples: Sequence[int],
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        proportions: Sequence[float] | None = None,
        state: MixtureState | None = None,
    ):
        if len(domains) != len(num_samples) or not domains:
            raise ValueError("give one sample count per domain, and at least one domain")
        if len(set(domains)) != len(domains):
            raise ValueError(f"domain names must be unique, got {list(domains)}")
        if global_batch_size <= 0:
            raise ValueError(f"the global batch size must be positive, got {global_batch_size}")
        self.domains = list(domains)
        self.num_samples = [int(n) for n in num_samples]
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        if state is None:
            if proportions is None:
                raise ValueError("give either initial proportions or a state to continue from")
            state = MixtureState.initial(validate_proportions(proportions, self.domains))
        self.state = state.copy()
        self._weights = quantize(self.state.proportions)
        self.orders = [
            DomainOrder(d, n, self.seed, self.shuffle) for d, n in zip(self.domains, self.num_samples)
        ]

    # ------------------------------------------------------------------------------- schedule
    def schedule(self, effective_step: int, proportions: Sequence[float]) -> None:
        """Make ``proportions`` take effect from batch ``effective_step`` on (a step not yet composed)."""
        if effective_step < self.state.step:
            raise ValueError(
                f"cannot change proportions from batch {effective_step}: batches up to {self.state.step - 1} "
                "are already composed (publish an update before the batch it applies to is asked for)"
            )
        values = validate_proportions(proportions, self.domains)
        keys = [e for e, _ in self.state.pending]
        self.state.pending.insert(bisect.bisect_right(keys, effective_step), (int(effective_step), values))

    def _apply_due(self) -> None:
        due = [p for e, p in self.state.pending if e <= self.state.step]
        if due:
            self.state.pending = [(e, p) for e, p in self.state.pending if e > self.state.step]
            self.state.proportions = list(due[-1])
            self._weights = quantize(self.state.proportions)

    @property
    def proportions(self) -> list[float]:
        """The proportions the next batch will use (after updates due at that step)."""
        due = [p for e, p in self.state.pending if e <= self.state.step]
        return list(due[-1]) if due else list(self.state.proportions)

    # ---------------------------------------------------------------------------------- batches
    def next_batch(self) -> BatchPlan:
        """Compose the next global batch and advance the state."""
        self._apply_due()
        st = self.state
        counts, st.residuals = allocate(st.residuals, self._weights, self.global_batch_size)
        starts = list(st.counts)
        new_epochs = []
        for i, (domain, n) in enumerate(zip(self.domains, self.num_samples)):
            if counts[i]:  # epochs e >= 1 whose first position e*n this batch draws
                first_new, last = max(1, -(-starts[i] // n)), (starts[i] + counts[i] - 1) // n
                new_epochs += [(domain, e) for e in range(first_new, last + 1)]
            st.counts[i] = starts[i] + counts[i]
        plan = BatchPlan(step=st.step, counts=counts, starts=starts, new_epochs=new_epochs)
        st.step += 1
        return plan

    def advance_to(self, step: int) -> None:
        """Compose (and discard) batches until ``step`` is the next one."""
        if step < self.state.step:
            raise ValueError(f"cannot go back from step {self.state.step} to {step}")
        while self.state.step < step:
            self.next_batch()

    def rank_slots(self, plan: BatchPlan, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, sample id) of each sample of ``rank``'s device batch in ``plan``."""
        if self.global_batch_size % world_size:
            raise ValueError(
                f"global batch {self.global_batch_size} is not divisible by world size {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        counts = np.asarray(plan.counts, dtype=np.int64)
        domain_of_slot = np.repeat(np.arange(len(counts)), counts)
        offset_in_domain = np.arange(self.global_batch_size) - np.repeat(np.cumsum(counts) - counts, counts)
        mine = np.arange(rank, self.global_batch_size, world_size)
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, plan.step, rank, 1]))
            mine = mine[rng.permutation(len(mine))]
        domain_idx = domain_of_slot[mine]
        positions = np.asarray(plan.starts, dtype=np.int64)[domain_idx] + offset_in_domain[mine]
        sample_ids = np.empty(len(mine), dtype=np.int64)
        for d in np.unique(domain_idx):
            sel = domain_idx == d
            sample_ids[sel] = self.orders[d].ids(positions[sel])
        return domain_idx, sample_ids
