"""The σ-estimator of the sound instance-wise certificate, after Dual Randomized Smoothing
(Sun, Mao & Vechev, ICLR 2026), and its training stage.

A classifier over the K noise levels of `train.table.grid`, smoothed at σ_e (default: the top
of the grid) and certified by CERTIFY like any base classifier
(instars_jax/certificates/). It learns from the trained base model:

1. Labels. Each training example's radius profile R_k at every grid σ (`sigma_table.update`
   with `estimator.label_samples` noise vectors, on the final base model) becomes the soft
   label softmax(R_k / τ), R clipped at 0; examples whose R is 0 at every σ are dropped (no
   σ certifies them, so they say nothing about which σ is best).
2. Loss. Soft-label cross-entropy on two noisy copies at σ_e, plus λ times the consistency
   regularizer of Jeong & Shin (NeurIPS 2020): the KL divergence of each copy's prediction
   from the copies' mean, which makes the smoothed estimator confident, so its certified
   radius is rarely the smaller of the two.
3. Weights. Each example weighs 1 / (frequency of its label's top bin), normalised to mean 1,
   so that rare σ bins are learnt too.

Works for Insta-RS and Cohen base models alike. Saved in WORKDIR/estimator/ (orbax, one
checkpoint per epoch, resumable) with `estimator.json`, the settings certification reads, and
`labels.npz`, the labels of step 1.

4. Optionally (`estimator.finetune_epochs`, DualRS's last step) the base model is fine-tuned
   with each training example at the σ the trained estimator picks for it (`assigned_sigmas`:
   the majority bin over `label_samples` noisy copies at σ_e), so that the base model is
   trained where the certificate will use it (stages.FinetuneStage, after this stage).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data, models
from instars_jax.run import checkpoints
from instars_jax.run.files import write_json_atomic
from instars_jax.run.workdir import Workdir
from instars_jax.smoothing.streams import Stream, numpy_rng
from instars_jax.train import sigma_table
from instars_jax.train import state as state_lib

SETTINGS_FILE = "estimator.json"
LABELS_FILE = "labels.npz"


def soft_labels(radii, temperature: float):
  """(labels float32[N, K], keep bool[N]): softmax(max(R, 0) / τ) per example, and whether
  any R is positive (the examples the estimator trains on)."""
  radii = np.maximum(np.asarray(radii, np.float64), 0.0)
  logits = radii / temperature
  labels = np.exp(logits - logits.max(axis=1, keepdims=True))
  labels /= labels.sum(axis=1, keepdims=True)
  return labels.astype(np.float32), radii.max(axis=1) > 0


def bin_weights(labels) -> np.ndarray:
  """float32[N]: 1 / frequency of each example's top bin, normalised to mean 1."""
  top = np.argmax(labels, axis=1)
  counts = np.bincount(top, minlength=labels.shape[1]).astype(np.float64)
  weights = 1.0 / counts[top]
  return (weights / weights.mean()).astype(np.float32)


def smoothing_sigma(config) -> float:
  return float(config.estimator.sigma or max(config.train.table.grid))


def settings(config) -> dict:
  """What the estimator depends on; certification reads the grid and σ_e from here."""
  e = config.estimator
  return {"grid": [float(s) for s in config.train.table.grid], "sigma": smoothing_sigma(config),
          "model": e.model or config.model.name, "dtype": config.model.dtype,
          "epochs": e.epochs, "label_samples": e.label_samples, "temperature": e.temperature,
          "consistency": e.consistency, "learning_rate": e.learning_rate, "seed": config.seed}


def saved_settings(workdir) -> dict:
  """The settings of the finished estimator in `workdir`; FileNotFoundError saying what to run
  when there is none or it stopped early."""
  workdir = Workdir(workdir)
  directory = workdir.estimator_dir
  settings_path = directory / SETTINGS_FILE
  manager = workdir.estimator_checkpoints() if settings_path.exists() else None
  if manager is None or manager.latest_step() is None:
    raise FileNotFoundError(f"no σ-estimator in {directory}: train one with train.py (same "
                            "--config and --workdir) and --config.estimator.epochs=N")
  saved = json.loads(settings_path.read_text())
  if manager.latest_step() != saved["epochs"]:
    raise FileNotFoundError(f"the σ-estimator in {directory} stopped after epoch "
                            f"{manager.latest_step()} of {saved['epochs']}: rerun train.py to "
                            "finish it")
  return saved


