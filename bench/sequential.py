"""Sequential against fixed-n certification of one trained model, in one run.

    python bench/sequential.py --workdir runs/demo [--images 500] [--n-max 100000]
                               [--sigmas 0.25,0.5] [--tolerance 0.05] [--tolerance-alpha 0.05]
                               [--radii 0.25,0.5,0.75,1.0] [--batch 1000]

For each σ, certifies the same test images (every k-th, k = test size // images) three ways
with the same key, n0 and α: fixed n = n_max (Cohen et al.'s CERTIFY), sequential radius
mode (tolerance ε) and sequential decision mode (the radii). Prints JSON with, for each
sequential mode, the total samples ratio fixed ÷ sequential (n0 selection samples included
on both sides), the wall-time ratio, the ACR ratio and the largest absolute difference in
certified accuracy over r ∈ {0, 0.25, …, 2} (decision mode: over its radii, where its
reported radius is meaningful). Wall times include compilation (a few seconds).

`ceilings` bounds what any sequential rule at level α could save on these images, taking
each image's fixed-n estimate p̂ = count/n_max as its p_A:
  radius_samples_ratio   an oracle that knows p̂ and stops each image at the first t where a
                         one-look Clopper–Pearson bound at level α on the expected count p̂·t
                         comes within (1 − ε) of the fixed-n radius (abstaining images free). A
                         real rule pays more: it must estimate p̂ and spread α over its looks.
                         For a saturated image (every sample correct) no level-α bound after t
                         samples exceeds α^(1/t) (it would fail with probability > α at
                         p = α^(1/t)), so there the oracle's t is a true floor.
  decision_samples_ratio an oracle that knows which thresholds θ ∈ {1/2, Φ(r_k/σ)} lie below
                         p̂ (the rest cost it nothing) and proves them with Wald's fewest
                         expected samples for a test that errs with probability ≤ α,
                         ln(1/α) / KL(p̂ ‖ θ), for the slowest, giving up (for free) any
                         whose proof would not fit in n_max (approximate: p̂ is an estimate).
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from scipy import stats

import instars_jax as ij
from instars_jax import analyze, data
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing import bounds
from instars_jax.smoothing.sequential import rules
from common import device_info, emit

RADII = np.arange(0, 2.0001, 0.25)


def certified_accuracy(cert, labels, radii):
  return analyze.certified_accuracy(cert.radius, cert.prediction == labels, radii)


def average_certified_radius(cert, labels):
  return analyze.average_certified_radius(cert.radius, cert.prediction == labels)


def sample_ceilings(fixed, n_max, n0, alpha, sigma, tolerance, radii):
  """Upper bounds on the samples ratio of any level-α sequential rule (module doc)."""
  rows = np.arange(len(fixed.prediction))
  p_hat = np.where(fixed.prediction >= 0, fixed.counts[rows, np.maximum(fixed.prediction, 0)],
                   fixed.counts.max(axis=1)) / n_max
  fixed_total = (n_max + n0) * len(p_hat)
  looks = np.unique(np.geomspace(1, n_max, 2000).astype(np.int64))
  one_look = lambda t: stats.norm.ppf(np.clip(
      bounds.clopper_pearson_lower(p_hat[:, None] * t, t, alpha), 1e-300, 1 - 1e-16))
  final = one_look(np.array([n_max]))
  close = one_look(looks) >= (1 - tolerance) * final
  oracle_t = np.where(fixed.radius > 0, looks[np.argmax(close, axis=1)], 0)
  radius_samples = oracle_t.sum() + n0 * len(p_hat)
  thresholds = stats.norm.cdf(np.array((0.0,) + tuple(radii)) / sigma)
  thresholds = thresholds[thresholds <= alpha ** (1 / n_max)]
  p = np.clip(p_hat, 1e-12, 1 - 1e-12)[:, None]
  kl = p * np.log(p / thresholds) + (1 - p) * np.log((1 - p) / (1 - thresholds))
  wald = np.where(p > thresholds, np.log(1 / alpha) / np.maximum(kl, 1e-300), 0.0)
  wald = np.where(wald <= n_max, wald, 0.0)  # a proof that would not fit by n_max: given up
  decision_samples = wald.max(axis=1).sum() + n0 * len(p_hat)
  return {"saturated_share": float(np.mean(p_hat >= 1.0)),
          "radius_samples_ratio": float(fixed_total / radius_samples),
          "decision_samples_ratio": float(fixed_total / decision_samples)}


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def compare(apply_fn, images, labels, ids, sigma, num_classes, args) -> dict:
  """One σ's row: fixed n = n_max, then each sequential mode, with the same key and n0."""
  decision_radii = tuple(float(r) for r in args.radii.split(","))
  common = dict(n0=args.n0, n=args.n_max, alpha=args.alpha, batch_size=args.batch,
                num_classes=num_classes, ids=ids)
  key = jax.random.PRNGKey(0)
  run = lambda **kw: timed(lambda: ij.certify(apply_fn, images, sigma, key, **common, **kw))
  fixed, fixed_seconds = run()
  fixed_total = fixed.num_samples.sum() + args.n0 * len(images)
  row = {"sigma": sigma, "images": len(images), "n_max": args.n_max, "alpha": args.alpha,
         "fixed": {"seconds": fixed_seconds, "samples": int(fixed_total),
                   "acr": average_certified_radius(fixed, labels),
                   "certified_accuracy": dict(zip(map(float, RADII),
                                                  certified_accuracy(fixed, labels, RADII).tolist()))},
         "ceilings": sample_ceilings(fixed, args.n_max, args.n0, args.alpha, sigma,
                                     args.tolerance, decision_radii)}
  modes = [("radius", {"tolerance": args.tolerance, "tolerance_alpha": args.tolerance_alpha}, RADII),
           ("decision", {"radii": decision_radii, "tolerance_alpha": args.tolerance_alpha},
            np.array(decision_radii))]
  for mode, kw, radii in modes:
    seq, seconds = run(rule=rules.make_rule(args.tolerance, kw.get("radii", ()),
                                            args.tolerance_alpha))
    total = seq.num_samples.sum() + args.n0 * len(images)
    accuracy = certified_accuracy(seq, labels, radii)
    difference = np.abs(accuracy - certified_accuracy(fixed, labels, radii))
    acr = average_certified_radius(seq, labels)
    row[mode] = {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                 "seconds": seconds, "samples": int(total),
                 "samples_ratio": float(fixed_total / total),
                 "wall_time_ratio": fixed_seconds / seconds,
                 "acr": acr, "acr_ratio": acr / max(row["fixed"]["acr"], 1e-12),
                 "certified_accuracy": dict(zip(map(float, radii), accuracy.tolist())),
                 "max_abs_certified_accuracy_difference": float(difference.max()),
                 "median_samples": float(np.median(seq.num_samples))}
  return row


