"""Sequential CERTIFY's stopping rules: their look schedules, the device-side test that
decides when an instance stops, the host-side bound it certifies, their settings and their
metadata. The engine (engine.py) runs any rule with the interface `looks`, `tables`, `stop`,
`certify`; the statistics and their proofs are in docs/sequential.md.

  RadiusRule(tolerance ε, tolerance level δ): a union bound of Clopper–Pearson bounds over a
    geometric schedule of looks plus the saturation look; stop once the radius is within
    (1 − ε) of the best a continuation to n_max could still certify.
  DecisionRule(radii r_1 < … < r_m, δ): a mixture likelihood-ratio test of each threshold
    p_A ≥ Φ(r_k/σ), valid at every sample by Ville's inequality, in a fixed order; stop once
    every threshold is proven, or given up as out of reach by n_max.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr, ndtri, xlogy
from scipy import stats

from instars_jax.smoothing.bounds import (certified_radius, clopper_pearson_lower,
                                          clopper_pearson_upper)

SAMPLINGS = ("fixed", "sequential")

FIRST_LOOK = 100
LOOK_RATIO = 1.5
DECISION_GAP = (50, 0.05)  # decision looks: every max(50, 5% of the samples so far)
# The default level of the upper bound U^δ on p_A that only decides when to stop (both rules).
TOLERANCE_ALPHA = 0.05
# The decision tests' alternatives: log-odds steps above the threshold's.
LOG_ODDS_STEPS = 0.05 * 2.0 ** np.arange(9)
# Bisection steps of chernoff_upper: its bracket shrinks to 2^-30, under float32 spacing at 1.
CHERNOFF_STEPS = 30
# float32 rounding bound of log_evidence: relative to the magnitude of the terms summed, plus
# an absolute part (8 float32 ulps; the tests check it against float64).
ROUNDING = (1e-6, 1e-3)
# Thresholds are tested at z·(1 + Z_INFLATION), covering float32 rounding of r/σ.
Z_INFLATION = 1e-6
# The saturation look is placed this share of its samples late, so that the float32 tables
# still stop an instance with no failure there.
SATURATION_MARGIN = 0.002


def geometric_looks(n_max: int) -> np.ndarray:
  """int64[L]: looks geometric from FIRST_LOOK by LOOK_RATIO, the last n_max; a geometric look
  is kept only if a full step still fits after it (no look just before n_max to split α
  with it)."""
  looks = [min(FIRST_LOOK, n_max)]
  while looks[-1] < n_max:
    step = math.ceil(looks[-1] * LOOK_RATIO)
    looks.append(step if step * LOOK_RATIO < n_max else n_max)
  return np.asarray(looks, np.int64)


def saturation_look(geometric: np.ndarray, alpha: float, tolerance: float) -> int | None:
  """The first count t at which an instance whose every sample so far agreed with its class
  meets RadiusRule's stop, were t a look beside `geometric` (its level then counts in the
  union bound): Φ⁻¹(α_t^(1/t)) ≥ (1 − ε)·Φ⁻¹(α_L^(1/n_max)), the Clopper–Pearson bounds with
  no failure at t and at n_max; then SATURATION_MARGIN later, for the device's float32. σ
  cancels, so this look depends on (n_max, α, ε) alone, never on the data. None where no
  t between the first look and n_max qualifies, or t is a geometric look already."""
  n_max, total = int(geometric[-1]), float(np.sum(geometric))

  def meets(t):
    trials = np.array([t, n_max], np.float64)
    lower, final = (alpha * trials / (total + t)) ** (1.0 / trials)
    return stats.norm.ppf(lower) >= (1.0 - tolerance) * stats.norm.ppf(final)

  low, high = int(geometric[0]), n_max - 1
  if n_max <= low or meets(low) or not meets(high):
    return None
  while high - low > 1:  # meets(t) grows with t: its level rises and the final one falls
    middle = (low + high) // 2
    low, high = (low, middle) if meets(middle) else (middle, high)
  look = math.ceil(high * (1.0 + SATURATION_MARGIN))
  return look if look < n_max and look not in geometric else None


def look_schedule(n_max: int, alpha: float, tolerance: float) -> np.ndarray:
  """int64[L]: RadiusRule's looks: the geometric ones and the saturation look. Without the
  latter an input whose samples all agree, most of an accurate model's easy inputs, would run
  on to the next geometric look, up to LOOK_RATIO times the samples it needs."""
  looks = geometric_looks(n_max)
  extra = saturation_look(looks, alpha, tolerance)
  return looks if extra is None else np.sort(np.append(looks, extra))


def decision_looks(n_max: int) -> np.ndarray:
  """int64[L]: DecisionRule's looks, from FIRST_LOOK every max(DECISION_GAP) samples."""
  least, share = DECISION_GAP
  looks = [min(FIRST_LOOK, n_max)]
  while looks[-1] < n_max:
    looks.append(min(n_max, looks[-1] + max(least, math.ceil(looks[-1] * share))))
  return np.asarray(looks, np.int64)