def validate(config) -> list:
  e = config.estimator
  return [
      (e.epochs >= 0, f"estimator.epochs must be >= 0; got {e.epochs}"),
      (e.sigma >= 0, f"estimator.sigma must be > 0 (or 0: the top of the grid); got {e.sigma}"),
      (e.label_samples >= 1, f"estimator.label_samples must be >= 1; got {e.label_samples}"),
      (e.temperature > 0, f"estimator.temperature must be > 0; got {e.temperature}"),
      (e.consistency >= 0, f"estimator.consistency must be >= 0; got {e.consistency}"),
      (e.learning_rate > 0, f"estimator.learning_rate must be > 0; got {e.learning_rate}"),
      (e.finetune_epochs >= 0, f"estimator.finetune_epochs must be >= 0; got {e.finetune_epochs}"),
      (e.finetune_learning_rate > 0,
       f"estimator.finetune_learning_rate must be > 0; got {e.finetune_learning_rate}"),
      ((e.model or config.model.name) in models.ARCHITECTURES,
       f"estimator.model must be one of {models.ARCHITECTURES}; got {e.model!r}"),
  ]


@functools.partial(jax.jit, static_argnames=("sigma", "consistency"), donate_argnames="state")
def train_step(state: state_lib.ModelState, batch, epoch_key, *, sigma, consistency):
  """One SGD step: weighted soft-label cross-entropy on two noisy copies at σ_e plus
  λ · mean KL(p̄ ‖ p_copy). `batch["label"]` holds weight × soft label."""
  keys = state_lib.example_keys(epoch_key, batch["index"])
  copies = [state_lib.gaussian_noise(jax.vmap(lambda k: jax.random.fold_in(k, c))(keys),
                                       batch["image"], jnp.full(keys.shape[:1], sigma))
            for c in range(2)]
  target = batch["label"]

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     jnp.concatenate(copies), train=True, mutable=["batch_stats"])
    log_p = jax.nn.log_softmax(logits).reshape((2, -1) + logits.shape[1:])
    cross_entropy = -jnp.sum(target * log_p.mean(axis=0), axis=-1)
    log_mean = jnp.log(jnp.exp(log_p).mean(axis=0) + 1e-12)
    kl = jnp.sum(jnp.exp(log_mean) * (log_mean - log_p), axis=-1).mean(axis=0)
    loss = jnp.mean(cross_entropy + consistency * kl)
    return loss, (log_p, updates)

  (loss, (log_p, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  agreement = jnp.mean(jnp.argmax(log_p[0], -1) == jnp.argmax(target, -1))
  return state, {"loss": loss, "agreement": agreement}


def _template(config, image_shape, stats, steps_per_epoch) -> state_lib.ModelState:
  s = settings(config)
  model, params, batch_stats = state_lib.init_model(s["model"], s["dtype"], len(s["grid"]),
                                                    stats, image_shape, config.seed + 1)
  t = config.train.copy_and_resolve_references()
  with t.unlocked():
    t.learning_rate, t.warmup_epochs, t.schedule = s["learning_rate"], 0.0, "cosine"
  return state_lib.ModelState.create(
      apply_fn=model.apply, params=params, batch_stats=batch_stats,
      tx=state_lib.optimizer(t, steps_per_epoch, s["epochs"]))


def labels_from_base(config, dataset, base_state, sharder):
  """(labels × weights float32[N, K], kept indices) from a profile pass of the base model over
  the training split (on a copy of its state: the base model's own table is left as is)."""
  order = np.arange(len(dataset.train))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.ESTIMATOR_LABELS)
  visit = sigma_table.Visit(order, key, config.estimator.label_samples)
  profiled = sigma_table.update(jax.tree_util.tree_map(jnp.copy, base_state), dataset.train,
                                sharder, config, visit)
  labels, keep = soft_labels(np.asarray(profiled.sigma_profile), config.estimator.temperature)
  kept = np.flatnonzero(keep)
  weighted = np.zeros_like(labels)
  if len(kept):
    weighted[kept] = labels[kept] * bin_weights(labels[kept])[:, None]
  return weighted, kept


def cached_labels(directory, config, dataset, base_state, sharder):
  """labels_from_base, saved to DIR/labels.npz (atomically) and read back by a rerun with the
  same label settings, so a resumed or re-tuned estimator stage skips the label pass."""
  path = directory / LABELS_FILE
  label_settings = json.dumps({k: settings(config)[k] for k in ("label_samples", "temperature",
                                                                 "grid", "seed")} |
                              {"n": config.certify.n, "alpha": config.certify.alpha},
                              sort_keys=True)
  if path.exists():
    with np.load(path) as saved:
      if str(saved["settings"]) == label_settings:
        return saved["labels"], saved["kept"]
  labels, kept = labels_from_base(config, dataset, base_state, sharder)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{LABELS_FILE}.tmp.npz"
    np.savez(tmp, labels=labels, kept=kept, settings=label_settings)
    tmp.replace(path)
  return labels, kept


class EstimatorStage:
  """The estimator's training stage (train/stages.py's interface): labels from the base
  model, then `estimator.epochs` epochs over the kept examples in an order drawn per epoch,
  checkpointed after each in WORKDIR/estimator/. Leaves the base model as it is."""
  name = "estimator"
  watch_chance = False  # its soft-label loss has no chance level to stop at
  events_part = "estimator"
  metrics_file = False
  histogram = False

  def __init__(self, context):
    self.context = context
    self.settings = settings(context.config)
    self.sigma = self.settings["sigma"]
    self.directory = context.workdir.estimator_dir
    self.checkpoints = context.workdir.estimator_checkpoints()
    self.interim = context.workdir.estimator_interim()
    self.batch_size, self.num_classes = context.config.train.batch_size, len(self.settings["grid"])
    self.steps_per_epoch, self.last_step = 1, 0  # known once the labels are

  def start(self, base_state):
    settings_path = self.directory / SETTINGS_FILE
    done = self.checkpoints.latest_step()
    if done is not None and json.loads(settings_path.read_text()) != self.settings:
      raise ValueError(f"{self.directory} holds an estimator trained with other settings: "
                       "remove it, or rerun with the same estimator settings")
    if done == self.settings["epochs"]:
      return None, 0
    c = self.context
    labels, self.kept = cached_labels(self.directory, c.config, c.dataset, base_state, c.sharder)
    self.steps_per_epoch = len(self.kept) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"only {len(self.kept)} training examples have a positive radius at some "
                       f"grid σ: too few for the estimator's batch of {self.batch_size}")
    self.last_step = self.settings["epochs"] * self.steps_per_epoch
    self.split = data.Split(c.dataset.train.images, labels)
    template = c.sharder.replicate(_template(c.config, c.dataset.image_shape, c.dataset.stats,
                                             self.steps_per_epoch))
    state, epoch = checkpoints.restore_latest(self.checkpoints, template)
    step = epoch * self.steps_per_epoch
    if (self.interim.latest_step() or 0) > step:
      state, step = checkpoints.restore_latest(self.interim, state)
    if jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      write_json_atomic(settings_path, self.settings)
    return state, step

  def stream(self, first_step: int):
    """The batches of steps [first_step, last_step): each epoch the kept examples in the
    order of its (seed, epoch) permutation, each host its slice."""
    seed, first_epoch = self.context.config.seed, first_step // self.steps_per_epoch

    def batches():
      for epoch in range(first_epoch, self.settings["epochs"]):
        rng = numpy_rng(seed, Stream.ESTIMATOR_NOISE, epoch)
        order = self.kept[rng.permutation(len(self.kept))]
        yield from data.batches(self.split, self.batch_size, drop_remainder=True,
                                host_id=jax.process_index(), host_count=jax.process_count(),
                                order=order)

    skip = first_step - first_epoch * self.steps_per_epoch
    return contextlib.nullcontext(itertools.islice(batches(), skip, None))

  def label(self, epoch: int) -> str:
    return self.name

  def describe(self, epoch: int) -> str:
    return f"estimator epoch {epoch + 1}/{self.settings['epochs']}"

  def begin_epoch(self, state, epoch: int):
    return state

  def step(self, state, batch, epoch: int):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.context.config.seed),
                                                Stream.ESTIMATOR_NOISE), epoch)
    return train_step(state, self.context.sharder.batch(batch), key, sigma=self.sigma,
                      consistency=self.context.config.estimator.consistency)

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    return row | {"examples": len(self.kept)}

  def finish(self, state, base_state):
    return base_state


