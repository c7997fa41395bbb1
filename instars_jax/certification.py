"""The certification run: latest checkpoint → test split → certificate → TSV.

`certify.sigma_mode = "fixed"` certifies every image at `certify.sigma` (fixed_sigma). With
`"instance"`, `certify.certificate` names the kind (see certificates.py): locally_constant
(the default, sound: the run's σ-estimator picks a grid σ), memory, or per_sigma (Insta-RS
as published, not a certificate of the input-dependent classifier). Each kind is one
function of `certificates.CERTIFIERS`, called with the same context for every batch.

Rows are appended and synced after every batch of instances; a rerun with the same settings
resumes after what is written. One process at a time writes a results file (`locks.py`: a
second one exits with an error naming the first). The noise of test image i depends only on (seed, i), so a
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
from instars_jax import (analyze, certificates, checkpoints, data, estimator, locks,
                         model_state, results, search, smoothing)
from instars_jax import events as events_lib

PURPOSE_CERTIFY = 20
SIGMA_MODES = ("fixed", "instance")
# With sequential sampling each call queues this many times certify.instances images per device:
# slots freed by early stops are refilled from the queue (continuous batching; the batch stays
# full to the end either way, as the instances still running take over freed samples), and
# a kill loses at most one call's finished rows.
SEQUENTIAL_QUEUE_DEPTH = 2


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
  try:
    smoothing.check_sampling(c.sampling, c.tolerance, c.radii, n0=c.n0, n=c.n,
                             tolerance_alpha=c.tolerance_alpha)
  except ValueError as error:
    raise ValueError(f"certify.{error}") from None
  if c.sigma_mode not in SIGMA_MODES:
    raise ValueError(f"certify.sigma_mode must be one of {SIGMA_MODES}; got {c.sigma_mode!r}")
  if c.sigma_mode == "instance":
    if c.certificate not in certificates.INSTANCE_KINDS:
      raise ValueError(f"certify.certificate must be one of {certificates.INSTANCE_KINDS}; "
                       f"got {c.certificate!r}")
    search.validate_search(**search_arguments(config), n=c.n, alpha=c.alpha, batch_size=c.batch)
  if c.sigma_mode == "instance" and c.certificate == certificates.LOCALLY_CONSTANT:
    if c.estimator.n < 0 or not 0 < c.estimator.beta_share < 1:
      raise ValueError("certify.estimator.n must be >= 0 (0: certify.n) and "
                       "certify.estimator.beta_share must lie in (0, 1); got "
                       f"{c.estimator.n}, {c.estimator.beta_share}")


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


def kind_of(config) -> str:
  c = config.certify
  return certificates.FIXED_SIGMA if c.sigma_mode == "fixed" else c.certificate


def output_path(config, workdir) -> Path:
  c, kind = config.certify, kind_of(config)
  if kind == certificates.FIXED_SIGMA:
    default = f"sigma_{c.sigma:g}"
  elif kind == certificates.LOCALLY_CONSTANT:
    default = "locally_constant"
  else:
    suffix = "" if kind == certificates.PER_SIGMA else f"_{kind}"
    default = f"instance_{c.search.sigma_min:g}-{c.search.sigma_max:g}{suffix}"
  return Path(workdir) / "certify" / f"{c.name or default}.tsv"


def alpha_split(config) -> tuple[float, float]:
  """(class test's α, estimator's β) of the locally_constant certificate; they sum to
  certify.alpha."""
  c = config.certify
  beta = c.alpha * c.estimator.beta_share
  return c.alpha - beta, beta


def sampling_arguments(config) -> dict:
  """smoothing.certify's sampling arguments from config.certify ({} for fixed sampling)."""
  c = config.certify
  if c.sampling == "fixed":
    return {}
  return {"sampling": c.sampling, "tolerance": c.tolerance, "radii": tuple(c.radii),
          "tolerance_alpha": c.tolerance_alpha}


def run_metadata(config, estimator_settings=None) -> dict:
  """What the numbers in a results file depend on; a resumed run must match it exactly."""
  c, kind = config.certify, kind_of(config)
  metadata = {"certificate": kind, "certificate_meaning": certificates.MEANING[kind],
              "sound": kind != certificates.PER_SIGMA, "sigma_mode": c.sigma_mode, "n0": c.n0,
              "n": c.n, "alpha": c.alpha, "skip": c.skip, "max": c.max, "seed": config.seed,
              "dataset": config.dataset, "package_version": instars_jax.__version__,
              "sampling": c.sampling}
  if c.sampling == "sequential":
    # Each mode names its bound and looks, so files written with earlier ones do not resume
    # with these (decision: the union bound; radius: α split half at the last look, or
    # geometric looks only); tolerance_alpha unless 0 (α), the value files from before it
    # existed were written at.
    metadata["sequential"] = ({"mode": "decision", "radii": list(c.radii),
                               "test": "mixture_likelihood_ratio"} if c.radii else
                              {"mode": "radius", "tolerance": c.tolerance,
                               "bound": "clopper_pearson_alpha_by_samples",
                               "looks": "geometric_and_saturation"})
    if c.tolerance_alpha:
      metadata["sequential"]["tolerance_alpha"] = c.tolerance_alpha
    metadata["sequential"]["n_max"] = c.n
  if kind == certificates.FIXED_SIGMA:
    metadata["sigma"] = c.sigma
  elif kind == certificates.LOCALLY_CONSTANT:
    alpha_class, beta = alpha_split(config)
    metadata["estimator"] = dict(estimator_settings or {}, n=c.estimator.n or c.n)
    metadata["alpha_split"] = {"alpha_class": alpha_class, "beta_estimator": beta,
                               "total": c.alpha}
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


