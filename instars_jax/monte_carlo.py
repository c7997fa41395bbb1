"""The primitives every certificate shares: noise as a pure function of (key, instance,
sample), Clopper–Pearson bounds on a binomial proportion, and Cohen et al.'s radius."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


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
