"""Training the base classifier: Gaussian augmentation (Cohen et al.) and Insta-RS Train.

Every example is trained at the noise level in its entry of the per-example σ table carried
in the train state. With Gaussian augmentation every entry stays at `train.sigma`. Insta-RS
Train (`train.insta`) runs two stages: epochs [0, stage1_epochs) are Gaussian augmentation
at `train.sigma`; from then on, before every `table.update_every`-th epoch, each example's σ
moves to whichever of σ(1 − η), σ, σ(1 + η) scores best on the test-time search's objective
for its true label (`update_sigma_table`), clamped to [table.sigma_min, table.sigma_max].

The noise and the augmentation of example i in epoch e depend only on (seed, e, i), and the
table update of epoch e only on (seed, e, i) and the state: a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.

Training is data parallel: each global batch is sharded over a 1-D `data` mesh of all
devices and jit inserts the gradient and BatchNorm-statistics reductions.
"""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from instars_jax import checkpoints, data, models, parallel, search, smoothing

PURPOSE_TRAIN_NOISE = 10
PURPOSE_EVAL_NOISE = 11
PURPOSE_TABLE_UPDATE = 12


class TrainState(train_state.TrainState):
  batch_stats: Any
  sigma_table: jax.Array  # float32[num_train]: the noise level of each training example


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The step or cosine schedule, after a linear warm-up over `train.warmup_epochs`.

  Large σ needs a gentle start: at σ = 1 the first full-rate SGD steps on very noisy inputs
  blow up (loss 5.6 in epoch 1), and the network then sits at chance for every later epoch.
  A warm-up or a gradient-norm clip (`train.grad_clip`) avoids that."""
  t = config.train
  warmup = int(t.warmup_epochs * steps_per_epoch)
  if t.schedule == "step":
    boundaries = {int(e * steps_per_epoch): t.lr_decay_factor for e in t.lr_decay_epochs}
    main = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(t.learning_rate, max(1, t.epochs * steps_per_epoch - warmup))
  else:
    raise ValueError(f"train.schedule must be 'step' or 'cosine'; got {t.schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(t.learning_rate / warmup, t.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def create_train_state(config, image_shape, num_classes, stats, num_train,
                       steps_per_epoch) -> TrainState:
  model = models.create_model(config.model.name, num_classes, config.model.dtype, stats)
  variables = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1,) + tuple(image_shape)))
  clip = optax.clip_by_global_norm(config.train.grad_clip) if config.train.grad_clip > 0 \
      else optax.identity()
  tx = optax.chain(clip, optax.add_decayed_weights(config.train.weight_decay),
                   optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                             momentum=config.train.momentum))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", {}),
                           sigma_table=jnp.full((num_train,), config.train.sigma, jnp.float32))


def logits_fn(state: TrainState):
  """x -> logits of the base classifier with running BatchNorm statistics (certification)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return functools.partial(state.apply_fn, variables, train=False)


def crop_flip(key, image):
  """Random 4-pixel-padded crop and horizontal flip (Cohen et al.'s CIFAR augmentation)."""
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(image, ((4, 4), (4, 4), (0, 0)))
  offset = jax.random.randint(crop_key, (2,), 0, 9)
  image = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), image.shape)
  return jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)


def example_keys(key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def gaussian_noise(keys, images, sigma):
  """x_i + σ_i ε_i with ε_i drawn from key_i."""
  eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
  return images + sigma.reshape((-1,) + (1,) * (images.ndim - 1)) * eps


@functools.partial(jax.jit, static_argnames="augment", donate_argnames="state")
def train_step(state: TrainState, batch, epoch_key, augment: bool):
  """One SGD step on cross-entropy of the noisy batch, each example at its table σ."""
  keys = example_keys(epoch_key, batch["index"])
  images = batch["image"]
  if augment:
    images = jax.vmap(crop_flip)(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), images)
  noisy = gaussian_noise(keys, images, state.sigma_table[batch["index"]])

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, noisy,
                                     train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return state, {"loss": loss, "noisy_accuracy": accuracy}


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


@functools.partial(jax.jit, static_argnames=("samples", "chunk", "num_classes"),
                   donate_argnames="state")
