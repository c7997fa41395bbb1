"""Training the base classifier: Gaussian augmentation (Cohen et al.) and Insta-RS Train,
then (optionally) the σ-estimator of the sound instance-wise certificate.

Every example is trained at the noise level in its entry of the per-example σ table carried
in the train state. With Gaussian augmentation every entry stays at `train.sigma`. Insta-RS
Train (`train.insta`) runs two stages: epochs [0, stage1_epochs) are Gaussian augmentation
(at `train.sigma`, or with `train.stage1_noise = "grid"` at a grid σ drawn per example and
step); from then on, before every `table.update_every`-th epoch, the table's radius profile
over `train.table.grid` is re-estimated and each example trains at its best grid σ
(`sigma_table.py`). With `estimator.epochs > 0` the run ends with the σ-estimator stage
(`estimator.py`), for Insta-RS and Cohen models alike.

The noise and the augmentation of example i in epoch e depend only on (seed, e, i), and the
table update of epoch e only on (seed, e, i) and the state: a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.

Training is data parallel: each global batch is sharded over a 1-D `data` mesh of all
devices and jit inserts the gradient and BatchNorm-statistics reductions.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from instars_jax import (checkpoints, data, estimator, locks, model_state, models, parallel,
                         pipeline, sigma_table)
from instars_jax import events as events_lib
from instars_jax.model_state import TrainState, example_keys, gaussian_noise, logits_fn

# Config keys added after runs were made, with the value that means what those runs did
# (a run that never diverged trained the same under the divergence watch).
LATER_KEYS = {"image_size": 0, "corrupt_images": "fail", "train.checkpoint_every_steps": 0,
              "train.divergence.nonfinite": True, "train.divergence.chance_steps": 200,
              "train.divergence.chance_fraction": 0.98, "train.table.explore": 0.0}
FINETUNE_STAGE = "finetune"  # the epochs after train.epochs (estimator.finetune_epochs)
PURPOSE_TRAIN_NOISE = 10
PURPOSE_EVAL_NOISE = 11


@functools.partial(jax.jit, static_argnames=("grid", "explore"), donate_argnames="state")
def train_step(state: TrainState, batch, epoch_key, grid: tuple | None = None,
               explore: float = 1.0):
  """One SGD step on cross-entropy of the noisy batch (uint8 or [0, 1] images, augmented by
  the input pipeline), each example at its table σ; with `grid`, a share `explore` of the
  examples (drawn from each one's own key) at a random grid σ instead."""
  keys = example_keys(epoch_key, batch["index"])
  images = unit_range(batch["image"])
  sigma = training_sigmas(state.sigma_table[batch["index"]], keys, grid, explore)
  noisy = gaussian_noise(keys, images, sigma)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, noisy,
                                     train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, {"loss": loss, "noisy_accuracy": accuracy}


def training_sigmas(table_sigma, keys, grid: tuple | None, explore: float):
  """σ per example: its table σ; with `grid`, for a share `explore` of the examples (drawn
  from each one's key) a grid σ drawn uniformly from that key instead."""
  if grid is None:
    return table_sigma
  pick = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, len(grid)))
  drawn = jnp.asarray(grid, jnp.float32)[pick(keys)]
  if explore >= 1.0:
    return drawn
  chosen = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)) < explore)(keys)
  return jnp.where(chosen, drawn, table_sigma)


def unit_range(images):
  """Pixels in [0, 1] as float32: uint8 batches (the input pipeline's) are scaled on device."""
  return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


@jax.jit
def eval_step(state: TrainState, batch, key, sigma):
  """Sums over the batch of clean and noisy (at σ) correctness; padding has weight 0."""
  apply = logits_fn(state)
  noisy = gaussian_noise(example_keys(key, batch["index"]), batch["image"],
                         jnp.full(batch["label"].shape, sigma))
  clean_hits = jnp.argmax(apply(batch["image"]), -1) == batch["label"]
  noisy_hits = jnp.argmax(apply(noisy), -1) == batch["label"]
  w = batch["weight"]
  return {"clean": jnp.sum(clean_hits * w), "noisy": jnp.sum(noisy_hits * w), "count": jnp.sum(w)}