def add_arguments(parser) -> None:
  """The sampling arguments shared with sequential_replay.py."""
  parser.add_argument("--n-max", type=int, default=100_000)
  parser.add_argument("--n0", type=int, default=100)
  parser.add_argument("--alpha", type=float, default=0.001)
  parser.add_argument("--tolerance", type=float, default=0.05)
  parser.add_argument("--tolerance-alpha", type=float, default=rules.TOLERANCE_ALPHA,
                      help="level of the upper bound that only stops sampling: radius mode's "
                      "reachable radius, decision mode's giving up (0: alpha)")
  parser.add_argument("--radii", default="0.25,0.5,0.75,1.0")
  parser.add_argument("--batch", type=int, default=1000)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--sigmas", default="0.25,0.5")
  add_arguments(parser)
  args = parser.parse_args()

  state = ij.load_train_state(args.workdir)
  config = json.loads((Path(args.workdir) / "config.json").read_text())
  test = data.load_dataset(config["dataset"], data_dir=config["data_dir"],
                           cache_dir=config["cache_dir"], num_classes=config["num_classes"]).test
  indices = np.arange(0, len(test), max(1, len(test) // args.images))[: args.images]
  batch = test.take(indices)
  apply_fn = ij.logits_fn(state)
  num_classes = Workdir(args.workdir).read_facts().num_classes
  labels = batch["label"]

  rows = [compare(apply_fn, batch["image"], labels, batch["index"], float(sigma), num_classes, args)
          for sigma in args.sigmas.split(",")]
  emit({"benchmark": "sequential", "workdir": args.workdir, "device": device_info(),
        "results": rows})


if __name__ == "__main__":
  main()
