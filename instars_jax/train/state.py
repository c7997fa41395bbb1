"""The train state of a classifier (base model or σ-estimator) and what every stage shares:
building it, loading the latest one of a run, its x → logits function, and per-example
Gaussian noise."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from instars_jax import models
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import TrainingFacts, Workdir
from instars_jax.train import losses


class ModelState(train_state.TrainState):
  batch_stats: Any


class TrainState(ModelState):
  """The base classifier's state with Insta-RS Train's per-example σ table."""
  sigma_table: jax.Array  # float32[num_train]: the σ each training example trains at
  sigma_profile: jax.Array  # float32[num_train, K]: estimated radius at each grid σ


def learning_rate_schedule(t, updates_per_epoch: int, epochs: int) -> optax.Schedule:
  """`t.schedule` (step or cosine) over `epochs` of `updates_per_epoch` SGD updates, after a
  linear warm-up of `t.warmup_epochs`.

  Large σ needs a gentle start: at σ = 1 the first full-rate SGD steps on very noisy inputs
  blow up (loss 5.6 in epoch 1), and the network then sits at chance for every later epoch.
  A warm-up or a gradient-norm clip (`grad_clip`) avoids that."""
  warmup = int(t.warmup_epochs * updates_per_epoch)
  if t.schedule == "step":
    boundaries = {int(e * updates_per_epoch): t.lr_decay_factor for e in t.lr_decay_epochs}
    main = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(t.learning_rate, max(1, epochs * updates_per_epoch - warmup))
  else:
    raise ValueError(f"train.schedule must be 'step' or 'cosine'; got {t.schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(t.learning_rate / warmup, t.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def optimizer(t, updates_per_epoch: int, epochs: int) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and an optional global-norm clip (`t` = config.train),
  its schedule counting SGD updates: a training step's loss makes loss.updates_per_step of
  them (losses/: m with the references' batching), so an epoch makes steps per epoch × that."""
  clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  return optax.chain(clip, optax.add_decayed_weights(t.weight_decay),
                     optax.sgd(learning_rate_schedule(t, updates_per_epoch, epochs),
                               momentum=t.momentum))


def init_model(name, dtype, num_classes, stats, image_shape, seed):
  model = models.create_model(name, num_classes, dtype, stats)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(image_shape)))
  return model, variables["params"], variables.get("batch_stats", {})


def create_train_state(config, facts: TrainingFacts) -> TrainState:
  """A fresh base model for `config` with the shapes in `facts`; every σ-table entry at
  train.sigma."""
  model, params, batch_stats = init_model(config.model.name, config.model.dtype,
                                          facts.num_classes, facts.stats, facts.image_shape,
                                          config.seed)
  grid = len(config.train.table.grid)
  # SGD updates per training step: m with the references' batching (a config saved before the
  # losses existed trained Gaussian augmentation: one).
  updates = (losses.from_config(config.train, config.train.sigma).updates_per_step
             if "loss" in config.train else 1)
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=optimizer(config.train, facts.steps_per_epoch * updates,
                                        config.train.epochs),
                           batch_stats=batch_stats,
                           sigma_table=jnp.full((facts.num_train,), config.train.sigma, jnp.float32),
                           sigma_profile=jnp.zeros((facts.num_train, grid), jnp.float32))


def logits_fn(state: ModelState) -> jax.tree_util.Partial:
  """x -> logits with running BatchNorm statistics (certification). A jax.tree_util.Partial:
  the sampler passes the weights to its compiled programs as arguments, not as constants."""
  return models.bind_variables(state.apply_fn, {"params": state.params,
                                         "batch_stats": state.batch_stats})


def example_keys(key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def gaussian_noise(keys, images, sigma):
  """x_i + σ_i ε_i with ε_i drawn from key_i."""
  eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
  return images + sigma.reshape((-1,) + (1,) * (images.ndim - 1)) * eps


def load_train_state(workdir, step: int | None = None) -> TrainState:
  """The train state of the run in `workdir` at checkpoint `step` (None: the latest), σ table
  included; for notebooks too.

  `state.apply_fn` is the model's apply; `ij.logits_fn(state)` gives x -> logits.
  """
  workdir = Workdir(workdir)
  config = workdir.read_config()
  if "grid" not in config.train.get("table", {}):
    raise ValueError(f"{workdir.path} was trained by an older instars_jax whose σ table had no "
                     "grid profile: train it again with this version")
  template = create_train_state(config, workdir.read_facts())
  if step is None:
    return checkpoints.restore_latest(workdir.checkpoints(), template)
  return checkpoints.restore(workdir.checkpoints(), step, template)