def evaluate(state, split, sharder, config, sigma) -> dict:
  """Clean and noisy test accuracy on the first `train.eval_examples` test examples."""
  limit = min(len(split), config.train.eval_examples or len(split))
  subset = data.Split(split.images, split.labels[:limit])
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSE_EVAL_NOISE)
  totals = {"clean": 0.0, "noisy": 0.0, "count": 0.0}
  for batch in data.batches(subset, config.train.batch_size, host_id=jax.process_index(),
                            host_count=jax.process_count()):
    real = len(batch["label"])
    batch = {k: parallel.pad_rows(v, sharder.local_devices) for k, v in batch.items()}
    batch["weight"] = (np.arange(len(batch["label"])) < real).astype(np.float32)
    out = eval_step(state, sharder.batch(batch), key, sigma)
    for k in totals:
      totals[k] += float(out[k])
  return {"test_clean_accuracy": totals["clean"] / totals["count"],
          "test_noisy_accuracy": totals["noisy"] / totals["count"]}


class DivergenceWatch:
  """Stops training that has diverged: a non-finite loss at any step, or, from
  `start_step` on, a mean loss over a window of `chance_steps` steps at or above
  `chance_fraction` × ln(num_classes), the loss of a guess (the net has collapsed to chance).

  Losses stay on the device and are summed there; the host looks once per window (and at a
  non-finite check every window too), so the watch costs no per-step synchronisation."""

  def __init__(self, settings, num_classes: int, first_step: int, start_step: int):
    self.settings, self.start_step = settings, start_step
    self.window = settings.chance_steps or 100
    self.chance = float(np.log(num_classes))
    self.step, self.sum, self.nonfinite = first_step, 0.0, None

  def __call__(self, metrics) -> None:
    loss = metrics["loss"]
    self.step += 1
    self.sum = self.sum + loss
    if self.settings.nonfinite:
      bad = jnp.logical_not(jnp.isfinite(loss))
      self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
    if self.step % self.window:
      return
    self.check_nonfinite()
    mean, self.sum, self.nonfinite = float(self.sum) / self.window, 0.0, None
    threshold = self.settings.chance_fraction * self.chance
    if self.settings.chance_steps and self.step - self.window >= self.start_step \
        and mean >= threshold:
      raise ValueError(f"training diverged by step {self.step}: mean train_loss {mean:.4g} over "
                       f"{self.window} steps is at chance level (>= {threshold:.4g} = "
                       f"{self.settings.chance_fraction:g} x ln {round(np.exp(self.chance))}); "
                       "see train.divergence")

  def check_nonfinite(self, where: str = "") -> None:
    """Raises if a loss since the last window was NaN or inf (also called at an epoch end)."""
    if self.nonfinite is not None and bool(self.nonfinite):
      raise ValueError(f"training diverged by step {self.step}{where}: train_loss is not finite "
                       "(NaN or inf); lower train.learning_rate or set train.grad_clip")


