"""The σ search as a share of a certification's samples and wall time (instance mode).

    python bench/search_share.py [--model lenet] [--n 4000] [--instances 20] [--starts 2 --steps 4]
"""

import argparse

import jax
import numpy as np

import instars_jax as ij
from instars_jax.smoothing import search
from common import device_info, emit, initialised_model, median_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="lenet")
  parser.add_argument("--n", type=int, default=4000)
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--instances", type=int, default=20)
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--starts", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()

  apply_fn, shape, num_classes = initialised_model(args.model)
  x = np.random.default_rng(0).uniform(size=(args.instances,) + shape).astype(np.float32)
  common = dict(batch_size=args.batch, num_classes=num_classes)
  search_s = median_seconds(lambda: ij.search_sigma(
      apply_fn, x, jax.random.PRNGKey(1), sigma_min=0.1, sigma_max=1.0, starts=args.starts,
      steps=args.steps, n=args.n, alpha=0.001, **common), repeats=3)
  certify_s = median_seconds(lambda: ij.certify(
      apply_fn, x, 0.25, jax.random.PRNGKey(2), n0=args.n0, n=args.n, alpha=0.001, **common).radius,
      repeats=3)
  budget = search.search_budget(args.starts, args.steps,
                                search.default_samples_per_step(args.n, args.starts, args.steps))
  emit({"benchmark": "search_share", **device_info(), "model": args.model, "n": args.n,
        "search_samples_per_instance": budget,
        "search_share_of_samples": round(budget / (budget + args.n0 + args.n), 4),
        "search_seconds": round(search_s, 3), "certify_seconds": round(certify_s, 3),
        "search_share_of_time": round(search_s / (search_s + certify_s), 4)})


if __name__ == "__main__":
  main()
