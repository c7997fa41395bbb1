"""bench/sequential_replay.py: the p_A it reads back from a results file, and its stand-in."""

import sys
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from instars_jax import monte_carlo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sequential_replay  # noqa: E402


def test_implied_p_recovers_the_count_behind_each_radius():
  n, alpha, sigma = 10_000, 0.001, 0.5
  counts = np.array([5_100, 7_777, 9_500, 9_990, 10_000])
  radius = sigma * stats.norm.ppf(monte_carlo.clopper_pearson_lower(counts, n, alpha))
  rounded_down = np.floor(radius * 1e7) / 1e7  # as the TSV writes them
  p = sequential_replay.implied_p(rounded_down, np.zeros(5, int), sigma, n, alpha)
  np.testing.assert_array_equal(p, counts / n)
  abstained = sequential_replay.implied_p(np.zeros(1), np.array([-1]), sigma, n, alpha)
  np.testing.assert_array_equal(abstained, sequential_replay.ABSTAINED_P)


def test_the_stand_in_answers_class_zero_with_probability_p():
  sigma, p = 0.5, np.array([0.6, 0.9, 0.99])
  x = np.stack([sigma * stats.norm.ppf(p), np.zeros(3)], axis=1)
  noise = jax.random.normal(jax.random.PRNGKey(0), (200_000, 3, 2))
  votes = np.asarray(sequential_replay.stand_in((x + sigma * noise).reshape(-1, 2)))
  shares = votes.reshape(200_000, 3, 3).mean(axis=0)
  np.testing.assert_allclose(shares[:, 0], p, atol=0.004)
  np.testing.assert_allclose(shares[:, 1], shares[:, 2], atol=0.004)