def validate_config(config, devices: int) -> None:
  """Rejects bad training knobs with one clear error, before anything compiles."""
  t = config.train
  checks = [
      (t.epochs >= 1, f"train.epochs must be >= 1; got {t.epochs}"),
      (t.batch_size >= 1 and t.batch_size % devices == 0,
       f"train.batch_size must be a positive multiple of the device count {devices}; "
       f"got {t.batch_size}"),
      (t.learning_rate > 0, f"train.learning_rate must be > 0; got {t.learning_rate}"),
      (0 <= t.momentum < 1, f"train.momentum must lie in [0, 1); got {t.momentum}"),
      (t.weight_decay >= 0, f"train.weight_decay must be >= 0; got {t.weight_decay}"),
      (np.isfinite(t.sigma) and t.sigma > 0, f"train.sigma must be finite and > 0; got {t.sigma}"),
      (t.schedule in ("step", "cosine"), f"train.schedule must be 'step' or 'cosine'; got {t.schedule!r}"),
      (config.model.name in models.ARCHITECTURES,
       f"model.name must be one of {models.ARCHITECTURES}; got {config.model.name!r}"),
      (config.model.dtype in models.DTYPES,
       f"model.dtype must be one of {sorted(models.DTYPES)}; got {config.model.dtype!r}"),
  ]
  d = t.divergence
  checks += [(d.chance_steps >= 0, f"train.divergence.chance_steps must be >= 0; got {d.chance_steps}"),
             (0 < d.chance_fraction, f"train.divergence.chance_fraction must be > 0; "
                                     f"got {d.chance_fraction}")]
  if t.stage1_noise not in ("sigma", "grid"):
    checks.append((False, f"train.stage1_noise must be 'sigma' or 'grid'; got {t.stage1_noise!r}"))
  checks += pipeline.validate(config)
  if t.insta or t.stage1_noise == "grid" or config.estimator.epochs:
    checks += sigma_table.validate(config, devices)
  if config.estimator.epochs or config.estimator.finetune_epochs:
    checks += estimator.validate(config)
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


def _dotted(tree: dict, prefix: str = "") -> dict:
  """{"a.b": value} for every leaf of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _dotted(value, f"{prefix}{key}.")
    else:
      flat[prefix + key] = value
  return flat


def _check_workdir(workdir: Path, config) -> None:
  """Refuses to resume a run whose saved config differs in anything but the certify,
  estimator and input sections (the estimator checks its own settings, so a finished run can
  get one; the input settings never change the batches)."""
  saved_path = workdir / checkpoints.CONFIG_FILE
  if not saved_path.exists():
    return
  saved = LATER_KEYS | _dotted(json.loads(saved_path.read_text()))
  current = _dotted(json.loads(config.to_json()))
  differing = sorted(k for k in set(saved) | set(current)
                     if k.split(".")[0] not in ("certify", "estimator", "input")
                     and saved.get(k) != current.get(k))
  if differing:
    raise ValueError(f"{workdir} holds a run with a different config ({', '.join(differing)}): "
                     "rerun with the same config to resume, or choose a new --workdir")


def _write_metrics(path: Path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_and_evaluate(config, workdir) -> TrainState:
  """Trains per `config`, saving a checkpoint after every epoch to `workdir`; rerunning the
  same command resumes from the latest checkpoint."""
  workdir = Path(workdir)
  sharder = model_state.Sharder()
  validate_config(config, jax.device_count())
  dataset = data.from_config(config)
  _check_workdir(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  # One writer per workdir: process 0 of a run holds the lock (the other hosts write nothing).
  lock = (locks.exclusive(workdir / "train.lock", f"the training run in {workdir}")
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    return _train(config, workdir, dataset, sharder)


def _train(config, workdir: Path, dataset, sharder) -> TrainState:
  """The body of train_and_evaluate, run while holding the workdir's lock."""
  steps_per_epoch = data.num_batches(len(dataset.train), config.train.batch_size, True)
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                     f"{len(dataset.train)} training examples")
  run = {"image_shape": list(dataset.image_shape), "num_classes": dataset.num_classes,
         "stats": dataset.stats, "num_train": len(dataset.train), "steps_per_epoch": steps_per_epoch,
         "dataset": dataset.name}
  if jax.process_index() == 0:
    checkpoints.write_json_atomic(workdir / checkpoints.CONFIG_FILE, json.loads(config.to_json()))
    checkpoints.write_json_atomic(workdir / checkpoints.RUN_FILE, run)

  state = sharder.replicate(model_state.create_train_state(
      config, dataset.image_shape, dataset.num_classes, dataset.stats, len(dataset.train),
      steps_per_epoch))
  manager = checkpoints.manager(workdir)
  state, start_epoch = checkpoints.restore_latest(manager, state)
  interim = checkpoints.manager(workdir / checkpoints.INTERIM_DIR, max_to_keep=1)
  resume_at = 0  # batches of epoch start_epoch already trained (an interim checkpoint)
  if (interim.latest_step() or 0) > start_epoch * steps_per_epoch:
    state, step = checkpoints.restore_latest(interim, state)
    resume_at = step - start_epoch * steps_per_epoch
  metrics_path = workdir / "metrics.jsonl"
  history = [json.loads(line) for line in metrics_path.read_text().splitlines()] \
      if metrics_path.exists() else []
  history = [row for row in history if row["epoch"] < start_epoch]
  if jax.process_index() == 0:
    _write_metrics(metrics_path, history)

  events = events_lib.EventWriter(workdir, "train")
  batches = _step_batches(config, dataset, steps_per_epoch)
  last_step = config.train.epochs * steps_per_epoch
  first_step = min(start_epoch * steps_per_epoch + resume_at, last_step)
  with checkpoints.StopRequest(sync_hosts=True) as stop, pipeline.train_stream(
      batches, first_step, last_step, config.input) as stream:
    for epoch in range(start_epoch, config.train.epochs):
      state = _train_one_epoch(config, state, dataset, stream, sharder, epoch, steps_per_epoch,
                               resume_at, history, metrics_path, stop, interim)
      resume_at = 0
      checkpoints.save(manager, epoch + 1, state)
      events.scalars(epoch + 1, history[-1])
      if config.train.insta:
        events.histogram(epoch + 1, "sigma_table", state.sigma_table)
  events.close()
  if config.train.insta and jax.process_index() == 0:
    sigma_table.plot(state.sigma_table, dataset.train.labels, workdir)
  if config.estimator.epochs:
    state = estimator.train_estimator(config, workdir, dataset, state, sharder)
  if config.estimator.finetune_epochs:
    state = _finetune_at_estimator_sigma(config, workdir, dataset, state, sharder, manager,
                                         steps_per_epoch, history, metrics_path)
  return state


