"""Differential privacy for one site's local training: DP-SGD with Opacus, under a budget.

What a site gets (sample-level DP): the model updates a site sends, over every round it trains
in, are (epsilon, delta)-differentially private with respect to any one of its training slices
(one 2-D image with its mask; a volume is several slices, so a patient with k slices is
protected at group level, k * epsilon). It comes from DP-SGD (Abadi et al., CCS 2016):

* **Poisson sampling**: every optimiser step draws each training slice independently with
  probability ``q = batch_size / N`` (Opacus' ``UniformWithReplacementSampler``); a round is
  ``federation.local_steps`` such batches, some larger, some smaller, some possibly empty.
* **Per-sample clipping and noise**: Opacus computes every slice's own gradient, clips it to
  L2 norm ``C`` (``privacy.max_grad_norm``), sums, adds Gaussian noise of std ``sigma * C`` and
  divides by the expected batch size ``q * N``.
* **Accounting**: an Opacus accountant turns the history of (sigma, q, steps) into epsilon at
  the site's delta: RDP (``privacy.accountant=rdp``, the default) or PRV (``prv``, Gopi et al.
  2021, numerical composition of privacy loss random variables, which gives a tighter bound).
  The history is a :class:`PrivacyLedger`, a JSON file in the site's state folder, so the
  budget holds across rounds, new ClientApps and SuperNode restarts.

PRV and its fallback (:func:`account`): Opacus' PRV accountant returns an *upper bound* on
epsilon (its estimate at ``delta - delta_error`` plus ``eps_error``; ``eps_error = 0.01``,
``delta_error = delta / 1000``), so it is a guarantee, like RDP's. Its discretisation grows
with epsilon and with the square root of the steps; outside the range where it is cheap and
sound, the RDP bound is used instead and the reason is kept: the PRV mesh would exceed
:data:`PRV_MAX_DOMAIN` points (at q = 0.2, sigma 0.5 and 4000 steps it needs 41 M points,
55 s, and overflows to inf), Opacus raises or returns a non-finite value, or its bound is not
below RDP's (both are valid upper bounds, so the smaller is reported). Measured on our
histories, PRV's epsilon was 0.91-0.96x RDP's at q = 0.2 and 0.85-0.94x at q = 0.016 (down to
0.5x at q = 0.004); see ``bench/privacy.py --part accounting``.

The network is trained unchanged: it has GroupNorm only (no BatchNorm) and its attention is
built from convolutions, so Opacus needs no module swapped (:func:`make_dp_compatible` checks;
a model with BatchNorm is refused, since swapping it would change what the model computes).

Per-sample gradients (``privacy.grad_sample_mode``) come by default from one ``torch.func``
``vmap`` over the whole network of the gradient of one slice's loss (``vmap``); Opacus' DP
optimiser then clips, adds noise and accounts, as in its own modes. On our 2-core CPU it was the
fastest mode (``bench/privacy.py``): a DP step cost 1.46x a plain step for the small preset at
64 px, against 1.81x with Opacus' ``hooks`` (per-layer samplers that unfold every convolution's
input, and a Python hook per layer) and 2.21x with ``functorch`` (Opacus' per-layer vmap); on
the tiny preset 1.91x against 2.22x. It needs more memory than ``hooks`` (every slice's
activations for the backward at once). With ``model.learn_sigma``, torch 2.13 has no batching
rule for the variational bound's ``log_ndtr`` and loops over that one op (same result, a
warning, a little slower). ``ghost`` clipping gains nothing here, since Opacus 1.6 has ghost
norms only for Linear and Embedding layers and a conv network falls back to full per-sample
gradients plus a second backward pass; ``ew`` (expanded weights) fails on the FF-Parser. All
offered modes give the same clipped gradients (tested against per-slice autograd).

FedProx's proximal term ``mu/2 ||w - w_global||^2`` depends on the weights only, not on any
slice, so its gradient ``mu (w - w_global)`` is added *after* Opacus' clipping and noise:
post-processing of a private quantity with public ones, which costs no privacy; clipping it per
sample would wrongly shrink it and count it against the budget.

Nothing here knows about Flower: ``client/`` decides when to train and what to reply.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .checkpoint import atomic_write_bytes
from .config import PrivacyConfig
from .diffusion import PLAIN_OBJECTIVE, NoiseSchedule, TrainingObjective, draw_timesteps_and_noise
from .errors import ConfigError, MedSegDiffError
from .training import Batch, ProximalTerm, batch_loss, stack_batch

# The mask decoder: what privacy.trainable=decoder trains (restrict_trainable).
DECODER_MODULES = ("up_stages", "upsamples", "out")
# How per-sample gradients are computed: Opacus' module hooks ("hooks"; "functorch" runs its
# per-layer samplers through torch.func), Opacus' ghost clipping ("ghost"), or one torch.func
# vmap over the whole network ("vmap"); Opacus clips, adds noise and accounts in every mode.
GRAD_SAMPLE_MODES = ("vmap", "hooks", "functorch", "ghost")
LEDGER_FORMAT = "fedmedsegdiff-privacy-ledger"
LEDGER_VERSION = 1
# RDP composition is additive, so a round-by-round history and a single entry for the same
# steps give the same epsilon up to float rounding; this slack absorbs only that rounding.
_ROUNDING = 1e-9
# The accountants a site may use for planning and for its ledger (privacy.accountant).
ACCOUNTANTS = ("rdp", "prv")
# PRV's numerical error bounds, as Opacus' defaults: eps_error absolute, delta_error = delta/1000.
PRV_EPS_ERROR = 0.01
PRV_DELTA_ERROR_FRACTION = 1e-3
# Largest PRV discretisation mesh (points) computed; beyond it (seconds and ~100 MB of FFT per
# evaluation, and overflow in Opacus' PRV code at the far end) the RDP bound is used.
PRV_MAX_DOMAIN = 2**22
# Planning bisects sigma until the planned epsilon is within this of the target (as Opacus).
PLAN_EPSILON_TOLERANCE = 0.01


class PrivacyLedgerError(MedSegDiffError):
    """The privacy ledger is unreadable or inconsistent; the site refuses to train."""


def default_delta(num_examples: int) -> float:
    """``min(1e-5, 0.1 / N)``: well below ``1/N``, the level at which a mechanism that
    publishes one record in full would still satisfy the definition."""
    return min(1e-5, 0.1 / num_examples)


@dataclass(frozen=True)
class PrivacyPlan:
    """What one round of DP-SGD at a site does, and the site's budget.

    Attributes:
        noise_multiplier: sigma, the noise std relative to ``max_grad_norm``.
        sample_rate: Poisson sampling probability ``q`` of each slice per step.
        steps: optimiser steps (Poisson batches) per round.
        max_grad_norm: per-sample clipping bound ``C``.
        delta: the delta at which epsilon is stated.
        delta_is_default: ``delta`` was computed (``default_delta``), not configured.
        target_epsilon: the site's budget over all rounds.
        num_examples: ``N``, the site's training slices.
        planned_rounds: rounds the noise was calibrated for (when it was calibrated).
        noise_calibrated: sigma was chosen by Opacus for the plan, not configured.
        accountant: the configured accountant (``privacy.accountant``), used for the ledger.
        noise_accountant: the accountant sigma was calibrated with (None when configured); it
            differs from ``accountant`` when PRV could not be used for planning.
        accountant_fallback: why planning fell back from PRV to RDP ("" when it did not).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    delta_is_default: bool
    target_epsilon: float
    num_examples: int
    planned_rounds: int
    noise_calibrated: bool
    accountant: str = "rdp"
    noise_accountant: str | None = None
    accountant_fallback: str = ""

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: the denominator of the noisy mean gradient (not the drawn batch size)."""
        return self.sample_rate * self.num_examples

    def round_history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, self.steps)]


def plan_privacy(
    privacy: PrivacyConfig,
    *,
    num_examples: int,
    batch_size: int,
    local_steps: int,
    rounds: int,
) -> PrivacyPlan:
    """Sample rate, delta and noise for a site with ``num_examples`` training slices.

    The noise multiplier is ``privacy.noise_multiplier`` when set; otherwise the smallest sigma
    (to 0.01 in epsilon) whose epsilon after ``planned_rounds`` (default ``rounds``) rounds of
    ``local_steps`` steps stays within ``target_epsilon``, under ``privacy.accountant``: RDP
    through Opacus' ``get_noise_multiplier``, PRV by :func:`_prv_noise_multiplier` (the same
    bisection, with :func:`account`'s guards). Where PRV cannot be computed for the planned
    history, sigma is RDP's and ``accountant_fallback`` says why.

    Raises:
        ConfigError: DP is off or incomplete, or delta is not below ``1/N``.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if not privacy.enabled or privacy.target_epsilon is None:
        raise ConfigError("privacy.enabled must be true with a privacy.target_epsilon to plan DP")
    if num_examples <= 0:
        raise ConfigError("privacy.enabled: the site has no training slices")
    sample_rate = min(1.0, batch_size / num_examples)
    delta = privacy.delta if privacy.delta is not None else default_delta(num_examples)
    if delta >= 1.0 / num_examples:
        raise ConfigError(
            f"privacy.delta: {delta:g} is not below 1/N = {1.0 / num_examples:g} for the "
            f"site's N = {num_examples} training slices (such a delta allows publishing a "
            "record outright); leave it unset for the default min(1e-5, 0.1/N)"
        )
    planned_rounds = privacy.planned_rounds or rounds
    accountant = privacy.accountant
    noise_accountant: str | None = None
    fallback = ""
    if privacy.noise_multiplier is not None:
        sigma, calibrated = float(privacy.noise_multiplier), False
    else:
        total_steps = planned_rounds * local_steps
        try:
            sigma = get_noise_multiplier(
                target_epsilon=privacy.target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant="rdp",
            )
        except ValueError as exc:  # Opacus: "The privacy budget is too low."
            raise ConfigError(
                f"privacy.target_epsilon: {privacy.target_epsilon:g} cannot be met for "
                f"{planned_rounds} rounds of {local_steps} steps at sample rate "
                f"{sample_rate:.3g} ({exc})"
            ) from None
        calibrated, noise_accountant = True, "rdp"
        if accountant == "prv":
            try:
                sigma = _prv_noise_multiplier(
                    float(privacy.target_epsilon), delta, sample_rate, total_steps, float(sigma)
                )
                noise_accountant = "prv"
            except PRVUnavailable as exc:
                fallback = f"planning: {exc}; noise calibrated with rdp"
    return PrivacyPlan(
        noise_multiplier=float(sigma),
        sample_rate=sample_rate,
        steps=local_steps,
        max_grad_norm=privacy.max_grad_norm,
        delta=delta,
        delta_is_default=privacy.delta is None,
        target_epsilon=float(privacy.target_epsilon),
        num_examples=num_examples,
        planned_rounds=planned_rounds,
        noise_calibrated=calibrated,
        accountant=accountant,
        noise_accountant=noise_accountant,
        accountant_fallback=fallback,
    )


