"""The training stage of a σ-estimator or router node (estimator.py), in the loop of loop.py:
the base model's radius profile of every training example (computed once, kept in
WORKDIR/estimator/profile.npz), soft labels from it, then `estimator.epochs` epochs over the
examples with a positive radius somewhere, checkpointed after each. Leaves the base model as
it is."""

from __future__ import annotations

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data
from instars_jax.storage import checkpoints
from instars_jax.storage.files import write_json_atomic
from instars_jax.smoothing.streams import Stream, numpy_rng
from instars_jax.train import estimator, losses, sigma_table
from instars_jax.train import state as state_lib
from instars_jax.train.interface import resume, stage_manager

ORDER = 1
SECTION = "estimator"
# The σ-estimator of the sound instance-wise certificate (train/estimator.py), trained after
# the base model in the same train.py run; 0 epochs: none. Its loss's settings are the
# section estimator.<loss>, which configs/default.py adds from the loss modules.
DEFAULTS = {
    "epochs": 0,
    "model": "",  # architecture; "": model.name
    "sigma": 0.0,  # its smoothing noise σ_e; 0: the top of train.table.grid
    "label_samples": 16,  # noise vectors per example for its labels' radius profile
    "temperature": 0.1,  # soft labels softmax(R_k / temperature)
    # The loss the estimators train with on their soft labels (a module of train/losses/
    # that takes soft targets: consistency | gaussian | stability). Consistency (Jeong & Shin
    # 2020) with λ = 10, m = 2 makes the smoothed estimator confident, so its radius is
    # rarely the smaller of the two; estimator.consistency.eta is DualRS's entropy term η·H(p̄).
    "loss": "consistency",
    # Lower than a base model's: at σ_e = 1 and lr 0.05 the LeNet estimator collapsed to one
    # bin on Fashion-MNIST (holdout agreement with its labels 0.63 = the majority share).
    "learning_rate": 0.01,
    # init: scratch | base (every layer but the head from the base model, which already sees
    # through every grid σ). DualRS's loss options (besides estimator.consistency.eta):
    # radius_weight w_r (examples weigh their best radius to the power w_r), balance_bins
    # (1 / frequency-of-top-bin weights; DualRS has none when ACR is the goal). init = base
    # without them measured best in ACR on Fashion-MNIST (docs/results.md: 1.190 against
    # 1.083 from scratch with them, r = 0 0.770 against 0.810).
    "init": "base",
    "radius_weight": 0.0,
    "balance_bins": False,
    "gain_weight": False,  # weigh examples by their radius gain
    # router: instead of one estimator over the grid, a router tree of binary nodes, node k
    # deciding grid σ_k against the lower ones, smoothed at σ_k (the `router` certificate).
    "router": False,
}
PROFILE_FILE = "profile.npz"


def stages(context) -> list:
  """One stage per σ-estimator `context.config` asks for (estimator.epochs > 0): the one over
  the grid, or the router's nodes."""
  if not context.config.estimator.epochs:
    return []
  return [EstimatorStage(context, chooser)
          for chooser in estimator.choosers(context.config, context.workdir)]


def profile_from_base(config, dataset, base_state, sharder) -> np.ndarray:
  """float32[N, K]: the base model's radius profile of every training example over the grid,
  with `estimator.label_samples` noise vectors (on a copy of its state: the base model's own
  table is left as is)."""
  order = np.arange(len(dataset.train))
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.ESTIMATOR_LABELS)
  visit = sigma_table.Visit(order, key, config.estimator.label_samples)
  profiled = sigma_table.update(jax.tree_util.tree_map(jnp.copy, base_state), dataset.train,
                                sharder, config, visit)
  return np.asarray(profiled.sigma_profile)


def cached_profile(context, base_state) -> np.ndarray:
  """profile_from_base, saved (atomically) and read back by a rerun with the same settings, so
  a resumed or re-tuned estimator, and every router node, skip the profile pass."""
  c = context
  path = c.workdir.estimator_dir / PROFILE_FILE
  key = json.dumps({"label_samples": c.config.estimator.label_samples, "seed": c.config.seed,
                    "grid": list(estimator.grid_of(c.config)), "n": c.config.train.table.n,
                    "alpha": c.config.train.table.alpha}, sort_keys=True)
  if path.exists():
    with np.load(path) as saved:
      if str(saved["settings"]) == key:
        return saved["profile"]
  profile = profile_from_base(c.config, c.dataset, base_state, c.sharder)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PROFILE_FILE}.tmp.npz")
    np.savez(tmp, profile=profile, settings=key)
    tmp.replace(path)
  return profile