def _step_batches(config, dataset, steps_per_epoch) -> pipeline.StepBatches:
  return pipeline.StepBatches(dataset.train, config.train.batch_size, steps_per_epoch,
                              config.seed, config.train.augment, config.image_size,
                              jax.process_index(), jax.process_count())


def _finetune_at_estimator_sigma(config, workdir, dataset, state, sharder, manager,
                                 steps_per_epoch, history, metrics_path) -> TrainState:
  """DualRS's last step (estimator.py, step 4): `estimator.finetune_epochs` more epochs of the
  base model with a fresh cosine schedule from `estimator.finetune_learning_rate`, each
  example at the σ the estimator assigns it (kept in the σ table). Its checkpoints continue
  the numbering (train.epochs + k); a rerun resumes at the last finished epoch."""
  e = config.estimator
  first, total = config.train.epochs, config.train.epochs + e.finetune_epochs
  done = max(manager.latest_step() or 0, first)
  if done >= total:
    return state
  t = config.train.copy_and_resolve_references()
  with t.unlocked():
    t.learning_rate, t.warmup_epochs, t.schedule = e.finetune_learning_rate, 0.0, "cosine"
  tx = model_state.optimizer(t, steps_per_epoch, e.finetune_epochs)
  if done == first:
    sigmas = estimator.assigned_sigmas(workdir, dataset.train, config)
    state = state.replace(tx=tx, opt_state=sharder.replicate(tx.init(state.params)),
                          sigma_table=sharder.replicate(jnp.asarray(sigmas)))
  else:  # the checkpoint holds the assigned table and the fine-tuning optimizer's state
    state = state.replace(tx=tx)
  batches = _step_batches(config, dataset, steps_per_epoch)
  with pipeline.train_stream(batches, done * steps_per_epoch, total * steps_per_epoch,
                             config.input) as stream:
    for epoch in range(done, total):
      state = _train_one_epoch(config, state, dataset, stream, sharder, epoch, steps_per_epoch,
                               0, history, metrics_path)
      checkpoints.save(manager, epoch + 1, state)
  return state