def update_sigma_table_step(state: TrainState, batch, key, factors, eta, sigma_min, sigma_max, *,
                            samples, chunk, num_classes) -> TrainState:
  """Moves the σ of each example in `batch` to the best of σ(1 − η), σ, σ(1 + η).

  Each candidate is scored by search.objective for the example's true label on the same
  `samples` noise vectors (common random numbers). An example whose score at its current σ
  is not positive (the smoothed classifier would not certify its label there) moves down.
  """
  sigma = state.sigma_table[batch["index"]]
  candidates = jnp.stack([sigma * (1 - eta), sigma, sigma * (1 + eta)])
  score = functools.partial(search.objective, batch["image"], ids=batch["index"], key=key,
                            factors=factors, apply_fn=logits_fn(state), samples=samples,
                            chunk=chunk, num_classes=num_classes, labels=batch["label"])
  radius = score(candidates)  # [3, b], all three on the same noise
  best = jnp.take_along_axis(candidates, jnp.argmax(radius, axis=0)[None], axis=0)[0]
  new_sigma = jnp.clip(jnp.where(radius[1] <= 0, candidates[0], best), sigma_min, sigma_max)
  return state.replace(sigma_table=state.sigma_table.at[batch["index"]].set(new_sigma))


def table_update_due(config, epoch: int) -> bool:
  """Whether the σ table is updated before training `epoch` (stage 2, every k-th epoch)."""
  t = config.train
  return t.insta and epoch >= t.stage1_epochs and (epoch - t.stage1_epochs) % t.table.update_every == 0


def table_update_indices(num_examples: int, fraction: float, update_number: int,
                         seed: int) -> np.ndarray:
  """The training examples one table update visits: all of them (fraction 1), or the
  update_number-th slice of a fixed permutation, so that every example is visited once in
  every ceil(1 / fraction) updates."""
  if fraction >= 1.0:
    return np.arange(num_examples)
  size = math.ceil(fraction * num_examples)
  permutation = np.random.default_rng([seed, PURPOSE_TABLE_UPDATE]).permutation(num_examples)
  return np.take(permutation, np.arange(update_number * size, (update_number + 1) * size),
                 mode="wrap")


