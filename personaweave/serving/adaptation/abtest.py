"""A/B testing of persona variants: assignment, outcomes, frequentist and Bayesian analysis.

- Deterministic assignment: a hash of (experiment, salt, user id) picks the variant by weight,
  so a user sees the same variant on every call and on every server.
- Frequentist: two-proportion z-test (binary outcomes) or Welch's t-test (continuous ones).
  Looking at the results repeatedly inflates false positives; `group_sequential_boundaries`
  gives Pocock or O'Brien-Fleming boundaries for K planned looks (computed by simulating the
  Brownian motion of the z statistic under H0, seeded) that keep the overall error at alpha.
- Bayesian: Beta-Binomial posterior probability that B beats A.
- Thompson sampling: draw from each arm's posterior, play the best draw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Optional

import numpy as np
from scipy import stats


def _check_weights(variants: Mapping[str, float]) -> dict[str, float]:
    if not variants:
        raise ValueError("An experiment needs at least one variant.")
    for name, weight in variants.items():
        if not isinstance(weight, (int, float)) or math.isnan(weight) or weight < 0:
            raise ValueError(f"Variant weight for {name!r} must be a number >= 0, got {weight!r}.")
    total = float(sum(variants.values()))
    if total <= 0:
        raise ValueError("Variant weights must sum to a positive number.")
    return {name: float(w) / total for name, w in variants.items()}


def assign(user_id: str, experiment: str, variants: Mapping[str, float], salt: str = "") -> str:
    """The variant of `user_id` in `experiment`: stable, and distributed as the weights say."""
    weights = _check_weights(variants)
    digest = hashlib.sha256(f"{experiment}\x1f{salt}\x1f{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, w in weights.items():
        cumulative += w
        if u < cumulative:
            return name
    return name  # float rounding at the very top


def two_proportion_z(successes_a: int, n_a: int, successes_b: int, n_b: int) -> tuple[float, float]:
    """(z, two-sided p) for H0: the two success rates are equal (pooled variance)."""
    if n_a <= 0 or n_b <= 0:
        return 0.0, 1.0
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return 0.0, 1.0
    z = (successes_b / n_b - successes_a / n_a) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test."""
    result = stats.ttest_ind(b, a, equal_var=False)
    return float(result.statistic), float(result.pvalue)


@lru_cache(maxsize=64)
def group_sequential_boundaries(looks: int, alpha: float = 0.05, kind: str = "obrien_fleming",
                                simulations: int = 200_000, seed: int = 0) -> tuple[float, ...]:
    """Two-sided |z| boundaries for `looks` equally spaced analyses with overall type I error alpha.

    Pocock: one constant boundary. O'Brien-Fleming: c * sqrt(K / k), strict early, near the
    fixed-sample boundary at the end.
    """
    if looks < 1:
        raise ValueError("looks must be at least 1.")
    if kind not in {"pocock", "obrien_fleming"}:
        raise ValueError(f"Unknown boundary kind {kind!r}; use 'pocock' or 'obrien_fleming'.")
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((simulations, looks))
    z = np.cumsum(steps, axis=1) / np.sqrt(np.arange(1, looks + 1))  # z statistic at each look under H0
    shape = np.ones(looks) if kind == "pocock" else np.sqrt(looks / np.arange(1, looks + 1))
    # the smallest c with P(any |z_k| > c * shape_k) <= alpha
    c = np.quantile(np.max(np.abs(z) / shape, axis=1), 1 - alpha)
    return tuple(float(c * s) for s in shape)


def prob_b_beats_a(successes_a: int, n_a: int, successes_b: int, n_b: int, prior: tuple[float, float] = (1, 1),
                   samples: int = 100_000, seed: int = 0) -> float:
    """Posterior P(rate_B > rate_A) under independent Beta priors."""
    rng = np.random.default_rng(seed)
    a = rng.beta(prior[0] + successes_a, prior[1] + n_a - successes_a, samples)
    b = rng.beta(prior[0] + successes_b, prior[1] + n_b - successes_b, samples)
    return float((b > a).mean())