def certifier_context(config, state, num_classes, image_size, path, done, loaded_estimator=None):
  """The `certificates.Context` of this run's kind: model, key and the kind's settings
  (`loaded_estimator`: estimator.load's answer, for locally_constant)."""
  c, kind = config.certify, kind_of(config)
  ctx = certificates.Context(
      apply_fn=model_state.logits_fn(state), num_classes=num_classes,
      key=jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSE_CERTIFY),
      n0=c.n0, n=c.n, alpha=c.alpha, batch_size=c.batch, sigma=c.sigma,
      sampling=sampling_arguments(config))
  if kind in (certificates.PER_SIGMA, certificates.MEMORY):
    ctx.search = search_arguments(config)
  if kind == certificates.MEMORY:
    ctx.memory_dir = path.with_suffix(".memory")
    ctx.memory = certificates.load_memory(ctx.memory_dir, image_size, keep_ids=done)
  if kind == certificates.LOCALLY_CONSTANT:
    ctx.estimator_fn, saved = loaded_estimator
    ctx.beta = alpha_split(config)[1]
    ctx.grid, ctx.estimator_sigma = tuple(saved["grid"]), saved["sigma"]
    ctx.n_estimator = c.estimator.n or c.n
  return ctx


def _certify_rows(config, ctx, test, todo, writer, name) -> None:
  """Certifies the test images `todo` in blocks, writing each block's rows as it finishes."""
  c = config.certify
  certify_batch = certificates.CERTIFIERS[kind_of(config)]
  per_call = c.instances * jax.local_device_count()
  if c.sampling == "sequential":
    per_call *= SEQUENTIAL_QUEUE_DEPTH
  began_run, samples = time.perf_counter(), 0
  with tqdm(total=len(todo), desc=f"certify {name}", unit="img", disable=None) as bar, \
      checkpoints.StopRequest() as stop:
    for start in range(0, len(todo), per_call):
      if stop.due(start):
        raise checkpoints.Interrupted(f"stopped after {start} of {len(todo)} images: their rows "
                                      f"are in {writer.path}; rerun the same command to resume")
      batch = test.take(np.asarray(todo[start: start + per_call]))
      began = time.perf_counter()
      cert = certify_batch(ctx, batch["image"], batch["index"])
      seconds = (time.perf_counter() - began) / len(batch["index"])
      writer.write([{"idx": int(i), "label": int(y), "predict": int(p), "radius": float(r),
                     "correct": int(p == y), "time": seconds, "sigma": float(s),
                     "samples": int(m)}
                    for i, y, p, r, s, m in zip(batch["index"], batch["label"], cert.prediction,
                                                cert.radius, cert.sigma, cert.num_samples)])
      samples += int(np.sum(cert.num_samples))
      bar.update(len(batch["index"]))
      bar.set_postfix(samples_per_s=f"{samples / (time.perf_counter() - began_run):.4g}")


def certify_test_set(config, workdir, host: int | None = None, hosts: int | None = None) -> Path:
  """Certifies the selected test images with the latest checkpoint in `workdir`, appending to
  DIR/certify/<name>.tsv; prints the analysis table and returns the file's path.

  With several hosts (jax.distributed), host k certifies every hosts-th selected image into
  <name>.host<k>of<hosts>.tsv, and host 0 merges the parts into <name>.tsv at the end.
  """
  host = jax.process_index() if host is None else host
  hosts = jax.process_count() if hosts is None else hosts
  validate_config(config)
  kind = kind_of(config)
  if hosts > 1 and kind == certificates.MEMORY:
    raise ValueError("the memory certificate answers test points in one fixed order: run it "
                     "on a single host")
  state = model_state.load_train_state(workdir)  # before the data: a wrong workdir fails fast
  loaded = estimator.load(workdir) if kind == certificates.LOCALLY_CONSTANT else None
  dataset = data.from_config(config)
  path = output_path(config, workdir)
  metadata = run_metadata(config, loaded and loaded[1])
  part = path if hosts == 1 else path.with_name(f"{path.stem}.host{host}of{hosts}.tsv")
  with locks.exclusive(part.with_name(part.name + ".lock"), f"the results file {part}"):
    writer = _open_results(part, metadata)
    mine = selected_indices(len(dataset.test), config.certify.skip, config.certify.max)
    todo = [i for i in mine[host::hosts] if i not in writer.done]
    ctx = certifier_context(config, state, dataset.num_classes,
                            int(np.prod(dataset.image_shape)), path, writer.done, loaded)
    _certify_rows(config, ctx, dataset.test, todo, writer, path.name)
  if hosts > 1:
    multihost_utils.sync_global_devices(f"certified {path.name}")
    if host != 0:
      return path
    parts = [path.with_name(f"{path.stem}.host{k}of{hosts}.tsv") for k in range(hosts)]
    results.merge_results(parts, path)
    results.write_metadata(path, metadata)
  summary = analyze.summarize(path)
  events = events_lib.EventWriter(workdir, f"certify/{path.stem}")
  events.scalars(0, {f"certified_accuracy/r_{r}": a
                     for r, a in summary["certified_accuracy"].items()} | {"acr": summary["acr"]})
  events.close()
  print(analyze.markdown_table([summary]))
  return path
