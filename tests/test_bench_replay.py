"""bench/sequential_replay.py: the p_A it reads back from a results file, its stand-in, and
bench/sequential.py's comparison that it feeds."""

import sys
from pathlib import Path

import jax
import numpy as np
from scipy import stats

from instars_jax.smoothing import bounds

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sequential_replay  # noqa: E402


def test_implied_p_recovers_the_count_behind_each_radius():
  n, alpha, sigma = 10_000, 0.001, 0.5
  counts = np.array([5_100, 7_777, 9_500, 9_990, 10_000])
  radius = sigma * stats.norm.ppf(bounds.clopper_pearson_lower(counts, n, alpha))
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


def test_compare_reports_each_mode_against_fixed_n_on_the_same_images():
  import argparse
  import sequential as bench_sequential
  parser = argparse.ArgumentParser()
  bench_sequential.add_arguments(parser)
  args = parser.parse_args(["--n-max", "2000", "--n0", "50", "--alpha", "0.01",
                            "--radii", "0.25,0.5", "--batch", "500"])
  sigma, p = 0.5, np.array([0.45, 0.7, 0.9, 0.99, 1.0])
  margin = np.where(p >= 1, sequential_replay.SATURATED_MARGIN,
                    stats.norm.ppf(np.minimum(p, 0.999)))
  x = np.stack([sigma * margin, np.zeros(5)], axis=1).astype(np.float32)
  labels = np.zeros(5, np.int32)
  row = bench_sequential.compare(sequential_replay.stand_in, x, labels, np.arange(5), sigma, 3,
                                 args)
  assert row["fixed"]["samples"] == 5 * (2000 + 50)
  for mode, radii in (("radius", bench_sequential.RADII), ("decision", (0.25, 0.5))):
    result = row[mode]
    assert 50 * 5 < result["samples"] <= row["fixed"]["samples"]
    assert result["samples_ratio"] == row["fixed"]["samples"] / result["samples"]
    accuracy = np.array(list(result["certified_accuracy"].values()))
    fixed = np.array([row["fixed"]["certified_accuracy"][float(r)] for r in radii])
    assert result["max_abs_certified_accuracy_difference"] == np.abs(accuracy - fixed).max()
  # Both modes stop early (the abstaining image at once); decision mode the sooner.
  assert row["decision"]["samples"] < row["radius"]["samples"] < row["fixed"]["samples"]
