"""The train state of a classifier (base model or σ-estimator) and what every stage shares:
building it, loading the latest one of a run, its x → logits function, placing batches on
the device mesh, and per-example Gaussian noise."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from instars_jax import checkpoints, models, parallel


class ModelState(train_state.TrainState):
  batch_stats: Any


class TrainState(ModelState):
  """The base classifier's state with Insta-RS Train's per-example σ table."""
  sigma_table: jax.Array  # float32[num_train]: the σ each training example trains at
  sigma_profile: jax.Array  # float32[num_train, K]: estimated radius at each grid σ


def learning_rate_schedule(t, steps_per_epoch: int, epochs: int) -> optax.Schedule:
  """`t.schedule` (step or cosine) over `epochs`, after a linear warm-up of `t.warmup_epochs`.

  Large σ needs a gentle start: at σ = 1 the first full-rate SGD steps on very noisy inputs
  blow up (loss 5.6 in epoch 1), and the network then sits at chance for every later epoch.
  A warm-up or a gradient-norm clip (`grad_clip`) avoids that."""
  warmup = int(t.warmup_epochs * steps_per_epoch)
  if t.schedule == "step":
    boundaries = {int(e * steps_per_epoch): t.lr_decay_factor for e in t.lr_decay_epochs}
    main = optax.piecewise_constant_schedule(t.learning_rate, boundaries)
  elif t.schedule == "cosine":
    main = optax.cosine_decay_schedule(t.learning_rate, max(1, epochs * steps_per_epoch - warmup))
  else:
    raise ValueError(f"train.schedule must be 'step' or 'cosine'; got {t.schedule!r}")
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(t.learning_rate / warmup, t.learning_rate, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def optimizer(t, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
  """SGD with momentum, weight decay and an optional global-norm clip (`t` = config.train)."""
  clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  return optax.chain(clip, optax.add_decayed_weights(t.weight_decay),
                     optax.sgd(learning_rate_schedule(t, steps_per_epoch, epochs),
                               momentum=t.momentum))


def init_model(name, dtype, num_classes, stats, image_shape, seed):
  model = models.create_model(name, num_classes, dtype, stats)
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + tuple(image_shape)))
  return model, variables["params"], variables.get("batch_stats", {})


def create_train_state(config, image_shape, num_classes, stats, num_train,
                       steps_per_epoch) -> TrainState:
  model, params, batch_stats = init_model(config.model.name, config.model.dtype, num_classes,
                                          stats, image_shape, config.seed)
  grid = len(config.train.table.grid)
  return TrainState.create(apply_fn=model.apply, params=params,
                           tx=optimizer(config.train, steps_per_epoch, config.train.epochs),
                           batch_stats=batch_stats,
                           sigma_table=jnp.full((num_train,), config.train.sigma, jnp.float32),
                           sigma_profile=jnp.zeros((num_train, grid), jnp.float32))


def logits_fn(state: ModelState):
  """x -> logits with running BatchNorm statistics (certification)."""
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return functools.partial(state.apply_fn, variables, train=False)


def example_keys(key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def gaussian_noise(keys, images, sigma):
  """x_i + σ_i ε_i with ε_i drawn from key_i."""
  eps = jax.vmap(lambda k: jax.random.normal(k, images.shape[1:]))(keys)
  return images + sigma.reshape((-1,) + (1,) * (images.ndim - 1)) * eps


def run_epoch(state, step, batches, sharder, steps: int, desc: str, after_step=None):
  """(state, mean of each metric): `step(state, batch) -> (state, metrics)` over `batches`,
  each put on the mesh, with a progress bar on process 0. `after_step(state, metrics, i)`, if
  given, runs after the i-th step (0-based; it may raise to stop the epoch)."""
  sums, done = {}, 0
  for i, batch in enumerate(tqdm(batches, total=steps, desc=desc, leave=False,
                                 disable=None if jax.process_index() == 0 else True)):
    state, metrics = step(state, sharder.batch(batch))
    if after_step is not None:
      after_step(state, metrics, i)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v
    done += 1
  return state, {k: float(v) / done for k, v in sums.items()}


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


def read_config(workdir) -> ml_collections.ConfigDict:
  path = Path(workdir) / checkpoints.CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"no training run in {workdir}: {checkpoints.CONFIG_FILE} is missing "
                            "(train first with train.py --workdir)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_train_state(workdir) -> TrainState:
  """The latest train state of the run in `workdir` (σ table included), for notebooks.

  `state.apply_fn` is the model's apply; `model_state.logits_fn(state)` gives x -> logits.
  """
  config = read_config(workdir)
  if "grid" not in config.train.get("table", {}):
    raise ValueError(f"{workdir} was trained by an older instars_jax whose σ table had no grid "
                     "profile: train it again with this version")
  run = json.loads((Path(workdir) / checkpoints.RUN_FILE).read_text())
  template = create_train_state(config, tuple(run["image_shape"]), run["num_classes"],
                                run["stats"], run["num_train"], run["steps_per_epoch"])
  manager = checkpoints.manager(workdir)
  if manager.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
  state, _ = checkpoints.restore_latest(manager, template)
  return state