def look_alphas(alpha: float, looks: np.ndarray) -> np.ndarray:
  """float64[L]: each look's level, α·t_l / Σ t: in proportion to its sample count, so the late
  looks, where radii need precision and most images stop, get most of α. They sum to α."""
  looks = np.asarray(looks, np.float64)
  return alpha * looks / looks.sum()


def anytime_lower_bound(successes, trials, look, looks: np.ndarray, alpha: float):
  """float64 lower bound on p_A at each instance's stopping look `look` (an index into
  `looks`), at that look's level: valid simultaneously over looks (docs/sequential.md)."""
  level = look_alphas(alpha, looks)[np.asarray(look)]
  return clopper_pearson_lower(successes, trials, level)


@functools.lru_cache(maxsize=8)
def bound_tables(n_max: int, alpha: float, tolerance: float, likely_alpha: float | None = None):
  """(looks int32[L], offsets int32[L], lower float32[Σ(t_l+1)], upper float32[...],
  likely_upper float32[...]): each look's bounds for every count 0..t_l, flattened; row l
  starts at offsets[l]. likely_upper is the per-look Clopper–Pearson upper bound at level
  `likely_alpha` (RadiusRule's U^δ), or `upper` itself when that is None. The device reads
  them to decide when to stop; the certified bound is recomputed in float64."""
  looks = look_schedule(n_max, alpha, tolerance)
  alphas = look_alphas(alpha, looks)
  counts = np.concatenate([np.arange(t + 1) for t in looks])
  trials = np.repeat(looks, looks + 1)
  level = np.repeat(alphas, looks + 1)
  offsets = np.concatenate([[0], np.cumsum(looks + 1)[:-1]])
  upper = clopper_pearson_upper(counts, trials, level).astype(np.float32)
  likely = (upper if likely_alpha is None else
            clopper_pearson_upper(counts, trials, likely_alpha).astype(np.float32))
  return (looks.astype(np.int32), offsets.astype(np.int32),
          clopper_pearson_lower(counts, trials, level).astype(np.float32), upper, likely)


def alternatives(z):
  """float32[..., len(LOG_ODDS_STEPS)]: the log-odds of the decision test's alternatives
  above p = Φ(z). They depend on z alone, never on the samples, which the test's level
  needs."""
  log_theta, log_rest = _log_threshold(z)
  return log_theta[..., None] - log_rest[..., None] + jnp.asarray(LOG_ODDS_STEPS, jnp.float32)


def _log_threshold(z):
  """float32 (log Φ(z), log Φ(−z)) for z ≥ 0, each to a few ulps: log Φ(z) as log1p(−Φ(−z)),
  since log(Φ(z)) would lose Φ(−z)'s digits once Φ(z) rounds near 1."""
  z = jnp.asarray(z, jnp.float32)
  return jnp.log1p(-ndtr(-z)), log_ndtr(-z)


def log_evidence(successes, failures, z):
  """float32 log of the decision test's mixture likelihood ratio against p = Φ(z), less its
  rounding bound: the mean over alternatives p_j with log-odds logit(Φ(z)) + LOG_ODDS_STEPS,
  and p = 1, of (p_j/θ)^S ((1 − p_j)/(1 − θ))^F. Broadcasts."""
  successes = jnp.asarray(successes, jnp.float32)[..., None]
  failures = jnp.asarray(failures, jnp.float32)[..., None]
  log_theta, log_rest = (a[..., None] for a in _log_threshold(z))
  log_odds = alternatives(z)
  log_p, log_q = jax.nn.log_sigmoid(log_odds), jax.nn.log_sigmoid(-log_odds)
  terms = successes * (log_p - log_theta) + failures * (log_q - log_rest)
  size = successes * (jnp.abs(log_p) + jnp.abs(log_theta)) + failures * (jnp.abs(log_q)
                                                                          + jnp.abs(log_rest))
  # the alternative p = 1: θ^(−S) while no sample has failed
  terms = jnp.concatenate(
      [terms, jnp.where(failures > 0, -jnp.inf, -successes * log_theta)], axis=-1)
  size = jnp.concatenate([size, -2 * successes * log_theta], axis=-1)
  relative, absolute = ROUNDING
  terms = terms - relative * size - absolute
  return jax.scipy.special.logsumexp(terms, axis=-1) - jnp.log(jnp.float32(terms.shape[-1]))


