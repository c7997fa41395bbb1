"""The certification run: latest checkpoint → test split → (σ search) → CERTIFY → TSV.

`certify.sigma_mode = "fixed"` certifies every image at `certify.sigma` (fixed_sigma). With
`"instance"`, `certify.certificate` decides what is reported:
  per_sigma         σ per image from `search.search_sigma` (its own key), then CERTIFY at that σ
                    with fresh samples: Insta-RS as published, not a certificate of G.
  memory            the per_sigma answers passed through `certificates.answer_with_memory` in
                    idx order; the memory is saved beside the TSV (<name>.memory/, one part
                    per batch).
  locally_constant  σ from the grid bin a smoothed, certified selector picks
                    (`certificates.certify_locally_constant`; `selector.py` trains it).

Rows are appended and synced after every batch of instances; a rerun with the same settings
resumes after what is written. The noise of test image i depends only on (seed, i), so a
resumed run writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import instars_jax
from instars_jax import (analyze, certificates, checkpoints, data, results, search, selector,
                         smoothing, training)

PURPOSE_CERTIFY = 20
SIGMA_MODES = ("fixed", "instance")


def validate_config(config) -> None:
  """Rejects bad certification knobs with one clear error, before anything compiles."""
  c = config.certify
  checks = [
      (np.isfinite(c.sigma) and c.sigma > 0, f"certify.sigma must be finite and > 0; got {c.sigma}"),
      (c.n0 >= 1, f"certify.n0 must be >= 1; got {c.n0}"),
      (c.n >= 1, f"certify.n must be >= 1; got {c.n}"),
      (0 < c.alpha < 1, f"certify.alpha must lie in (0, 1); got {c.alpha}"),
      (c.skip >= 1, f"certify.skip must be >= 1; got {c.skip}"),
      (c.max == -1 or c.max >= 1, f"certify.max must be -1 (all) or >= 1; got {c.max}"),
      (c.batch >= 1, f"certify.batch must be >= 1; got {c.batch}"),
      (c.instances >= 1, f"certify.instances must be >= 1; got {c.instances}"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  if c.sigma_mode not in SIGMA_MODES:
    raise ValueError(f"certify.sigma_mode must be one of {SIGMA_MODES}; got {c.sigma_mode!r}")
  if c.sigma_mode == "instance":
    if c.certificate not in certificates.INSTANCE_KINDS:
      raise ValueError(f"certify.certificate must be one of {certificates.INSTANCE_KINDS}; "
                       f"got {c.certificate!r}")
    search.validate_search(**search_arguments(config), n=c.n, alpha=c.alpha, batch_size=c.batch)
  if c.sigma_mode == "instance" and c.certificate == certificates.LOCALLY_CONSTANT:
    grid = np.asarray(c.selector.grid, np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(grid <= 0) or np.any(np.diff(grid) <= 0):
      raise ValueError(f"certify.selector.grid must be at least two increasing σ > 0; "
                       f"got {tuple(c.selector.grid)}")
    if not c.selector.sigma > 0 or c.selector.n < 1 or c.selector.epochs < 1:
      raise ValueError("certify.selector.sigma must be > 0 and certify.selector.n and .epochs "
                       f">= 1; got {c.selector.sigma}, {c.selector.n}, {c.selector.epochs}")


def search_arguments(config) -> dict:
  """The σ-search parameters of `config.certify.search`, with the 10%-of-n default resolved."""
  s, c = config.certify.search, config.certify
  samples = s.samples_per_step or search.default_samples_per_step(c.n, s.starts, s.steps)
  return {"sigma_min": s.sigma_min, "sigma_max": s.sigma_max, "starts": s.starts,
          "steps": s.steps, "samples_per_step": samples, "estimate_alpha": s.estimate_alpha}


def selected_indices(num_test: int, skip: int, maximum: int) -> np.ndarray:
  """Cohen's selection: every skip-th test index below max (max = -1: no bound)."""
  stop = num_test if maximum < 0 else min(num_test, maximum)
  return np.arange(0, stop, skip)


def output_path(config, workdir) -> Path:
  c = config.certify
  if c.sigma_mode == "fixed":
    default = f"sigma_{c.sigma:g}"
  elif c.certificate == certificates.LOCALLY_CONSTANT:
    default = f"locally_constant_{'-'.join(f'{g:g}' for g in c.selector.grid)}"
  else:
    suffix = "" if c.certificate == certificates.PER_SIGMA else f"_{c.certificate}"
    default = f"instance_{c.search.sigma_min:g}-{c.search.sigma_max:g}{suffix}"
  return Path(workdir) / "certify" / f"{c.name or default}.tsv"


def run_metadata(config) -> dict:
  """What the numbers in a results file depend on; a resumed run must match it exactly."""
  c = config.certify
  kind = certificates.FIXED_SIGMA if c.sigma_mode == "fixed" else c.certificate
  metadata = {"certificate": kind, "certificate_meaning": certificates.MEANING[kind],
              "sigma_mode": c.sigma_mode, "n0": c.n0, "n": c.n, "alpha": c.alpha,
              "skip": c.skip, "max": c.max, "seed": config.seed, "dataset": config.dataset,
              "package_version": instars_jax.__version__}
  if c.sigma_mode == "fixed":
    metadata["sigma"] = c.sigma
  elif kind == certificates.LOCALLY_CONSTANT:
    metadata["selector"] = {"grid": list(c.selector.grid), "sigma": c.selector.sigma,
                            "n": c.selector.n, "epochs": c.selector.epochs,
                            "labels": "nearest grid bin of the Insta-RS Train sigma table",
                            "alpha_split": "alpha/2 selector, alpha/2 class"}
  else:
    metadata["search"] = search_arguments(config)
    budget = search.search_budget(c.search.starts, c.search.steps,
                                  metadata["search"]["samples_per_step"])
    metadata["search_samples_per_instance"] = budget
    metadata["search_share_of_samples"] = budget / (budget + c.n0 + c.n)
  return metadata


