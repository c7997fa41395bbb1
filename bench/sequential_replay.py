"""bench/sequential.py's comparison replayed on a stand-in model: seconds on a CPU instead of a
GPU session, for the p_A distribution of any fixed-σ results file.

    python bench/sequential_replay.py RESULTS.tsv [--n-max 100000] [--tolerance-alpha 0.05] ...

Each row of a fixed-σ results file of certify.py (its .json sidecar gives σ, n and α) becomes
an image of a stand-in base model whose p_A is the row's fixed-n estimate: the count k whose
one-sided Clopper–Pearson bound at (n, α) reaches Φ(radius/σ), p = k/n (1 for a row at the
largest radius n allows, 0.45 for an abstention, which the row does not pin down). The
stand-in is a linear classifier on two coordinates (class 0 where z₀ > 0, else 1 or 2 by the
sign of z₁) at x = (σΦ⁻¹(p), 0), so under N(0, σ²I) noise it answers class 0 with
probability exactly p and each other class with (1 − p)/2. Its label is 0 where the row was
correct, else 1. Then fixed n_max against each sequential mode runs through the real engine
(`sequential.compare`), and the same JSON comes out. Only the p_A values are the file's: the
samples ratios carry over to the model that made the file, wall times do not.
"""

import argparse

import jax.numpy as jnp
import numpy as np
from scipy import stats

from instars_jax.storage import results
from instars_jax.smoothing import bounds
from common import device_info, emit
from sequential import add_arguments, compare

ABSTAINED_P = 0.45
SATURATED_MARGIN = 40.0  # σ·40 from the boundary: p = 1 in float64


def stand_in(z):
  """One-hot logits of the two-coordinate linear classifier (module doc)."""
  first = z[:, 0] > 0
  second = z[:, 1] > 0
  classes = jnp.where(first, 0, jnp.where(second, 1, 2))
  return jnp.eye(3, dtype=jnp.float32)[classes]


def implied_p(radius, predict, sigma, n, alpha):
  """The fixed-n estimate k/n of p_A behind each row's radius (module doc)."""
  lower = bounds.clopper_pearson_lower(np.arange(n + 1), n, alpha)
  target = stats.norm.cdf(radius / sigma) - 1e-9
  k = np.minimum(np.searchsorted(lower, target), n)
  return np.where(predict < 0, ABSTAINED_P, k / n)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("results", help="a fixed-σ results TSV of certify.py")
  add_arguments(parser)
  args = parser.parse_args()

  metadata = results.read_metadata(args.results)
  if metadata.get("certificate") != "fixed_sigma":
    raise SystemExit(f"error: {args.results} is not a fixed-σ results file with a .json sidecar")
  sigma, n, alpha = float(metadata["sigma"]), int(metadata["n"]), float(metadata["alpha"])
  rows = results.read_results(args.results)
  p = implied_p(rows["radius"], rows["predict"], sigma, n, alpha)
  margin = np.where(p >= 1.0, SATURATED_MARGIN, stats.norm.ppf(np.minimum(p, 1 - 1e-12)))
  x = np.stack([sigma * margin, np.zeros_like(margin)], axis=1).astype(np.float32)
  labels = np.where(rows["correct"] == 1, 0, 1)
  row = compare(stand_in, x, labels, rows["idx"], sigma, 3, args)
  emit({"benchmark": "sequential_replay", "results_file": args.results, "fixed_n": n,
        "saturated_share_at_fixed_n": float(np.mean(p >= 1.0)),
        "abstained_share": float(np.mean(rows["predict"] < 0)), "device": device_info(),
        "results": [row]})


if __name__ == "__main__":
  main()
