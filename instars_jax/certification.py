"""certify.py's library function: the run in a workdir → the test split → the certificate
kind the config names (certificates/) → a results TSV.

The run's settings are its own (config.json): a config may differ from them only in what
certification decides (`owns`: certify.*, input.*, data_dir, cache_dir, distributed). A
results file holds the rows of one classifier: its sidecar names every checkpoint that
certified (the run's step, its estimator's or each router node's, each σ expert's), the
models are loaded at those steps, and a resume against any other checkpoint is refused.

Rows are appended and synced after every batch of instances; a rerun with the same settings
resumes after what is written. One process at a time writes a results file (a second one
exits naming the first). The noise of test image i depends only on (seed, i), so a resumed
run writes exactly the rows an uninterrupted one would. With several hosts (jax.distributed)
each certifies its share and host 0 merges them. Nothing here depends on which kind runs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import ml_collections
from ml_collections.config_flags import config_path

import instars_jax
from configs import default
from instars_jax import analyze, certificates, data, plugins
from instars_jax.selection import classifier, estimator, experts
from instars_jax.storage import checkpoints, events, results
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing.sequential import rules
from instars_jax.smoothing.streams import Stream

# With sequential sampling each call queues this many times certify.instances images per device:
# slots freed by early stops are refilled from the queue (continuous batching; the batch stays
# full to the end either way, as the instances still running take over freed samples), and
# a kill loses at most one call's finished rows.
SEQUENTIAL_QUEUE_DEPTH = 2
SPLITS = ("test", "holdout")
# The settings certification decides; every other one is the trained run's.
OWN_SECTIONS = ("certify", "input")
OWN_KEYS = ("data_dir", "cache_dir", "distributed")


def owns(key: str) -> bool:
  """Whether the dotted config `key` is certification's to set (not the trained run's)."""
  return key.split(".")[0] in OWN_SECTIONS or key in OWN_KEYS


def own_settings() -> str:
  return ", ".join([f"{s}.*" for s in OWN_SECTIONS] + list(OWN_KEYS))


def run_config(workdir, overrides: dict, outside=()) -> ml_collections.ConfigDict:
  """The saved config of the run in `workdir` (completed by configs/default.py for keys added
  since, and by the sections of the outside plug-ins `outside`, e.g. a kind's) with
  `overrides` ({dotted key: value}) set; ValueError naming an override that is a setting of
  the trained run, FileNotFoundError when there is no run."""
  foreign = [key for key in overrides if not owns(key)]
  if foreign:
    raise ValueError(f"--config.{foreign[0]} is a setting of the trained run in {workdir}, "
                     f"read from its config.json: the command line may set only {own_settings()}")
  config = saved_config(workdir, outside)
  for key, value in overrides.items():
    config_path.set_value(key, config, value)
  return config


def saved_config(workdir, outside=()) -> ml_collections.ConfigDict:
  """The run's saved config, completed by the defaults with its outside plug-ins' sections
  and those of `outside`, with the certification settings its training tuned (tuned.json)."""
  workdir = Workdir(workdir)
  modules = dict.fromkeys(tuple(workdir.read_config().get("plugins", ())) + tuple(outside))
  config = workdir.read_config(default.get_config(",".join(modules)))
  for key, value in workdir.tuned_settings().items():
    config_path.set_value(key, config, value)
  return config


def check_run(config, workdir) -> None:
  """ValueError unless `config` agrees with the run trained in `workdir` outside what
  certification owns (its dataset, model, σ grid, estimator, held-out split and seed)."""
  workdir = Workdir(workdir)
  saved = saved_config(workdir)
  # config.plugins names the outside plug-ins whose sections the config has, and those are
  # compared themselves (a config may also name a kind's, which is certification's).
  differing = workdir.differing(config, saved, lambda key: owns(key) or key == "plugins")
  if differing:
    shown = ", ".join(f"{k}={config_path.get_value(k, config)!r} (the run: "
                      f"{config_path.get_value(k, saved)!r})" for k in differing[:3])
    raise ValueError(f"the config differs from the run trained in {workdir.path}: {shown}; "
                     f"certify.py --workdir={workdir.path} reads the run's settings itself")


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
  plugins.raise_first_failure(checks)
  rules.from_config(c)
  return certificates.for_config(config)


def smoothed_model(config, workdir, dataset, metadata, **more) -> certificates.SmoothedModel:
  """What every kind gets: the run's model and the σ experts, at the checkpoints `metadata`
  records, its key and the CERTIFY settings of config.certify; `more` fills the rest of
  certificates.SmoothedModel."""
  c = config.certify
  return certificates.SmoothedModel(
      apply_fn=classifier.load(workdir, metadata["checkpoint"]), num_classes=dataset.num_classes,
      key=jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.CERTIFY), n0=c.n0, n=c.n,
      alpha=c.alpha, batch_size=c.batch, rule=rules.from_config(c), workdir=workdir,
      image_size=int(np.prod(dataset.image_shape)),
      experts=experts.load(metadata.get("experts", [])), metadata=metadata, **more)


def check_dataset(dataset, workdir) -> None:
  """ValueError unless `dataset` has the image shape and classes the saved model was trained
  on (the same name can be read from another data_dir)."""
  trained = workdir.read_facts()
  ours, theirs = ((tuple(dataset.image_shape), dataset.num_classes),
                  (tuple(trained.image_shape), trained.num_classes))
  if ours != theirs:
    raise ValueError(f"the model in {workdir.path} was trained on images {theirs[0]} of "
                     f"{theirs[1]} classes; the dataset read has images {ours[0]} of "
                     f"{ours[1]} classes")


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


def model_step(workdir) -> int:
  """The step of the run's latest checkpoint, the model that certifies; FileNotFoundError
  when there is none."""
  step = workdir.checkpoints().latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir.path}: train first with train.py "
                            f"--workdir={workdir.path}")
  return int(step)


def run_metadata(config, kind, workdir) -> dict:
  """What the numbers in a results file depend on; a resumed run must match it exactly:
  "checkpoint", the step of the run's model that certifies (its latest; FileNotFoundError
  when there is none), the kind's own models' steps in its metadata, and with σ experts,
  "experts" (σ, workdir, checkpoint step); without, the run's own model certifies at every σ."""
  c = config.certify
  metadata = {"checkpoint": model_step(workdir), "certificate": kind.NAME,
              "certificate_meaning": kind.MEANING, "sound": kind.SOUND, "sigma_mode": c.sigma_mode, "n0": c.n0, "n": c.n,
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


def certify(config, workdir) -> list:
  """certify.py: `certify_test_set`, or with certify.sigma_mode=grid fixed σ at every σ of
  the run's grid in one process (a results file each, one table with the label oracle over
  them: the fair comparison of the one base model's σ). The results files' paths."""
  if config.certify.sigma_mode != "grid":
    return [certify_test_set(config, workdir)]
  if config.certify.name:
    raise ValueError("certify.name names one file; certify.sigma_mode=grid writes one per σ")
  paths = []
  for sigma in estimator.grid_of(config):
    at_sigma = config.copy_and_resolve_references()
    at_sigma.certify.sigma = sigma
    paths.append(certify_test_set(at_sigma, workdir, report=False))
  summaries = [analyze.summarize(path) for path in paths]
  print(analyze.markdown_table(summaries + [analyze.oracle_summary(paths)]))
  return paths


def certify_test_set(config, workdir, host: int | None = None, hosts: int | None = None,
                     report: bool = True) -> Path:
  """Certifies the selected test images (with certify.split=holdout: the held-out training
  examples) with the latest checkpoint in `workdir`, appending to DIR/certify/<name>.tsv;
  prints the analysis table (`report`) and returns the file's path.

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
  check_run(config, workdir)  # before the data: a wrong workdir fails fast
  metadata = run_metadata(config, kind, workdir)
  dataset = data.from_config(config)
  check_dataset(dataset, workdir)
  images = dataset.test if config.certify.split == "test" else dataset.holdout
  path = output_path(config, workdir)
  part = path if hosts == 1 else path.with_name(f"{path.stem}.host{host}of{hosts}.tsv")
  smoothed = smoothed_model(config, workdir, dataset, metadata, results_path=path)
  with workdir.results_lock(part):
    writer = _open_results(part, metadata)
    mine = selected_indices(len(images), config.certify.skip, config.certify.max)
    todo = [i for i in mine[host::hosts] if i not in writer.done]
    smoothed = dataclasses.replace(smoothed, done=frozenset(writer.done))
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
  writer.write_scalars(0, {f"certified_accuracy/r_{r}": a for r, a in
                           summary["certified_accuracy"].items()} | {"acr": summary["acr"]})
  writer.close()
  if report:
    print(analyze.markdown_table([summary]))
  return path