def simulate_sequential(runs: int = 1000, users: int = 1000, peek_every: int = 100, rate_a: float = 0.2,
                        rate_b: float = 0.2, alpha: float = 0.05, kind: Optional[str] = "obrien_fleming",
                        seed: int = 0) -> dict[str, float]:
    """Share of simulated experiments that declare a difference when peeking every `peek_every`
    users: naive (fixed-sample z at every look) and corrected (group-sequential boundaries)."""
    rng = np.random.default_rng(seed)
    looks = users // peek_every
    bounds = group_sequential_boundaries(looks, alpha, kind) if kind else None
    fixed = stats.norm.isf(alpha / 2)
    naive_hits = corrected_hits = final_hits = 0
    p_values = []
    for _ in range(runs):
        groups = rng.random(users) < 0.5
        outcome = np.where(groups, rng.random(users) < rate_b, rng.random(users) < rate_a)
        naive = corrected = False
        for k in range(1, looks + 1):
            n = k * peek_every
            g, o = groups[:n], outcome[:n]
            z, p = two_proportion_z(int(o[~g].sum()), int((~g).sum()), int(o[g].sum()), int(g.sum()))
            naive |= abs(z) > fixed
            corrected |= bounds is not None and abs(z) > bounds[k - 1]
        naive_hits += naive
        corrected_hits += corrected
        final_hits += p < alpha
        p_values.append(p)
    return {"naive_rejection_rate": naive_hits / runs, "corrected_rejection_rate": corrected_hits / runs,
            "single_look_rejection_rate": final_hits / runs, "final_p_values": p_values}


class UserExperiment:
    """A two-variant experiment whose unit is the user (as its assignment is): each user's
    ratings (1 = thumbs up, 0 = down) are kept, and the analysis compares per-user mean ratings
    (Welch's t) and per-user satisfaction (mean >= 0.5; Beta-Binomial P(B > A)). Counting every
    rating as an independent trial would let one prolific user swing the test.

    `state(user)` / `restore(user, state)` move a user's part to and from a JSON-able dict (the
    service keeps it in the user's row); a state from another experiment (other name or
    variants) is ignored, so a reconfigured server never mixes the old outcomes into the new.
    """

    def __init__(self, name: str, variants: Mapping[str, float], salt: str = "") -> None:
        if len(variants) != 2:
            raise ValueError(f"A user experiment compares exactly two variants, got {list(variants)}.")
        self.name, self.variants, self.salt = name, _check_weights(variants), salt
        self.users: dict[str, tuple[str, list[float]]] = {}

    def assign(self, user_id: str) -> str:
        return assign(user_id, self.name, self.variants, self.salt)

    def state(self, user_id: str) -> dict:
        variant, ratings = self.users.get(user_id, (self.assign(user_id), []))
        return {"experiment": self.name, "variants": sorted(self.variants), "variant": variant,
                "ratings": list(ratings)}

    def owns(self, state: Optional[Mapping]) -> bool:
        return bool(state) and state.get("experiment") == self.name and state.get("variants") == sorted(self.variants)

    def restore(self, user_id: str, state: Mapping) -> None:
        if self.owns(state) and state.get("variant") in self.variants:
            self.users[user_id] = (state["variant"], [float(r) for r in state.get("ratings", [])])

    def forget(self, user_id: str) -> None:
        self.users.pop(user_id, None)

    def report(self, prefix: str = "") -> dict:
        """The analysis over the users whose id starts with `prefix` (the service: one API key's tenant)."""
        control, treatment = list(self.variants)
        users = [entry for user, entry in self.users.items() if user.startswith(prefix)]
        means = {v: [float(np.mean(r)) for var, r in users if var == v and r] for v in self.variants}
        out = {"experiment": self.name, "variants": self.variants, "control": control, "treatment": treatment,
               "users": {v: len(m) for v, m in means.items()},
               "ratings": {v: sum(len(r) for var, r in users if var == v) for v in self.variants},
               "mean_rating": {v: (float(np.mean(m)) if m else None) for v, m in means.items()}}
        a, b = means[control], means[treatment]
        if len(a) >= 2 and len(b) >= 2:
            t, p = welch_t(a, b)
            happy_a, happy_b = sum(x >= 0.5 for x in a), sum(x >= 0.5 for x in b)
            out.update(t=None if math.isnan(t) else t, p_value=None if math.isnan(p) else p,
                       prob_treatment_better=prob_b_beats_a(happy_a, len(a), happy_b, len(b)))
        return out
