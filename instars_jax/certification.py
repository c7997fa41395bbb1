"""certify.py's library function: the latest checkpoint → the test split → the certificate
kind the config names (certificates/) → a results TSV.

Rows are appended and synced after every batch of instances; a rerun with the same settings
resumes after what is written. One process at a time writes a results file (a second one
exits naming the first). The noise of test image i depends only on (seed, i), so a resumed
run writes exactly the rows an uninterrupted one would. With several hosts (jax.distributed)
each certifies its share and host 0 merges them. Nothing here depends on which kind runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import instars_jax
from instars_jax import analyze, certificates, data
from instars_jax.storage import checkpoints, events, results
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing.sequential import rules
from instars_jax.smoothing.streams import Stream
from instars_jax.train import experts
from instars_jax.train.state import inference_fn, load_train_state

# With sequential sampling each call queues this many times certify.instances images per device:
# slots freed by early stops are refilled from the queue (continuous batching; the batch stays
# full to the end either way, as the instances still running take over freed samples), and
# a kill loses at most one call's finished rows.
SEQUENTIAL_QUEUE_DEPTH = 2
SPLITS = ("test", "holdout")


def validate_config(config):
  """The certificate kind's module, once every certification knob is checked; one clear
  ValueError otherwise, before anything compiles."""
  c = config.certify
  checks = [
      (c.n0 >= 1, f"certify.n0 must be >= 1; got {c.n0}"),
      (c.n >= 1, f"certify.n must be >= 1; got {c.n}"),
      (0 < c.alpha < 1, f"certify.alpha must lie in (0, 1); got {c.alpha}"),
      (c.skip >= 1, f"certify.skip must be >= 1; got {c.skip}"),
      (c.max == -1 or c.max >= 1, f"certify.max must be -1 (all) or >= 1; got {c.max}"),
      (c.batch >= 1, f"certify.batch must be >= 1; got {c.batch}"),
      (c.instances >= 1, f"certify.instances must be >= 1; got {c.instances}"),
      (c.split in SPLITS, f"certify.split must be one of {SPLITS}; got {c.split!r}"),
      (c.split == "test" or config.train.holdout > 0,
       "certify.split=holdout needs the run's train.holdout > 0"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  rules.from_config(c)
  return certificates.for_config(config)


def smoothed_model(config, workdir, state, dataset, metadata, **more) -> certificates.SmoothedModel:
  """What every kind gets: the run's model (and the σ experts `metadata` names), its key and
  the CERTIFY settings of config.certify; `more` fills the rest of certificates.SmoothedModel."""
  c = config.certify
  return certificates.SmoothedModel(
      apply_fn=inference_fn(state), num_classes=dataset.num_classes,
      key=jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.CERTIFY), n0=c.n0, n=c.n,
      alpha=c.alpha, batch_size=c.batch, rule=rules.from_config(c), workdir=workdir,
      image_size=int(np.prod(dataset.image_shape)),
      experts=experts.load(metadata.get("experts", [])), **more)


def check_dataset(config, dataset, workdir) -> None:
  """ValueError unless `dataset` is the one the saved model was trained on (its name, image
  shape and classes) and the command line's σ grid is the run's (the kinds' levels and its
  estimators' bins)."""
  trained, saved = workdir.read_facts(), workdir.read_config()
  ours = (config.dataset, tuple(dataset.image_shape), dataset.num_classes)
  theirs = (saved.dataset, tuple(trained.image_shape), trained.num_classes)
  if ours != theirs:
    raise ValueError(f"the model in {workdir.path} was trained on {theirs[0]} (images "
                     f"{theirs[1]}, {theirs[2]} classes), not {ours[0]} (images {ours[1]}, "
                     f"{ours[2]} classes)")
  grid, saved_grid = (tuple(float(s) for s in g)
                      for g in (config.train.table.grid, saved.train.table.grid))
  if grid != saved_grid:
    raise ValueError(f"train.table.grid={grid} differs from the trained run's {saved_grid} in "
                     f"{workdir.path}: certify with the run's grid")


def check_holdout(config, workdir) -> None:
  """ValueError unless train.holdout is the trained run's: the held-out examples must be the
  ones its training never saw."""
  saved = workdir.read_config().train.get("holdout", 0.0)
  if config.train.holdout != saved:
    raise ValueError(f"train.holdout={config.train.holdout} differs from the trained run's "
                     f"{saved} in {workdir.path}")


def selected_indices(num_test: int, skip: int, maximum: int) -> np.ndarray:
  """Cohen's selection: every skip-th test index below max (max = -1: no bound)."""
  stop = num_test if maximum < 0 else min(num_test, maximum)
  return np.arange(0, stop, skip)


def output_path(config, workdir) -> Path:
  """DIR/certify/<certify.name, or the kind's own file name (+ "_experts" with σ experts,
  + "_holdout" on the held-out split)>.tsv."""
  kind = certificates.get(certificates.name_of(config))
  stem = (kind.file_stem(config) + ("_experts" if experts.workdirs(config) else "")
          + ("_holdout" if config.certify.split == "holdout" else ""))
  return Workdir(workdir).results_path(config.certify.name or stem)


def run_metadata(config, kind, workdir) -> dict:
  """What the numbers in a results file depend on; a resumed run must match it exactly. With
  σ experts, "experts" lists them (σ, workdir, checkpoint step); without, the run's own
  model certifies at every σ."""
  c = config.certify
  metadata = {"certificate": kind.NAME, "certificate_meaning": kind.MEANING,
              "sound": kind.SOUND, "sigma_mode": c.sigma_mode, "n0": c.n0, "n": c.n,
              "alpha": c.alpha, "skip": c.skip, "max": c.max, "seed": config.seed,
              "dataset": config.dataset, "package_version": instars_jax.__version__,
              "sampling": c.sampling}
  rule = rules.from_config(c)
  if rule is not None:
    metadata["sequential"] = rule.metadata(c.n)
  checked = experts.check(config, workdir, kind.sigmas(config), c.split == "holdout")
  if checked:
    metadata["experts"] = checked
  if c.split != "test":
    metadata |= {"split": c.split, "holdout": config.train.holdout}
  return metadata | kind.metadata(config, workdir)


def _open_results(path: Path, metadata: dict) -> results.ResultsWriter:
  existing = results.read_metadata(path)
  if path.exists() and existing and existing != metadata:
    changed = sorted(k for k in metadata if existing.get(k) != metadata.get(k))
    raise ValueError(f"{path} was made with other settings ({', '.join(changed)}); rerun with "
                     "the same settings to resume, or set certify.name to write a new file")
  writer = results.ResultsWriter(path)
  results.write_metadata(path, metadata)
  return writer


def _certify_rows(config, certify_batch, test, todo, writer) -> None:
  """Certifies the test images `todo` in blocks, writing each block's rows as it finishes."""
  c = config.certify
  per_call = c.instances * jax.local_device_count()
  if c.sampling == "sequential":
    per_call *= SEQUENTIAL_QUEUE_DEPTH
  began_run, samples = time.perf_counter(), 0
  with tqdm(total=len(todo), desc=f"certify {writer.path.name}", unit="img", disable=None) as bar, \
      checkpoints.StopRequest() as stop:
    for start in range(0, len(todo), per_call):
      if stop.requested:
        raise checkpoints.Interrupted(f"stopped after {start} of {len(todo)} images: their rows "
                                      f"are in {writer.path}; rerun the same command to resume")
      batch = test.take(np.asarray(todo[start: start + per_call]))
      began = time.perf_counter()
      cert = certify_batch(batch["image"], batch["index"])
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
  """Certifies the selected test images (with certify.split=holdout: the held-out training
  examples) with the latest checkpoint in `workdir`, appending to DIR/certify/<name>.tsv;
  prints the analysis table and returns the file's path.

  With several hosts (jax.distributed), host k certifies every hosts-th selected image into
  <name>.host<k>of<hosts>.tsv, and host 0 merges the parts into <name>.tsv at the end.
  """
  host = jax.process_index() if host is None else host
  hosts = jax.process_count() if hosts is None else hosts
  kind = validate_config(config)
  if hosts > 1 and not kind.MULTI_HOST:
    raise ValueError(f"the {kind.NAME} certificate answers test points in one fixed order: run "
                     "it on a single host")
  workdir = Workdir(workdir)
  state = load_train_state(workdir)  # before the data: a wrong workdir fails fast
  if config.certify.split == "holdout":
    check_holdout(config, workdir)
  metadata = run_metadata(config, kind, workdir)
  dataset = data.from_config(config)
  check_dataset(config, dataset, workdir)
  images = dataset.test if config.certify.split == "test" else dataset.holdout
  path = output_path(config, workdir)
  part = path if hosts == 1 else path.with_name(f"{path.stem}.host{host}of{hosts}.tsv")
  with workdir.results_lock(part):
    writer = _open_results(part, metadata)
    mine = selected_indices(len(images), config.certify.skip, config.certify.max)
    todo = [i for i in mine[host::hosts] if i not in writer.done]
    smoothed = smoothed_model(config, workdir, state, dataset, metadata, results_path=path,
                              done=frozenset(writer.done))
    _certify_rows(config, kind.prepare(smoothed, config), images, todo, writer)
  if hosts > 1:
    multihost_utils.sync_global_devices(f"certified {path.name}")
    if host != 0:
      return path
    parts = [path.with_name(f"{path.stem}.host{k}of{hosts}.tsv") for k in range(hosts)]
    results.merge_results(parts, path)
    results.write_metadata(path, metadata)
  summary = analyze.summarize(path)
  writer = events.EventWriter(workdir.path, f"certify/{path.stem}")
  writer.scalars(0, {f"certified_accuracy/r_{r}": a
                     for r, a in summary["certified_accuracy"].items()} | {"acr": summary["acr"]})
  writer.close()
  print(analyze.markdown_table([summary]))
  return path