def update_sigma_table(state, split, sharder, config, epoch, num_classes) -> TrainState:
  """One pass of `update_sigma_table_step` over the training split (or the `table.fraction`
  of it due at this update), in chunks."""
  table = config.train.table
  update_number = (epoch - config.train.stage1_epochs) // table.update_every
  order = table_update_indices(len(split), table.fraction, update_number, config.seed)
  factors = search.radius_factors(table.samples, config.certify.n, config.certify.alpha,
                                  table.estimate_alpha)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed),
                                              PURPOSE_TABLE_UPDATE), epoch)
  per_host = table.chunk // jax.process_count()
  chunk = smoothing.samples_per_pass(table.batch, table.chunk // jax.device_count(), table.samples)
  for batch in data.batches(split, table.chunk, host_id=jax.process_index(),
                            host_count=jax.process_count(), order=order):
    # The last chunk is padded with copies of its first example: same index, same new σ.
    batch = {k: parallel.pad_rows(v, per_host) for k, v in batch.items()}
    state = update_sigma_table_step(state, sharder.batch(batch), key, factors, table.eta,
                                    table.sigma_min, table.sigma_max, samples=table.samples,
                                    chunk=chunk, num_classes=num_classes)
  return state


def sigma_quantiles(sigma_table) -> dict:
  values = np.asarray(sigma_table)
  qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
  return {f"sigma_q{int(q * 100):02d}": float(v) for q, v in zip(qs, np.quantile(values, qs))} | \
      {"sigma_mean": float(values.mean())}


def plot_sigma_table(sigma_table, labels, workdir: Path) -> None:
  """Histograms of the σ table, overall and by class, as PNGs in workdir."""
  from instars_jax import analyze

  values = np.asarray(sigma_table)
  fig, ax = analyze.new_figure()
  ax.hist(values, bins=50)
  ax.set_xlabel("σ of a training example")
  ax.set_ylabel("examples")
  analyze.save_figure(fig, ax, workdir / "sigma_table.png")

  classes = np.unique(labels)
  fig, ax = analyze.new_figure(max(6.0, 0.6 * len(classes)))
  ax.boxplot([values[labels == c] for c in classes], tick_labels=[str(c) for c in classes])
  ax.set_xlabel("class")
  ax.set_ylabel("σ of a training example")
  analyze.save_figure(fig, ax, workdir / "sigma_by_class.png")


class Sharder:
  """Puts host-local batches onto the data mesh as global arrays (one host or many)."""

  def __init__(self):
    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), (parallel.DATA_AXIS,))
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(parallel.DATA_AXIS))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def local_devices(self) -> int:
    return jax.local_device_count()

  def batch(self, local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


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
  if t.insta:
    table = t.table
    checks += [
        (0 <= t.stage1_epochs <= t.epochs,
         f"train.stage1_epochs must lie in [0, train.epochs={t.epochs}]; got {t.stage1_epochs}"),
        (0 < table.eta < 1, f"train.table.eta must lie in (0, 1); got {table.eta}"),
        (table.samples >= 1, f"train.table.samples must be >= 1; got {table.samples}"),
        (0 < table.sigma_min <= t.sigma <= table.sigma_max,
         f"train.table.sigma_min <= train.sigma <= train.table.sigma_max must hold with "
         f"sigma_min > 0; got {table.sigma_min}, {t.sigma}, {table.sigma_max}"),
        (table.update_every >= 1, f"train.table.update_every must be >= 1; got {table.update_every}"),
        (0 < table.estimate_alpha < 1,
         f"train.table.estimate_alpha must lie in (0, 1); got {table.estimate_alpha}"),
        (table.chunk >= 1 and table.chunk % devices == 0,
         f"train.table.chunk must be a positive multiple of the device count {devices}; "
         f"got {table.chunk}"),
        (table.batch >= 1, f"train.table.batch must be >= 1; got {table.batch}"),
        (0 < table.fraction <= 1, f"train.table.fraction must lie in (0, 1]; got {table.fraction}"),
    ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


def _check_workdir(workdir: Path, config) -> None:
  """Refuses to resume a run whose saved config differs in anything but the certify section."""
  saved_path = workdir / checkpoints.CONFIG_FILE
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  current = json.loads(config.to_json())
  differing = sorted(k for k in set(saved) | set(current)
                     if k != "certify" and saved.get(k) != current.get(k))
  if differing:
    raise ValueError(f"{workdir} holds a run with a different config ({', '.join(differing)}): "
                     "rerun with the same config to resume, or choose a new --workdir")


def _write_metrics(path: Path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train_and_evaluate(config, workdir) -> TrainState:
  """Trains per `config`, saving a checkpoint after every epoch to `workdir`; rerunning the
  same command resumes from the latest checkpoint."""
  workdir = Path(workdir)
  sharder = Sharder()
  validate_config(config, jax.device_count())
  dataset = data.load_dataset(config.dataset, data_dir=config.data_dir,
                              cache_dir=config.cache_dir, num_classes=config.num_classes)
  _check_workdir(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)

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

  state = sharder.replicate(create_train_state(config, dataset.image_shape, dataset.num_classes,
                                               dataset.stats, len(dataset.train), steps_per_epoch))
  manager = checkpoints.manager(workdir)
  state, start_epoch = checkpoints.restore_latest(manager, state)
  metrics_path = workdir / "metrics.jsonl"
  history = [json.loads(line) for line in metrics_path.read_text().splitlines()] \
      if metrics_path.exists() else []
  history = [row for row in history if row["epoch"] < start_epoch]
  if jax.process_index() == 0:
    _write_metrics(metrics_path, history)

  augment = config.train.augment == "crop_flip"
  noise_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), PURPOSE_TRAIN_NOISE)
  for epoch in range(start_epoch, config.train.epochs):
    update_seconds = 0.0
    if table_update_due(config, epoch):
      began = time.perf_counter()
      state = update_sigma_table(state, dataset.train, sharder, config, epoch, dataset.num_classes)
      jax.block_until_ready(state.sigma_table)
      update_seconds = time.perf_counter() - began
    start = time.perf_counter()
    epoch_key = jax.random.fold_in(noise_key, epoch)
    sums = {"loss": 0.0, "noisy_accuracy": 0.0}
    batches = data.batches(dataset.train, config.train.batch_size, seed=config.seed, epoch=epoch,
                           shuffle=True, drop_remainder=True, host_id=jax.process_index(),
                           host_count=jax.process_count())
    for batch in tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.train.epochs}",
                      leave=False, disable=None if jax.process_index() == 0 else True):
      state, step_metrics = train_step(state, sharder.batch(batch), epoch_key, augment)
      for k in sums:
        sums[k] += step_metrics[k]
    train_seconds = time.perf_counter() - start
    row = {"epoch": epoch, "step": int(state.step),
           "train_loss": float(sums["loss"]) / steps_per_epoch,
           "train_noisy_accuracy": float(sums["noisy_accuracy"]) / steps_per_epoch,
           "images_per_s": steps_per_epoch * config.train.batch_size / train_seconds,
           "stage": 2 if config.train.insta and epoch >= config.train.stage1_epochs else 1,
           "sigma": config.train.sigma, "table_update_seconds": update_seconds,
           "table_update_share_of_epoch": update_seconds / train_seconds}
    row.update(sigma_quantiles(state.sigma_table))
    row.update(evaluate(state, dataset.test, sharder, config, config.train.sigma))
    row["seconds"] = time.perf_counter() - start
    history.append(row)
    if jax.process_index() == 0:
      _write_metrics(metrics_path, history)
      tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in row.items()))
    checkpoints.save(manager, epoch + 1, state)
  if config.train.insta and jax.process_index() == 0:
    plot_sigma_table(state.sigma_table, dataset.train.labels, workdir)
  return state