def _train_one_epoch(config, state, dataset, stream, sharder, epoch, steps_per_epoch, resume_at,
                     history, metrics_path, stop=None, interim=None):
  """The table update due before `epoch` (unless resuming inside it), the epoch, its
  evaluation and its metrics row."""
  update_seconds = 0.0
  if sigma_table.update_due(config, epoch) and not resume_at:
    began = time.perf_counter()
    state = sigma_table.update_before_epoch(state, dataset.train, sharder, config, epoch)
    jax.block_until_ready(state.sigma_table)
    update_seconds = time.perf_counter() - began
  start = time.perf_counter()
  state, row = train_epoch(state, stream, sharder, config, epoch, steps_per_epoch,
                           dataset.num_classes, resume_at, stop, interim)
  train_seconds = time.perf_counter() - start
  row.update({"table_update_seconds": update_seconds,
              "table_update_share_of_epoch": update_seconds / train_seconds})
  row.update(sigma_table.quantiles(state.sigma_table))
  if config.train.insta or row["stage"] == FINETUNE_STAGE:
    row.update(sigma_table.grid_shares(state.sigma_table, config.train.table.grid))
  row.update(evaluate(state, dataset.test, sharder, config, config.train.sigma))
  row["seconds"] = time.perf_counter() - start
  history.append(row)
  if jax.process_index() == 0:
    _write_metrics(metrics_path, history)
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()))
  return state


def train_epoch(state, stream, sharder, config, epoch, steps_per_epoch, num_classes,
                resume_at=0, stop=None, interim=None):
  """One epoch of `train_step` over the next batches of `stream` (pipeline.train_stream), from
  batch `resume_at` of the epoch on; returns the state and its metrics (over the batches run
  here; `input_wait_share`: the share of the epoch's time spent waiting for a batch).

  After every step: the divergence watch; an interim checkpoint every
  `train.checkpoint_every_steps` steps; and, when `stop` says so (SIGTERM, SIGINT), an
  interim checkpoint of the state after this step and `checkpoints.Interrupted`."""
  t = config.train
  stage = FINETUNE_STAGE if epoch >= t.epochs else 2 if t.insta and epoch >= t.stage1_epochs else 1
  # Cohen: always train.sigma; stage 1: all, stage 2: a share `explore`, at a random grid σ.
  explore = {1: 1.0 if t.stage1_noise == "grid" else 0.0, 2: t.table.explore}.get(stage, 0.0)
  grid = tuple(float(s) for s in t.table.grid) if t.insta and explore > 0 else None
  epoch_key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                                    PURPOSE_TRAIN_NOISE), epoch)
  step = lambda s, b: train_step(s, b, epoch_key, grid, float(explore))
  first_step = epoch * steps_per_epoch + resume_at
  watch = DivergenceWatch(t.divergence, num_classes, first_step, steps_per_epoch)

  def after_step(state, metrics, i):
    watch(metrics)
    done = first_step + i + 1
    stopping = stop is not None and stop.due(done)
    if stopping or (t.checkpoint_every_steps and done % t.checkpoint_every_steps == 0):
      checkpoints.save(interim, done, state)
    if stopping:
      raise checkpoints.Interrupted(
          f"stopped at step {done} (epoch {epoch + 1}, batch {resume_at + i + 1} of "
          f"{steps_per_epoch}): saved in {interim.directory}; rerun the same command to resume")

  start = time.perf_counter()
  waited = pipeline.WaitClock()
  batches = waited(itertools.islice(stream, steps_per_epoch - resume_at))
  state, means = model_state.run_epoch(state, step, batches, sharder, steps_per_epoch - resume_at,
                                       f"epoch {epoch + 1}/{t.epochs}", after_step)
  watch.check_nonfinite(f" (epoch {epoch + 1})")
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - start
  row = {"epoch": epoch, "step": int(state.step), "stage": stage, "sigma": t.sigma,
         "train_loss": means.get("loss", float("nan")),
         "train_noisy_accuracy": means.get("noisy_accuracy", float("nan")),
         "images_per_s": (steps_per_epoch - resume_at) * t.batch_size / seconds,
         "input_wait_share": waited.seconds / seconds}
  if resume_at:
    row["resumed_at_batch"] = resume_at  # the means above cover the batches after it
  return state, row