def load(workdir):
  """(x -> logits over the grid bins, settings) of the finished estimator in `workdir`."""
  workdir = Workdir(workdir)
  saved = saved_settings(workdir)
  manager = workdir.estimator_checkpoints()
  restored = checkpoints.restore_as_saved(manager, manager.latest_step())
  model = models.create_model(saved["model"], len(saved["grid"]), saved["dtype"],
                              workdir.read_run().stats)
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
  return state_lib.bind_variables(model.apply, variables), saved


def assigned_sigmas(workdir, split: data.Split, config) -> np.ndarray:
  """float32[N]: for each example of `split`, the grid σ of the estimator's majority bin over
  `estimator.label_samples` copies at σ_e (noise keyed on (seed, example, copy); ties go to
  the smaller σ). Every host computes all of them, on its first local device."""
  apply, saved = load(workdir)
  grid, copies = np.asarray(saved["grid"], np.float32), config.estimator.label_samples
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.ESTIMATOR_ASSIGN)

  @jax.jit
  def votes(images, indices):
    keys = state_lib.example_keys(key, indices)
    def copy_votes(c):
      noisy = state_lib.gaussian_noise(jax.vmap(lambda k: jax.random.fold_in(k, c))(keys),
                                         images, jnp.full(indices.shape, saved["sigma"]))
      return jax.nn.one_hot(jnp.argmax(apply(noisy), -1), len(grid))
    return jax.lax.map(copy_votes, jnp.arange(copies)).sum(axis=0)

  counts = [votes(b["image"], b["index"]) for b in data.batches(split, config.train.table.chunk)]
  return grid[np.argmax(np.concatenate([np.asarray(c) for c in counts]), axis=1)]
