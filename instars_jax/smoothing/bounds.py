"""The statistics every certificate shares: noise as a pure function of (key, instance,
sample), Clopper–Pearson bounds on a binomial proportion, and Cohen et al.'s radius."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

FLOOR = -10.0  # Φ⁻¹ of a zero lower bound, kept finite so comparisons stay defined


def instance_noise(key, instance_id, sample_ids, shape):
  """Standard normal ε[j] for one instance: a pure function of (key, instance_id, j)."""
  instance_key = jax.random.fold_in(key, instance_id)
  draw = lambda j: jax.random.normal(jax.random.fold_in(instance_key, j), shape, jnp.float32)
  return jax.vmap(draw)(sample_ids)


def clopper_pearson_lower(successes, trials, alpha):
  """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion.

  Equals statsmodels' proportion_confint(successes, trials, alpha=2α, method="beta")[0];
  it is 0 when there are no successes.
  """
  successes = np.asarray(successes, np.float64)
  trials = np.broadcast_to(np.asarray(trials, np.float64), successes.shape)
  with np.errstate(invalid="ignore"):
    bound = stats.beta.ppf(alpha, successes, trials - successes + 1)
  return np.where(successes > 0, bound, 0.0)


def clopper_pearson_upper(successes, trials, alpha):
  """One-sided (1 − α) Clopper–Pearson upper bound; 1 when there are no failures."""
  return 1.0 - clopper_pearson_lower(np.asarray(trials) - np.asarray(successes), trials, alpha)


def certified_radius(p_lower, sigma):
  """The L2 radius σ·Φ⁻¹(p_lower) of Cohen et al. Theorem 1 (meaningful for p_lower ≥ 1/2)."""
  return np.asarray(sigma) * stats.norm.ppf(p_lower)


def certified_factors(p_estimates, n: int, alpha: float) -> np.ndarray:
  """float32: Φ⁻¹(CP_lower(p · n, n, α)) for each estimate p of p_A, floored at −10: R = σ ·
  factor is the radius CERTIFY with n samples at level α would report if p̂_A came out at p."""
  factors = stats.norm.ppf(clopper_pearson_lower(np.asarray(p_estimates) * n, n, alpha))
  return np.maximum(factors, FLOOR).astype(np.float32)


def radius_factors(samples: int, n: int, alpha: float, estimate_alpha: float) -> np.ndarray:
  """float32[samples + 1]: Φ⁻¹(CP_lower(p̂_c · n, n, α)) for c = 0..samples, so that
  R(σ) = σ · factors[c] when c of `samples` samples land on the top class.

  p̂_c = CP_lower(c, samples, estimate_alpha), a deliberately cautious estimate of p_A: a
  search keeps the best of many noisy evaluations, and the plain frequency c/samples would
  favour whichever σ happened to be estimated too high (most at large σ, where R is most
  sensitive to p̂). estimate_alpha = 0.5 is close to the plain frequency."""
  estimates = clopper_pearson_lower(np.arange(samples + 1), samples, estimate_alpha)
  return certified_factors(estimates, n, alpha)