def _open_results(path: Path, metadata: dict) -> results.ResultsWriter:
  existing = results.read_metadata(path)
  if path.exists() and existing and existing != metadata:
    changed = sorted(k for k in metadata if existing.get(k) != metadata.get(k))
    raise ValueError(f"{path} was made with other settings ({', '.join(changed)}); rerun with "
                     "the same settings to resume, or set certify.name to write a new file")
  writer = results.ResultsWriter(path)
  results.write_metadata(path, metadata)
  return writer


def _per_sigma(apply_fn, batch, config, key, num_classes):
  """(prediction, radius, σ) of CERTIFY at certify.sigma or at the searched σ (per_sigma)."""
  c = config.certify
  sigma = c.sigma
  if c.sigma_mode == "instance":
    sigma = search.search_sigma(apply_fn, batch["image"],
                                jax.random.fold_in(key, smoothing.PURPOSE_SEARCH),
                                **search_arguments(config), n=c.n, alpha=c.alpha,
                                batch_size=c.batch, num_classes=num_classes, ids=batch["index"])
  cert = smoothing.certify(apply_fn, batch["image"], sigma, key, n0=c.n0, n=c.n, alpha=c.alpha,
                           batch_size=c.batch, num_classes=num_classes, ids=batch["index"])
  return cert.prediction, cert.radius, cert.sigma


def certify_test_set(config, workdir, host: int | None = None, hosts: int | None = None) -> Path:
  """Certifies the selected test images with the latest checkpoint in `workdir`, appending to
  DIR/certify/<name>.tsv; prints the analysis table and returns the file's path.

  With several hosts (jax.distributed), host k certifies every hosts-th selected image into
  <name>.host<k>of<hosts>.tsv, and host 0 merges the parts into <name>.tsv at the end.
  """
  host = jax.process_index() if host is None else host
  hosts = jax.process_count() if hosts is None else hosts
  validate_config(config)
  if hosts > 1 and config.certify.sigma_mode == "instance" and \
      config.certify.certificate == certificates.MEMORY:
    raise ValueError("the memory certificate answers test points in one fixed order: run it "
                     "on a single host")
  state = checkpoints.load_train_state(workdir)  # before the data: a wrong workdir fails fast
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir,
                              cache_dir=config.cache_dir, num_classes=config.num_classes)
  path = output_path(config, workdir)
  metadata = run_metadata(config)
  part = path if hosts == 1 else path.with_name(f"{path.stem}.host{host}of{hosts}.tsv")
  writer = _open_results(part, metadata)

  c = config.certify
  kind = metadata["certificate"]
  mine = selected_indices(len(dataset.test), c.skip, c.max)[host::hosts]
  todo = [i for i in mine if i not in writer.done]
  apply_fn = training.logits_fn(state)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSE_CERTIFY)
  if kind == certificates.LOCALLY_CONSTANT:
    selector_fn = selector.load_or_train(config, workdir, dataset, state.sigma_table)
  memory_dir = path.with_suffix(".memory")
  if kind == certificates.MEMORY:
    memory = certificates.load_memory(memory_dir, int(np.prod(dataset.image_shape)),
                                      keep_ids=writer.done)

  per_call = c.instances * jax.local_device_count()
  for start in tqdm(range(0, len(todo), per_call), desc=f"certify {path.name}",
                    unit_scale=per_call, disable=None):
    batch = dataset.test.take(np.asarray(todo[start: start + per_call]))
    began = time.perf_counter()
    if kind == certificates.LOCALLY_CONSTANT:
      cert = certificates.certify_locally_constant(
          apply_fn, selector_fn, batch["image"], key, sigma_grid=c.selector.grid,
          sigma_selector=c.selector.sigma, n0=c.n0, n=c.n, n_selector=c.selector.n,
          alpha=c.alpha, batch_size=c.batch,
          num_classes=dataset.num_classes, ids=batch["index"])
      prediction, radius, sigma = cert.prediction, cert.radius, cert.sigma
    else:
      prediction, radius, sigma = _per_sigma(apply_fn, batch, config, key, dataset.num_classes)
    if kind == certificates.MEMORY:
      answers, stored = [], len(memory.ids)
      for x, p, r, i in zip(batch["image"], prediction, radius, batch["index"]):
        p, r, memory = certificates.answer_with_memory(memory, x, int(p), float(r), int(i))
        answers.append((p, r))
      prediction, radius = map(np.asarray, zip(*answers))
      certificates.append_memory(memory_dir, memory, stored)
    seconds = (time.perf_counter() - began) / len(batch["index"])
    writer.write([{"idx": int(i), "label": int(y), "predict": int(p), "radius": float(r),
                   "correct": int(p == y), "time": seconds, "sigma": float(s)}
                  for i, y, p, r, s in zip(batch["index"], batch["label"], prediction, radius,
                                           sigma)])
  if hosts > 1:
    multihost_utils.sync_global_devices(f"certified {path.name}")
    if host != 0:
      return path
    parts = [path.with_name(f"{path.stem}.host{k}of{hosts}.tsv") for k in range(hosts)]
    results.merge_results(parts, path)
    results.write_metadata(path, metadata)
  print(analyze.markdown_table([analyze.summarize(path)]))
  return path