def from_base(template: state_lib.ModelState, base_state) -> state_lib.ModelState:
  """`template` with every layer but its head (the last Dense) from the base model: the base
  model already sees through every grid σ (estimator.init = base)."""
  host = lambda tree: jax.tree_util.tree_map(
      lambda a: np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a), tree)
  params, base = dict(host(template.params)), host(base_state.params)
  head = max((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
  params.update({k: v for k, v in base.items() if k != head})
  return template.replace(params=params, batch_stats=host(base_state.batch_stats))


class EstimatorStage:
  """A σ-estimator's or router node's training stage (train/interface.py's `Stage`)."""
  watch_chance = False  # its soft-label loss has no chance level to stop at
  metrics_file = False
  histogram = False

  def __init__(self, context, chooser: estimator.Estimator):
    self.context, self.chooser = context, chooser
    self.settings = estimator.settings(context.config, chooser)
    self.loss = losses.from_config(context.config.estimator)
    self.name, self.sigma = chooser.name, chooser.sigma
    self.events_part = "estimator" if chooser.node is None else f"router_node_{chooser.node}"
    self.directory = chooser.directory
    self.batch_size, self.num_classes = context.config.train.batch_size, chooser.num_bins
    self.steps_per_epoch, self.first_step, self.last_step = 1, 0, 0  # known once the labels are

  def start(self, base_state, offset: int):
    settings_path = self.directory / estimator.SETTINGS_FILE
    self.checkpoints = checkpoints.manager(self.directory)
    if self.checkpoints.latest_step() is not None:
      saved = json.loads(settings_path.read_text())
      if estimator.LATER_SETTINGS | estimator.upgrade(saved) != self.settings:
        raise ValueError(f"{self.directory} holds an estimator trained with other settings: "
                         "remove it, or rerun with the same estimator settings")
      finished = estimator.finished_steps(self.checkpoints, saved)
      if finished is not None:
        self.last_step = finished
        return None, finished
    c = self.context
    labels, self.kept = estimator.training_labels(cached_profile(c, base_state), self.chooser,
                                                  c.config.estimator)
    self.steps_per_epoch = len(self.kept) // self.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"only {len(self.kept)} training examples have a positive radius at some "
                       f"grid σ: too few for the {self.name}'s batch of {self.batch_size}")
    self.last_step = self.settings["epochs"] * self.steps_per_epoch
    self.split = data.Split(c.dataset.train.images, labels)
    self.checkpoints = stage_manager(self, self.directory, offset)
    template = self.template()
    if self.settings["init"] == "base":
      template = from_base(template, base_state)
    state, step = resume(self, c.sharder.replicate(template), offset)
    if jax.process_index() == 0:
      self.directory.mkdir(parents=True, exist_ok=True)
      write_json_atomic(settings_path, self.settings)
    return state, step

  def template(self) -> state_lib.ModelState:
    c, s = self.context, self.settings
    model, params, batch_stats = state_lib.init_model(
        s["model"], s["dtype"], self.num_classes, c.dataset.stats, c.dataset.image_shape,
        c.config.seed + 1)
    t = c.config.train.copy_and_resolve_references()
    with t.unlocked():
      t.learning_rate, t.warmup_epochs, t.schedule = s["learning_rate"], 0.0, "cosine"
    return state_lib.ModelState.create(
        apply_fn=model.apply, params=params, batch_stats=batch_stats,
        tx=state_lib.optimizer(t, self.steps_per_epoch, s["epochs"]))

  def stream(self, first_step: int):
    """The batches of steps [first_step, last_step): each epoch the kept examples in the
    order of its (seed, epoch) permutation, each host its slice."""
    seed, first_epoch = self.context.config.seed, first_step // self.steps_per_epoch
    steps = []
    for epoch in range(first_epoch, self.settings["epochs"]):
      order = self.kept[numpy_rng(seed, Stream.ESTIMATOR_NOISE, epoch).permutation(len(self.kept))]
      steps += data.batch_indices(order, self.batch_size, drop_remainder=True,
                                  host_id=jax.process_index(), host_count=jax.process_count())
    skip = first_step - first_epoch * self.steps_per_epoch
    return contextlib.nullcontext(data.take(self.split, steps[skip:], self.context.config.input))

  def label(self, epoch: int) -> str:
    return self.name

  def describe(self, epoch: int) -> str:
    return f"{self.name} epoch {epoch + 1}/{self.settings['epochs']}"

  def begin_epoch(self, state, epoch: int):
    return state

  def step(self, state, batch, epoch: int):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.context.config.seed),
                                                Stream.ESTIMATOR_NOISE), epoch)
    return estimator.train_step(state, self.context.sharder.batch(batch), key, epoch,
                                sigma=self.sigma, loss=self.loss)

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    return row | {"examples": len(self.kept)}

  def finish(self, state, base_state):
    return base_state