def chernoff_upper(successes, trials, log_inverse_level):
  """float32 upper bound on p at level e^(−log_inverse_level) after `trials` Bernoulli(p)
  draws: the largest q ≥ p̂ with trials·KL(p̂ ‖ q) ≤ log_inverse_level, by bisection. Valid
  since P[p̂ ≤ a] ≤ exp(−t·KL(a ‖ p)) for a < p (Chernoff 1952)."""
  trials = jnp.maximum(trials, 1).astype(jnp.float32)
  p_hat = successes.astype(jnp.float32) / trials
  divergence = lambda q: (xlogy(p_hat, p_hat) - xlogy(p_hat, q) + xlogy(1 - p_hat, 1 - p_hat)
                          - xlogy(1 - p_hat, 1 - q))
  def halve(_, bracket):
    low, high = bracket
    middle = (low + high) / 2
    inside = trials * divergence(middle) <= log_inverse_level
    return jnp.where(inside, middle, low), jnp.where(inside, high, middle)
  return jax.lax.fori_loop(0, CHERNOFF_STEPS, halve, (p_hat, jnp.ones_like(p_hat)))[1]


def continued_successes(successes, trials, upper, n_max):
  """int32 successes at n_max if the remaining samples come at rate `upper`: the S_t seen
  plus ⌈upper·(n_max − t)⌉, both rules' plausible continuation (docs/sequential.md)."""
  more = jnp.ceil(upper * (n_max - trials)).astype(jnp.int32)
  return jnp.minimum(n_max, successes + more)


def _radius(p_lower, sigma):
  """σ Φ⁻¹(L) where L ≥ 1/2, else 0 (Cohen et al.'s Theorem 1)."""
  return np.where(p_lower >= 0.5, certified_radius(np.maximum(p_lower, 0.5), sigma), 0.0)


@dataclasses.dataclass(frozen=True)
class RadiusRule:
  """Stop once the radius is within a factor (1 − tolerance) of the best still reachable if
  p_A is below its upper bound at level `likely_alpha` (None: the anytime bound's α)."""
  tolerance: float = 0.05
  likely_alpha: float | None = TOLERANCE_ALPHA

  def __post_init__(self):
    if not 0.0 < self.tolerance < 1.0:
      raise ValueError(f"tolerance must lie in (0, 1); got {self.tolerance}")
    _check_level(self.likely_alpha)

  def looks(self, n_max: int, alpha: float) -> np.ndarray:
    return look_schedule(n_max, alpha, self.tolerance)

  def tables(self, n_max: int, alpha: float):
    """(offsets, lower, upper, likely_upper) of bound_tables."""
    return bound_tables(n_max, alpha, self.tolerance, self.likely_alpha)[1:]

  def stop(self, tables, look, successes, trials, n_max, sigma, level):
    """(stop bool[S], level) at a look; `level` is DecisionRule's and passes through."""
    offsets, lower_tab, upper_tab, likely_tab = tables
    row, final = offsets[look], offsets[-1]
    lower, upper = lower_tab[row + successes], upper_tab[row + successes]
    reachable = lower_tab[final + jnp.minimum(n_max, successes + n_max - trials)]
    likely = likely_tab[row + successes]
    plausible = lower_tab[final + continued_successes(successes, trials, likely, n_max)]
    abstain = (upper < 0.5) | (reachable < 0.5)
    best = ndtri(jnp.minimum(plausible, reachable))
    close = (lower >= 0.5) & (ndtri(lower) >= (1.0 - self.tolerance) * best)
    return abstain | close, level

  def metadata(self, n_max: int) -> dict:
    """What a results file's numbers depend on (its bound and looks are named, so that a file
    written with earlier ones does not resume with these)."""
    return _with_level({"mode": "radius", "tolerance": self.tolerance,
                        "bound": "clopper_pearson_alpha_by_samples",
                        "looks": "geometric_and_saturation"}, self.likely_alpha, n_max)

  def certify(self, successes, trials, look, level, sigma, n_max: int, alpha: float):
    """float64 (p_lower, radius): the anytime lower bound at the stopping look, σ Φ⁻¹(L)."""
    p_lower = anytime_lower_bound(successes, trials, look, self.looks(n_max, alpha), alpha)
    return p_lower, _radius(p_lower, sigma)