class PRVUnavailable(Exception):
    """The PRV accountant cannot give a sound, useful bound for this history (the reason)."""


@dataclass(frozen=True)
class Epsilon:
    """An epsilon and where it comes from.

    Attributes:
        value: epsilon at the delta asked for.
        accountant: the accountant whose bound ``value`` is (``rdp`` or ``prv``).
        requested: the accountant asked for.
        fallback: why ``accountant`` differs from ``requested`` ("" when it does not).
    """

    value: float
    accountant: str
    requested: str
    fallback: str = ""


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus' PRV upper bound on epsilon at ``delta`` for a merged, noisy, non-empty history.

    Raises:
        PRVUnavailable: the mesh would exceed :data:`PRV_MAX_DOMAIN` points, Opacus raised, or
            the bound is not finite.
    """
    import numpy as np
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    delta_error = delta * PRV_DELTA_ERROR_FRACTION
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # RDP alpha-range and numpy overflow notices
            domain = accountant._get_domain(
                prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
                num_self_compositions=[n for _, _, n in history],
                eps_error=PRV_EPS_ERROR,
                delta_error=delta_error,
            )
            if domain.size > PRV_MAX_DOMAIN:
                raise PRVUnavailable(
                    f"prv mesh of {domain.size:,} points exceeds {PRV_MAX_DOMAIN:,}"
                )
            value = float(
                accountant.get_epsilon(
                    delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error
                )
            )
    except PRVUnavailable:
        raise
    except (ValueError, RuntimeError, ArithmeticError, MemoryError) as exc:
        raise PRVUnavailable(f"prv failed ({type(exc).__name__}: {exc})") from None
    if not math.isfinite(value) or value < 0:
        raise PRVUnavailable(f"prv gave epsilon {value}")
    return value


def account(
    history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> Epsilon:
    """Epsilon at ``delta`` of a DP-SGD history of ``(noise_multiplier, sample_rate, steps)``
    under ``accountant`` (``inf`` when any entry had no noise, 0 for an empty history).

    ``rdp`` is exactly Opacus' RDP accountant. ``prv`` is Opacus' PRV upper bound where it can
    be computed and is below RDP's, else RDP's with ``fallback`` saying why (see the module
    docstring); both are valid upper bounds, so the smaller is a guarantee.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant {accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    history = merge_history(history)
    if not history:
        return Epsilon(0.0, accountant, accountant)
    if any(sigma <= 0 for sigma, _, _ in history):
        return Epsilon(math.inf, accountant, accountant)
    rdp = _rdp_epsilon(history, delta)
    if accountant == "rdp":
        return Epsilon(rdp, "rdp", "rdp")
    try:
        prv = prv_epsilon(history, delta)
    except PRVUnavailable as exc:
        return Epsilon(rdp, "rdp", "prv", f"{exc}; rdp used")
    if prv >= rdp:
        return Epsilon(rdp, "rdp", "prv", f"prv bound {prv:.4g} is not below rdp's; rdp used")
    return Epsilon(prv, "prv", "prv")


def epsilon_of(
    history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """:func:`account`'s epsilon alone; with ``rdp`` exactly Opacus' RDP accountant."""
    return account(history, delta, accountant).value


@lru_cache(maxsize=64)
def _prv_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, rdp_sigma: float
) -> float:
    """The smallest sigma (to :data:`PLAN_EPSILON_TOLERANCE` in epsilon) whose PRV epsilon
    after ``steps`` steps at ``sample_rate`` is within ``target_epsilon``: Opacus'
    ``get_noise_multiplier`` bisection, started from RDP's sigma (PRV's bound is below RDP's, so
    RDP's sigma already meets the target). A sigma whose PRV bound cannot be computed counts as
    too small, so the answer only errs towards more noise. Cached: every round plans anew.

    Raises:
        PRVUnavailable: PRV cannot be computed even at RDP's sigma, or is not below target there.
    """

    def epsilon(sigma: float) -> float:
        return prv_epsilon([(sigma, sample_rate, steps)], delta)

    sigma_high, eps_high = rdp_sigma, epsilon(rdp_sigma)
    if eps_high > target_epsilon:
        raise PRVUnavailable(f"prv bound {eps_high:.4g} at rdp's sigma is over the target")
    sigma_low = 0.0
    for _ in range(60):
        if target_epsilon - eps_high <= PLAN_EPSILON_TOLERANCE:
            break
        sigma = (sigma_low + sigma_high) / 2
        try:
            eps = epsilon(sigma)
        except PRVUnavailable:
            eps = math.inf
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def merge_history(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """One entry per (noise, sample rate), steps summed: RDP composes additively, so the
    epsilon is the same, and a site's accounting costs the same in round 1000 as in round 1
    (every round of a plan repeats the same pair)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, n in history:
        if n > 0:
            steps[(float(sigma), float(rate))] = steps.get((float(sigma), float(rate)), 0) + int(n)
    return [(sigma, rate, n) for (sigma, rate), n in steps.items()]


# --------------------------------------------------------------------------------------------
# The ledger: the site's privacy history on disk.


@dataclass
class LedgerEntry:
    """One DP training attempt of a round.

    ``status`` is ``started`` from before the first step until the round's training finished,
    then ``completed`` with the steps Opacus actually took. A ``started`` entry (the process
    died, or training raised) counts in full: the conservative choice (see :class:`PrivacyLedger`).
    """

    id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    num_examples: int
    status: str = "started"
    started_at: float = field(default_factory=time.time)
    completed_at: float | None = None

    def history(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a round may train: epsilon spent before it and after it (as planned)."""

    granted: bool
    spent: float
    after: float
    target: float
    delta: float
    entry: LedgerEntry | None = None
    spent_by: Epsilon | None = None  # the accountant of ``spent`` (and any fallback)
    after_by: Epsilon | None = None

    @property
    def reason(self) -> str:
        by = self.after_by.accountant if self.after_by is not None else "rdp"
        if self.granted:
            return (
                f"training: epsilon {self.spent:.4g} -> {self.after:.4g} of {self.target:g} ({by})"
            )
        return (
            f"privacy budget: this round would spend epsilon {self.spent:.4g} -> "
            f"{self.after:.4g}, over the site's target {self.target:g} (delta {self.delta:.3g}, "
            f"{by})"
        )


class PrivacyLedger:
    """A site's DP-SGD history, as JSON in its state folder (never pickle).

    Every attempt to train a round under DP is written *before* the first step (status
    ``started``) and updated when training finishes (``completed``, with the steps taken). A
    round that crashes or raises therefore still counts, and a retry of it counts again: this
    can only overstate the epsilon spent, never understate it. The alternative — writing only
    after training — would forget a round whose update left the site just before a crash, and
    an error reply (a loss that became NaN, say) is itself an output that depends on the data.

    The delta is pinned at the site's first DP round (the ledger's ``delta``) and every later
    round is judged, and its epsilon reported, at that delta: a later plan with a larger delta
    (still below ``1/N``) would otherwise report less spent and admit more rounds.

    Reads and the check-then-reserve step run under an exclusive file lock, so two processes of
    one site cannot both pass the budget check; writes are atomic (temp file + ``os.replace``).

    The file keeps the history only, never an epsilon: epsilon is recomputed from it with the
    accountant asked for (a plan's ``accountant``), so a ledger written under RDP (before PRV
    existed, whose ``accountant`` key reads ``rdp (opacus)``) is read and accounted with PRV
    alike. Its ``accountant`` key names the accountant of the last reservation, for people.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._accountant_note = "rdp (opacus)"  # what the file says; kept by complete()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> tuple[list[LedgerEntry], float | None]:
        """The entries and the pinned delta (None before the first DP round)."""
        if not self.path.exists():
            return [], None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != LEDGER_FORMAT or data.get("version") != LEDGER_VERSION:
                raise ValueError(f"not a version {LEDGER_VERSION} {LEDGER_FORMAT} file")
            entries = [LedgerEntry(**item) for item in data["entries"]]
            self._accountant_note = str(data.get("accountant", self._accountant_note))
            delta = data.get("delta")
            if delta is not None and not (isinstance(delta, float) and 0 < delta < 1):
                raise ValueError(f"delta {delta!r} is not a number in (0, 1)")
        except (ValueError, KeyError, TypeError) as exc:
            raise PrivacyLedgerError(
                f"{self.path}: privacy ledger is unreadable ({exc}); the site refuses to train "
                "under DP rather than lose track of the budget it has spent"
            ) from None
        return entries, delta

    def _write(
        self, entries: list[LedgerEntry], delta: float | None, accountant: str | None = None
    ) -> None:
        if accountant is not None:
            self._accountant_note = f"{accountant} (opacus)"
        payload = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "accountant": self._accountant_note,
            "delta": delta,
            "entries": [vars(e) for e in entries],
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=2).encode())

    def entries(self) -> list[LedgerEntry]:
        with self._locked():
            return self._read()[0]

    def delta(self) -> float | None:
        """The delta pinned at the site's first DP round, at which all epsilons are stated."""
        with self._locked():
            return self._read()[1]

    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history: ``(noise_multiplier, sample_rate, steps)`` per attempt."""
        return [e.history() for e in self.entries()]

    def epsilon(self, accountant: str = "rdp") -> float:
        """Epsilon spent so far at the pinned delta (0 before the first DP round)."""
        return self.account(accountant).value

    def account(self, accountant: str = "rdp") -> Epsilon:
        """Epsilon spent so far at the pinned delta under ``accountant``, with the accountant
        it really came from (see :func:`account`)."""
        with self._locked():
            entries, delta = self._read()
        if delta is None:
            return Epsilon(0.0, accountant, accountant)
        return account([e.history() for e in entries], delta, accountant)

    def rounds_trained(self) -> int:
        return len({e.round for e in self.entries()})

    def reserve(self, server_round: int, plan: PrivacyPlan) -> BudgetDecision:
        """Grant the round if the spent epsilon plus this round's stays within the budget, and
        then record it as ``started``; otherwise decline and record nothing. Epsilon is counted
        with ``plan.accountant``."""
        with self._locked():
            entries, pinned = self._read()
            delta = plan.delta if pinned is None else pinned
            if delta >= 1.0 / plan.num_examples:
                raise PrivacyLedgerError(
                    f"{self.path}: the site's delta {delta:g}, pinned at its first DP round, is "
                    f"not below 1/N = {1.0 / plan.num_examples:g} for its N = "
                    f"{plan.num_examples} training slices now"
                )
            history = [e.history() for e in entries]
            spent_by = account(history, delta, plan.accountant)
            after_by = account(history + plan.round_history(), delta, plan.accountant)
            spent, after = spent_by.value, after_by.value
            if not after <= plan.target_epsilon * (1 + _ROUNDING):
                return BudgetDecision(
                    False, spent, after, plan.target_epsilon, delta, None, spent_by, after_by
                )
            entry = LedgerEntry(
                id=uuid.uuid4().hex,
                round=server_round,
                noise_multiplier=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=plan.steps,
                num_examples=plan.num_examples,
            )
            self._write([*entries, entry], delta, plan.accountant)
        return BudgetDecision(
            True, spent, after, plan.target_epsilon, delta, entry, spent_by, after_by
        )

    def complete(self, entry: LedgerEntry, history: list[tuple[float, float, int]]) -> None:
        """Mark a reserved attempt done with the history Opacus' accountant recorded while
        training (the steps it really took, never more than reserved)."""
        steps = sum(int(n) for _, _, n in history)
        for sigma, rate, _ in history:
            if not (
                math.isclose(sigma, entry.noise_multiplier)
                and math.isclose(rate, entry.sample_rate)
            ):
                raise PrivacyLedgerError(
                    f"{self.path}: training used noise {sigma} / sample rate {rate}, not the "
                    f"reserved {entry.noise_multiplier} / {entry.sample_rate}"
                )
        if steps > entry.steps:
            raise PrivacyLedgerError(
                f"{self.path}: training took {steps} DP steps, more than the {entry.steps} reserved"
            )
        with self._locked():
            entries, delta = self._read()
            for item in entries:
                if item.id == entry.id:
                    item.steps, item.status, item.completed_at = steps, "completed", time.time()
                    break
            else:
                raise PrivacyLedgerError(f"{self.path}: reserved entry {entry.id} is missing")
            self._write(entries, delta)


# --------------------------------------------------------------------------------------------
# Training.


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """The model itself when Opacus can compute its per-sample gradients (MedSegDiffUNet can).

    A module Opacus cannot handle is swapped for its DP twin (``ModuleValidator.fix``) only when
    that keeps the parameters interchangeable with the other sites' models; BatchNorm is refused
    outright, because any swap (GroupNorm) would change what the network computes.

    Raises:
        ConfigError: naming ``privacy.enabled``, for BatchNorm or another incompatible module.
    """
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        return model
    batch_norms = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
    )
    if batch_norms:
        raise ConfigError(
            "privacy.enabled: the model has BatchNorm layers "
            f"({', '.join(batch_norms[:3])}{', ...' if len(batch_norms) > 3 else ''}), which mix "
            "the samples of a batch and so cannot be trained with per-sample DP-SGD; use a "
            "GroupNorm model or set privacy.enabled=false"
        )
    fixed = ModuleValidator.fix(model)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    after = {k: tuple(v.shape) for k, v in fixed.state_dict().items()}
    if ModuleValidator.validate(fixed, strict=False) or before != after:
        raise ConfigError(
            "privacy.enabled: the model has modules Opacus cannot compute per-sample gradients "
            f"for ({'; '.join(str(e) for e in errors[:2])}) and no drop-in DP replacement"
        )
    return fixed


@dataclass
class DPTrainStats:
    """What a call of :func:`dp_train_steps` did; ``history`` is what Opacus' own accountant
    counted, hooked to the DP optimiser: ``(noise_multiplier, sample_rate, steps)``."""

    steps: int
    examples: int
    empty_batches: int
    loss: float
    seconds: float
    history: list[tuple[float, float, int]]


def restrict_trainable(model: nn.Module, trainable: str) -> int:
    """Freeze every parameter outside ``trainable`` (``privacy.trainable``); the number of
    parameters left to train.

    ``decoder`` keeps the mask decoder (``up_stages``, ``upsamples``, the output head ``out``);
    ``norms`` keeps the affine weights of every normalisation layer, every bias and the output
    head (BitFit-like). DP noise has the same std on every trained coordinate, so its total
    norm shrinks with the square root of the number trained while the clipped signal does not.
    """
    if trainable == "all":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == "decoder":
        kept = {n for n, _ in model.named_parameters() if n.split(".")[0] in DECODER_MODULES}
    elif trainable == "norms":
        norms = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)
        kept = {
            f"{name}.{p_name}" if name else p_name
            for name, module in model.named_modules()
            if isinstance(module, norms)
            for p_name, _ in module.named_parameters(recurse=False)
        }
        kept |= {
            n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("out.")
        }
    else:
        raise ConfigError(f"privacy.trainable: {trainable!r} is not one of all, decoder, norms")
    for name, param in model.named_parameters():
        param.requires_grad_(name in kept)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def poisson_batches(
    dataset: Dataset,
    sample_rate: float,
    steps: int,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
    views: int = 1,
) -> Iterator[Batch | None]:
    """``steps`` Poisson batches: each slice joins each batch with probability ``sample_rate``
    (Opacus' ``UniformWithReplacementSampler``). An empty draw yields ``None``. With ``views``
    > 1 each drawn slice is read that many times in a row (its own augmentation each time):
    the batch holds ``views`` rows per slice, slice by slice."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset), sample_rate=sample_rate, generator=generator, steps=steps
    )
    for indices in sampler:
        if not indices:
            yield None
            continue
        yield stack_batch([dataset[i] for i in indices for _ in range(views)], device)


def set_per_sample_gradients(
    model: nn.Module,
    schedule: NoiseSchedule,
    batch: Batch,
    objective: TrainingObjective = PLAIN_OBJECTIVE,
    views: int = 1,
) -> Tensor:
    """Every slice's own loss gradient, as ``p.grad_sample`` of shape ``(B, *p.shape)`` (what
    Opacus' DP optimiser clips), computed in one go with ``torch.func``: ``vmap`` over the batch
    of the gradient of one slice's loss. Returns the per-sample losses.

    With ``views`` > 1 (augmentation multiplicity) the batch holds that many rows per slice
    (:func:`poisson_batches`), each with its own timestep and noise, and a slice's loss is the
    mean over its views: one gradient per slice, clipped once, so the privacy analysis is that
    of one row per slice while the diffusion loss's variance over timesteps shrinks.

    Timesteps and noise are drawn for the whole batch first, by the draw :func:`batch_loss`
    uses, so a seeded step is the same in every mode."""
    masks = batch["mask"]
    timesteps, noise = draw_timesteps_and_noise(
        schedule, masks, sampling=objective.timestep_sampling
    )
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    fixed |= dict(model.named_buffers())

    def one_slice(weights, image, mask, t, eps):
        return batch_loss(
            model,
            schedule,
            {"image": image, "mask": mask},
            objective=objective,
            t=t,
            noise=eps,
            weights=weights | fixed,
        )["loss"]

    def by_slice(rows: Tensor) -> Tensor:
        return rows.reshape(rows.shape[0] // views, views, *rows.shape[1:])

    per_slice = torch.func.vmap(
        torch.func.grad_and_value(one_slice),
        in_dims=(None, 0, 0, 0, 0),
        randomness="different",  # dropout, if any, draws for each slice on its own
    )
    grads, losses = per_slice(
        trained, by_slice(batch["image"]), by_slice(masks), by_slice(timesteps), by_slice(noise)
    )
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.grad_sample = grads[name]
    return losses


def per_sample_gradient_norms(
    model: nn.Module,
    schedule: NoiseSchedule,
    dataset: Dataset,
    *,
    batch_size: int = 8,
    objective: TrainingObjective = PLAIN_OBJECTIVE,
) -> Tensor:
    """The L2 norm of every slice's loss gradient over the trainable parameters, unclipped,
    one slice after another of ``dataset`` (one timestep and noise draw each).

    Run on *public* data with the public model, its quantiles give a clipping bound
    (``privacy.max_grad_norm``) that costs the sites no privacy; computed on a site's own data
    it would leak (a data-dependent choice of C outside the DP analysis)."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    norms = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        set_per_sample_gradients(model, schedule, stack_batch(items, device), objective)
        squared = sum(p.grad_sample.flatten(1).square().sum(1) for p in params)
        norms.append(squared.sqrt().detach().cpu())
        for p in params:
            del p.grad_sample
    return torch.cat(norms)


class IterateAverage:
    """The bias-corrected exponential moving average of parameter iterates: after iterates
    ``w_1..w_T``, ``sum_i decay^(T-i) w_i / sum_i decay^(T-i)`` (the starting weights do not
    count), so ``decay`` 0 is the last iterate and ``decay`` near 1 the plain mean. Not
    :class:`~medsegdiff_core.training.ExponentialMovingAverage`, which starts from the initial
    weights and ramps its decay up: a round of a few DP steps would send mostly the start."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.mean = [p.detach().clone() for p in params]
        self.weight = 0.0

    @torch.no_grad()
    def update(self) -> None:
        self.weight = self.decay * self.weight + 1.0
        for mean, param in zip(self.mean, self.params, strict=True):
            mean.lerp_(param, 1.0 / self.weight)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for mean, param in zip(self.mean, self.params, strict=True):
            param.copy_(mean)


def dp_train_steps(
    model: nn.Module,
    schedule: NoiseSchedule,
    dataset: Dataset,
    plan: PrivacyPlan,
    optimizer: torch.optim.Optimizer,
    *,
    grad_sample_mode: str = "hooks",
    proximal: ProximalTerm | None = None,
    amp_dtype: torch.dtype | None = None,
    objective: TrainingObjective = PLAIN_OBJECTIVE,
    sampling_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
    augmentation_multiplicity: int = 1,
    iterate_averaging: float = 0.0,
) -> DPTrainStats:
    """One round of DP-SGD: ``plan.steps`` Poisson batches, each an Opacus-private step.

    ``optimizer`` is a plain optimiser over ``model``'s parameters (AdamW from
    ``make_optimizer``); Opacus wraps it for the round and unhooks the model afterwards, so the
    model object is unchanged apart from its trained weights. No other gradient clipping is
    applied. An empty Poisson batch is still a step: the update is pure noise, as DP-SGD's
    analysis assumes. ``noise_generator`` (on the model's device) and ``sampling_generator``
    (CPU) must be seeded secretly: whoever knows their seeds can subtract the noise.

    ``augmentation_multiplicity`` views of every drawn slice are averaged inside its gradient
    (:func:`set_per_sample_gradients`; vmap mode only). ``iterate_averaging`` > 0 leaves the
    model at the bias-corrected exponential moving average of the round's iterates (post-
    processing of private quantities: no privacy cost), which averages part of the noise out.

    Returns the number of steps, slices seen, empty batches, the mean diffusion loss (without
    the proximal term) and the accountant history of the round.
    """
    from opacus.accountants import RDPAccountant
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"privacy.grad_sample_mode: {grad_sample_mode!r} is not one of "
            + ", ".join(GRAD_SAMPLE_MODES)
        )
    if make_dp_compatible(model) is not model:
        raise ValueError(
            "the model needs modules swapped for DP: train make_dp_compatible(model) (with an "
            "optimizer over its parameters) instead"
        )
    ghost = grad_sample_mode == "ghost"
    vmapped = grad_sample_mode == "vmap"
    views = augmentation_multiplicity
    if views > 1 and not vmapped:
        raise ConfigError(
            "privacy.augmentation_multiplicity > 1 needs privacy.grad_sample_mode=vmap"
        )
    extra: dict[str, Any] = {"max_grad_norm": plan.max_grad_norm} if ghost else {}
    hooks = (
        None
        if vmapped
        else prepare_module(
            model,
            grad_sample_mode=grad_sample_mode,
            wrap_model=False,
            batch_first=True,
            loss_reduction="mean",
            **extra,
        )
    )
    optimizer_class = DPOptimizerFastGradientClipping if ghost else DPOptimizer
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
    )
    accountant = RDPAccountant()
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device

    def step(batch: Batch | None) -> float | None:
        """One DP-SGD step; the batch's mean diffusion loss (None for an empty batch)."""
        dp_optimizer.zero_grad(set_to_none=True)
        value = None
        if batch is None:
            for p in params:  # what Opacus' own empty-batch path sees: no samples
                if ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        else:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if vmapped:
                    per_sample = set_per_sample_gradients(
                        model, schedule, batch, objective, views=views
                    )
                else:
                    per_sample = batch_loss(
                        model, schedule, batch, reduction="none", objective=objective
                    )["loss"]
            value = float(per_sample.detach().float().mean())
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at DP step {steps}")
            if ghost:
                DPTensorFastGradientClipping(hooks, dp_optimizer, per_sample, "mean").backward()
            elif not vmapped:
                per_sample.mean().backward()
        if dp_optimizer.pre_step():  # clip per sample, sum, add noise, divide by q*N
            if proximal is not None:
                proximal.add_gradient(model)  # after clipping and noise, as without DP
            optimizer.step()
            if average is not None:
                average.update()
        return value

    average = IterateAverage(params, iterate_averaging) if iterate_averaging > 0 else None
    model.train()
    total_loss, examples, steps, empty = 0.0, 0, 0, 0
    start = time.monotonic()
    try:
        with warnings.catch_warnings():
            # Opacus hooks the image stem, whose input needs no gradient: a harmless notice.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for batch in poisson_batches(
                dataset,
                plan.sample_rate,
                plan.steps,
                device=device,
                generator=sampling_generator,
                views=views,
            ):
                value = step(batch)
                steps += 1
                if batch is None or value is None:
                    empty += 1
                else:
                    total_loss += value
                    examples += batch["image"].shape[0] // views
                if on_step is not None:
                    on_step(steps, value if value is not None else float("nan"))
        if average is not None:
            average.copy_to_params()
    finally:
        if hooks is not None:
            hooks.cleanup()
        for p in params:
            for attr in ("summed_grad", "_processed", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
    non_empty = steps - empty
    return DPTrainStats(
        steps=steps,
        examples=examples,
        empty_batches=empty,
        loss=total_loss / max(non_empty, 1),
        seconds=time.monotonic() - start,
        history=[(float(s), float(q), int(n)) for s, q, n in accountant.history],
    )


def secret_seed() -> int:
    """A seed from the operating system's entropy pool, never from the experiment seed: the
    server knows that seed, and DP noise it could regenerate would protect nothing."""
    return int.from_bytes(os.urandom(8), "little") % 2**63


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with :func:`secret_seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secret_seed())
    return generator


__all__ = [
    "ACCOUNTANTS",
    "BudgetDecision",
    "DPTrainStats",
    "Epsilon",
    "IterateAverage",
    "PRVUnavailable",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "PrivacyPlan",
    "default_delta",
    "account",
    "dp_train_steps",
    "epsilon_of",
    "make_dp_compatible",
    "per_sample_gradient_norms",
    "plan_privacy",
    "poisson_batches",
    "prv_epsilon",
    "restrict_trainable",
    "secret_generator",
    "secret_seed",
]
