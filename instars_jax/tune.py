"""python -m instars_jax.tune --workdir=DIR [--config.certify.*=...]: the thresholded chain's
τ, chosen on held-out training examples, never on test images.

The run must have been trained with train.holdout > 0 (and train.estimator.router = True, for the
chain's nodes). The held-out examples (every certify.skip-th below certify.max) are sampled
once per node and once per grid σ (certificates/thresholded.py's `sweep`: each τ's rows are
exactly those certify.py would write with that τ), and for every τ of
certify.thresholded.sweep the command prints the sound ACR and certified accuracy there, the
share of examples certified off the default route's σ (the largest for τ ≥ 1/2, the
smallest below) and the share that abstain, and writes them to
DIR/certify/tune_thresholded[_experts][_shared].json. Pass the best τ to certify.py as
--config.certify.thresholded.threshold. σ experts (certify.experts) are used as certify.py
would use them. Each sampling call's rows are kept in parts (storage/parts.py, beside the
.json, under the sweep's settings) until the .json is written, so a rerun after a stop or a
kill goes on from the calls kept, with the same rows (each sample depends only on the run's
key and the example's index).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from tqdm import tqdm

from instars_jax import analyze, certification, data
from instars_jax.certificates import Certified, router, thresholded
from instars_jax.storage.files import write_json_atomic
from instars_jax.storage.parts import Parts
from instars_jax.storage.results import format_down
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing import sampler
from instars_jax.selection import estimator


def validate(config) -> None:
  thresholded.validate(config)
  taus = tuple(config.certify.thresholded.sweep)
  if not taus or not all(0.0 < t < 1.0 for t in taus):
    raise ValueError(f"certify.thresholded.sweep must list thresholds in (0, 1); got {taus}")
  if config.train.holdout <= 0:
    raise ValueError("tuning needs held-out training examples: train the run with "
                     "--config.train.holdout > 0 (e.g. 0.1)")


def tune_thresholds(config, workdir, check_stop=None) -> dict:
  """{τ: summary} of the thresholded chain on the held-out examples (module doc);
  `check_stop(doing)` is called before each sampling call (the training stage's stop)."""
  validate(config)
  workdir = Workdir(workdir)
  certification.check_run(config, workdir)
  config = config.copy_and_resolve_references()
  config.certify.split = "holdout"  # what the experts, the metadata and the sampling see
  metadata = certification.run_metadata(config, thresholded, workdir)
  checked = metadata.get("experts", [])
  dataset = data.from_config(config)
  certification.check_dataset(dataset, workdir)
  smoothed = certification.smoothed_model(config, workdir, dataset, metadata)
  chain = router.loaded_nodes(smoothed, config)
  grid = np.asarray(estimator.grid_of(config), np.float32)
  beta, taus = thresholded.alpha_split(config)[1], tuple(config.certify.thresholded.sweep)
  c = config.certify
  out = workdir.results_path("tune_thresholded" + ("_experts" if checked else "")
                             + ("_shared" if c.thresholded.shared_samples else "")
                             ).with_suffix(".json")
  swept = {"sweep": list(taus), "shared_samples": c.thresholded.shared_samples}
  parts = Parts(out.with_suffix(".parts"),  # under what a results file's rows depend on
                json.dumps(metadata | {"thresholded": swept}, sort_keys=True),
                writer=jax.process_index() == 0)
  kept = parts.load()
  todo = certification.selected_indices(len(dataset.holdout), c.skip, c.max)
  todo = todo[~np.isin(todo, [i for part in kept for i in part["index"]])]
  per_call = c.instances * jax.local_device_count()
  for start in tqdm(range(0, len(todo), per_call), desc="tune", unit="call", disable=None):
    if check_stop is not None:
      check_stop("tuning τ (it goes on from the calls kept)")
    batch = dataset.holdout.take(todo[start: start + per_call])
    certs = thresholded.sweep(smoothed, chain, grid, batch["image"], batch["index"], beta, taus,
                              shared=c.thresholded.shared_samples)
    part = {"index": batch["index"], "label": batch["label"]}
    for t, tau in enumerate(taus):
      part |= {f"{field}_{t}": value for field, value in certs[tau]._asdict().items()}
    parts.append(**part)
    kept.append(part)
  label = np.concatenate([part["label"] for part in kept])
  found = {tau: [Certified(*(part[f"{field}_{t}"] for field in Certified._fields))
                 for part in kept] for t, tau in enumerate(taus)}
  summaries = {tau: summary(label, certs, default_sigma(grid, tau))
               for tau, certs in found.items()}
  out.parent.mkdir(parents=True, exist_ok=True)
  write_json_atomic(out, {"certificate": thresholded.NAME, "sound": thresholded.SOUND,
                          "certificate_meaning": thresholded.MEANING,
                          "held_out_examples": int(len(label)), "holdout": config.train.holdout,
                          "experts": checked, "n": c.n, "alpha": c.alpha,
                          "checkpoint": metadata["checkpoint"],
                          "router_nodes": metadata["router"]["nodes"],
                          "thresholds": {f"{t:g}": s for t, s in summaries.items()}})
  parts.remove()
  print(f"{thresholded.NAME} (sound) on {len(label)} held-out training examples")
  print(table(summaries))
  print(f"written: {out}")
  return summaries


def default_sigma(grid, tau: float) -> float:
  """The σ of the chain's default route at threshold τ: the largest grid σ for τ ≥ 1/2 (a
  node moves x lower only where sure), the smallest below (every node's default is "lower")."""
  return float(grid[-1] if tau >= 0.5 else grid[0])


def summary(label, certs, default) -> dict:
  prediction = np.concatenate([c.prediction for c in certs])
  radius = np.concatenate([c.radius for c in certs])
  sigma = np.concatenate([c.sigma for c in certs])
  return analyze.radius_summary(radius, prediction == label) | {
      "default_sigma": default,
      # certified at a σ off the default route (a node's abstention reports σ_1: excluded)
      "moved": float(np.mean((sigma != np.float32(default)) & (prediction != sampler.ABSTAIN))),
      "abstain": float(np.mean(prediction == sampler.ABSTAIN))}


def best_threshold(summaries: dict) -> float:
  """The τ of the largest held-out ACR (the first of the sweep's order on a tie)."""
  return max(summaries, key=lambda t: summaries[t]["acr"])


def table(summaries: dict) -> str:
  """A markdown table: one row per τ, the best ACR in bold, ACR and certified accuracy rounded
  down (results.format_down)."""
  best = best_threshold(summaries)
  radii = list(next(iter(summaries.values()))["certified_accuracy"])
  lines = ["| τ | " + " | ".join(f"r = {r}" for r in radii)
           + " | ACR | default σ | moved off it | abstain |", "|---" * (len(radii) + 5) + "|"]
  for tau, s in summaries.items():
    acr = f"**{format_down(s['acr'], 3)}**" if tau == best else format_down(s["acr"], 3)
    lines.append(f"| {tau:g} | " + " | ".join(format_down(a, 3)
                                              for a in s["certified_accuracy"].values())
                 + f" | {acr} | {s['default_sigma']:g} | {s['moved']:.1%} | {s['abstain']:.1%} |")
  return "\n".join(lines)


if __name__ == "__main__":
  from instars_jax import cli
  cli.main("instars_jax.tune:tune_thresholds", reads_run=True)