@dataclasses.dataclass(frozen=True)
class DecisionRule:
  """Stop once every "R ≥ r_k" (and p_A > 1/2) is proven by its test, or given up because a
  continuation at p_A's upper bound at level `likely_alpha` (None: α) could not prove it."""
  radii: tuple
  likely_alpha: float | None = TOLERANCE_ALPHA

  def __post_init__(self):
    radii = tuple(float(r) for r in self.radii)
    if not radii:
      raise ValueError("radii must list at least one radius")
    if not all(math.isfinite(r) and r >= 0 for r in radii):
      raise ValueError(f"radii must be finite and >= 0; got {list(radii)}")
    if any(b <= a for a, b in zip(radii, radii[1:])):
      raise ValueError(f"radii must be sorted in increasing order; got {list(radii)}")
    object.__setattr__(self, "radii", radii)
    _check_level(self.likely_alpha)

  def looks(self, n_max: int, alpha: float) -> np.ndarray:
    del alpha  # the tests' level does not depend on the looks
    return decision_looks(n_max)

  def tables(self, n_max: int, alpha: float):
    """(log(1/α), log(L/δ)): the evidence that proves, the Chernoff level of U^δ per look."""
    per_look = (self.likely_alpha or alpha) / len(decision_looks(n_max))
    return np.float32(-math.log(alpha)), np.float32(-math.log(per_look))

  def _levels(self):
    return (0.0,) + self.radii

  def stop(self, tables, look, successes, trials, n_max, sigma, level):
    """(stop bool[S], level int32[S]): level, the number of thresholds θ_0, θ_1, … proven
    together at one look so far (docs/sequential.md)."""
    threshold, likely_level = tables
    z = (jnp.asarray(self._levels(), jnp.float32)[None, :] / sigma[:, None]) * (1 + Z_INFLATION)
    proves = lambda s, f: log_evidence(s[:, None], f[:, None], z) >= threshold
    proven = proves(successes, trials - successes)
    level = jnp.maximum(level, jnp.sum(jnp.cumprod(proven, axis=1), axis=1).astype(jnp.int32))
    upper = chernoff_upper(successes, trials, likely_level)
    continued = continued_successes(successes, trials, upper, n_max)
    refuted = ~proves(continued, n_max - continued)
    refuted = jnp.cumsum(refuted, axis=1) > 0  # refuting θ_k refutes every larger one
    index = jnp.arange(len(self._levels()))[None, :]
    decided = (index < level[:, None]) | proven | refuted
    return jnp.all(decided, axis=1), level

  def metadata(self, n_max: int) -> dict:
    return _with_level({"mode": "decision", "radii": list(self.radii),
                        "test": "mixture_likelihood_ratio"}, self.likely_alpha, n_max)

  def certify(self, successes, trials, look, level, sigma, n_max: int, alpha: float):
    """float64 (p_lower, radius): Φ(r_k/σ) and r_k for the largest r_k proven (p_lower 1/2
    and radius 0 where only p_A > 1/2 is; p_lower 0 and radius 0 where nothing is)."""
    levels = np.asarray(self._levels(), np.float64)
    level = np.asarray(level)
    radius = np.where(level > 0, levels[np.maximum(level - 1, 0)], 0.0)
    p_lower = np.where(level > 0, stats.norm.cdf(radius / np.asarray(sigma, np.float64)), 0.0)
    return p_lower, radius


def make_rule(tolerance: float, radii,
              tolerance_alpha: float = TOLERANCE_ALPHA) -> RadiusRule | DecisionRule:
  """DecisionRule when `radii` is non-empty, else RadiusRule, each with its upper bound U^δ
  at level tolerance_alpha (0 means α). ValueError on bad values."""
  if not 0.0 <= tolerance_alpha < 1.0:
    raise ValueError(f"tolerance_alpha must lie in [0, 1) (0: alpha); got {tolerance_alpha}")
  level = float(tolerance_alpha) or None
  if radii:
    return DecisionRule(tuple(radii), level)
  return RadiusRule(float(tolerance), level)


def _check_level(likely_alpha) -> None:
  if likely_alpha is not None and not 0.0 < likely_alpha < 1.0:
    raise ValueError(f"tolerance_alpha must lie in (0, 1), or be None (alpha); got {likely_alpha}")


def _with_level(metadata: dict, likely_alpha, n_max: int) -> dict:
  """tolerance_alpha unless None (α, what files from before it existed were written at),
  then n_max."""
  if likely_alpha:
    metadata["tolerance_alpha"] = likely_alpha
  return metadata | {"n_max": n_max}


def from_config(c):
  """The stopping rule of config.certify (`c`), or None for fixed sampling; ValueError
  naming the key on a bad value."""
  if c.sampling not in SAMPLINGS:
    raise ValueError(f"certify.sampling must be one of {SAMPLINGS}; got {c.sampling!r}")
  if c.sampling == "fixed":
    return None
  if c.n < c.n0:
    raise ValueError(f"certify.n must be >= n0 with sequential sampling (n is n_max); got "
                     f"n={c.n} < n0={c.n0}")
  try:
    return make_rule(c.tolerance, c.radii, c.tolerance_alpha)
  except ValueError as error:
    raise ValueError(f"certify.{error}") from None
