"""The training stage of a σ-estimator or router node (the model of selection/estimator.py), in
the loop of loop.py, after the base model, which it leaves as it is (Insta-RS and Cohen base
models alike):

1. Labels. Each training example's radius profile R_k at every grid σ (`sigma_table.update`
   with `train.estimator.label_samples` noise vectors on the final base model, computed once and
   kept in WORKDIR/estimator/profile.npz; the pass is kept chunk by chunk on the way,
   ProfileParts) becomes the soft label softmax(R_k / τ), R clipped
   at 0; examples whose R is 0 at every σ are dropped (no σ certifies them, so they say
   nothing about which σ is best). Router node k's labels are over (max_{j<k} R_j, R_k).
2. Loss. `train.estimator.loss`, a module of train/losses/ that takes soft targets, by default
   the consistency loss (Jeong & Shin, NeurIPS 2020) with λ = 10, m = 2: soft-label
   cross-entropy on two noisy copies at σ_e plus λ times the KL divergence of each copy's
   prediction from the copies' mean, which makes the smoothed estimator confident, so its
   certified radius is rarely the smaller of the two.
3. Weights. Each example weighs 1 / (frequency of its label's top bin), normalised to mean 1,
   so that rare σ bins are learnt too.
4. `train.estimator.epochs` epochs over the examples kept, checkpointed after each.

Options (DualRS's, `configs/default.py`): `train.estimator.init` = base starts each estimator from
the base model's weights with a new head; `train.estimator.consistency.eta` (η) adds η·H(p̄) of the
copies' mean prediction; `train.estimator.radius_weight` (w_r) weighs each example by its best
radius to the power w_r; `train.estimator.balance_bins` = False drops the 1/frequency weights;
`train.estimator.gain_weight` weighs each example by its radius gain, its best bin's radius minus
the next bin's (what choosing wrong there costs), so that examples where the choice hardly
matters teach little (with balance_bins: gain-weighted, bin-balanced).

The profile is the base model's at every grid σ, or with `train.estimator.experts` (one fixed-σ
run per grid σ, selection/experts.py) expert k's at σ_k: the labels then come from the
classifiers that certification deploys with the same `certify.experts`. With a held-out
share (train.holdout), each epoch's metrics row also scores the estimator there, on labels
computed the same way from the held-out examples: `heldout_agreement` (its majority bin over
`label_samples` noisy copies against the label's top bin, on the examples with a positive
radius somewhere), and `heldout_radius`, the mean profile radius at the bins it picks (0 where
none is positive), beside `heldout_radius_oracle` (the best bin's) and
`heldout_radius_default` (the top bin's: the largest σ, a node's "stay"). The radius is the
profile's estimate of what each choice certifies, without the selector's own cap: a curve
to stop training by, not a certificate."""

from __future__ import annotations

import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data, models, plugins
from instars_jax.selection import estimator, experts
from instars_jax.storage import checkpoints, events
from instars_jax.storage.files import write_json_atomic, write_npz_atomic
from instars_jax.storage.parts import Parts
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing.streams import Stream, numpy_rng
from instars_jax.train import actions, losses, sigma_table, steps
from instars_jax.train import state as state_lib
from instars_jax.train.interface import resume, stage_manager

ORDER = 1
SECTION = "estimator"
OFF = {"epochs": 0, "experts": ""}  # adds no stage and names no expert
INITS = ("scratch", "base")
# The σ-estimator of the sound instance-wise certificate (selection/estimator.py), trained after
# the base model in the same train.py run; 0 epochs: none. Its loss's settings are the
# section train.estimator.<loss>, which configs/default.py adds from the loss modules.
DEFAULTS = {
    "epochs": 0,
    "model": "",  # architecture; "": model.name
    "sigma": 0.0,  # its smoothing noise σ_e; 0: the top of train.table.grid
    "label_samples": 16,  # noise vectors per example for its labels' radius profile
    "temperature": 0.1,  # soft labels softmax(R_k / temperature)
    # The loss the estimators train with on their soft labels (a module of train/losses/
    # that takes soft targets: consistency | gaussian | stability | node_margin, the last for
    # router nodes: a radius hinge at the chain's τ). Consistency (Jeong & Shin
    # 2020) with λ = 10, m = 2 makes the smoothed estimator confident, so its radius is
    # rarely the smaller of the two; train.estimator.consistency.eta is DualRS's entropy term η·H(p̄).
    "loss": "consistency",
    # Lower than a base model's: at σ_e = 1 and lr 0.05 the LeNet estimator collapsed to one
    # bin on Fashion-MNIST (holdout agreement with its labels 0.63 = the majority share).
    "learning_rate": 0.01,
    # init: scratch | base (every layer but the head from the base model, which already sees
    # through every grid σ). DualRS's loss options (besides train.estimator.consistency.eta):
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
    # Each router node's own smoothing σ as a multiple of the σ_k it decides at (1.0: σ_k).
    # Above 1 its radius σ_node |Φ⁻¹(q) − Φ⁻¹(τ)| grows with σ_node while its accuracy falls.
    "node_sigma_factor": 1.0,
    # σ experts whose radius profiles label the estimators: one fixed-σ workdir per
    # train.table.grid σ, smallest first, commas between (selection/experts.py), the ones
    # certify.experts will name. Empty: the base model at every σ.
    "experts": "",
}
# The estimators' settings of their loss (train.estimator.<loss>: the loss's DEFAULTS without
# a preset, and these): the consistency λ = 10 without the entropy term, on the whole batch,
# as the estimator was tuned (docs/results.md).
LOSS_DEFAULTS = {"consistency": {"lbd": 10.0, "eta": 0.0, "batching": "whole"}}
# Its section may change on resume (a finished run can get an estimator later): each estimator
# checks the settings its checkpoints were made with (estimator.json; `estimator_settings`).
CHECKS_OWN_RESUME = True
PROFILE_FILE = "profile.npz"


def loss_defaults(name: str) -> dict:
  """train.estimator.<loss> as configs/default.py builds it."""
  return plugins.stage_loss_section(__name__.rpartition(".")[2], name)


def stages(context) -> list:
  """One stage per σ-estimator `context.config` asks for (train.estimator.epochs > 0): the one over
  the grid, or the router's nodes."""
  if not context.config.train.estimator.epochs:
    return []
  if experts.RUN_DIR not in context.config.train.estimator.experts:
    labelling_experts(context)  # experts of other runs: refused before any training
  return [EstimatorStage(context, chooser) for chooser in choosers(context.config, context.workdir)]


def labelling_experts(context) -> list:
  """train.estimator.experts checked (experts.check), once the stages before have run (an
  experts stage may have trained them)."""
  return experts.check(context.config, context.workdir, estimator.grid_of(context.config),
                       on_holdout=context.dataset.holdout is not None,
                       setting=experts.LABELS_SETTING)


def choosers(config, workdir: Workdir) -> list:
  """The estimators `config` asks for: one over the grid, or with train.estimator.router the router
  nodes from the top of the grid down."""
  grid = estimator.grid_of(config)
  if not config.train.estimator.router:
    return [estimator.Estimator(grid, smoothing_sigma(config), directory=workdir.estimator_dir)]
  factor = config.train.estimator.node_sigma_factor
  return [estimator.router_node(workdir, grid, k, factor) for k in range(len(grid) - 1, 0, -1)]


def smoothing_sigma(config) -> float:
  return float(config.train.estimator.sigma or max(config.train.table.grid))


def estimator_settings(config, chooser: estimator.Estimator) -> dict:
  """What an estimator depends on; certification reads the grid and σ_e from here."""
  e = config.train.estimator
  return {"grid": list(chooser.grid), "sigma": chooser.sigma, "node": chooser.node,
          "model": e.model or config.model.name, "dtype": config.model.dtype,
          "epochs": e.epochs, "label_samples": e.label_samples, "temperature": e.temperature,
          "loss": e.loss, "loss_settings": e[losses.section_name(e.loss)].to_dict(), "learning_rate": e.learning_rate,
          "init": e.init, "radius_weight": e.radius_weight, "balance_bins": e.balance_bins,
          "gain_weight": e.gain_weight, "experts": e.experts, "seed": config.seed}


def with_earlier_loss_keys(saved: dict) -> dict:
  """Saved estimator settings whose loss section predates some of its keys, with what they
  trained with (losses.EARLIER)."""
  section = loss_defaults(saved["loss"])
  earlier = {k: v for k, v in losses.EARLIER.items() if k in section}
  return saved | {"loss_settings": earlier | saved["loss_settings"]}


def validate(config) -> None:
  """ValueError naming a bad setting of the σ-estimators (train.estimator), their loss's
  included; none is checked while train.estimator.epochs is 0 (no estimator trains)."""
  e = config.train.estimator
  if e.epochs < 0:
    raise ValueError(f"train.estimator.epochs must be >= 0; got {e.epochs}")
  if not e.epochs:
    return
  checks = [
      (e.sigma >= 0, f"train.estimator.sigma must be > 0 (or 0: the top of the grid); got {e.sigma}"),
      (np.isfinite(e.node_sigma_factor) and e.node_sigma_factor > 0,
       f"train.estimator.node_sigma_factor must be finite and > 0; got {e.node_sigma_factor}"),
      (e.router or e.node_sigma_factor == 1.0,
       "train.estimator.node_sigma_factor sets the router nodes' σ: it needs "
       "train.estimator.router=True (the estimator over the grid takes train.estimator.sigma)"),
      (e.label_samples >= 1, f"train.estimator.label_samples must be >= 1; got {e.label_samples}"),
      (e.temperature > 0, f"train.estimator.temperature must be > 0; got {e.temperature}"),
      (e.radius_weight >= 0, f"train.estimator.radius_weight must be >= 0; got {e.radius_weight}"),
      (e.learning_rate > 0, f"train.estimator.learning_rate must be > 0; got {e.learning_rate}"),
      (e.init in INITS, f"train.estimator.init must be one of {INITS}; got {e.init!r}"),
      (e.init == "scratch" or e.model in ("", config.model.name),
       "train.estimator.init=base needs the base model's architecture; got "
       f"train.estimator.model={e.model!r}"),
      ((e.model or config.model.name) in models.ARCHITECTURES,
       f"train.estimator.model must be one of {models.ARCHITECTURES}; got {e.model!r}"),
  ] + losses.validate(e, "train.estimator", None, config.train.batch_size, loss_defaults,
                      soft_targets=True)
  plugins.raise_first_failure(checks + sigma_table.validate(config, jax.device_count()))


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


def training_labels(radii, chooser: estimator.Estimator, e):
  """(weight × soft label float32[N, bins], kept indices) for `chooser` from the profile
  [N, K] over the grid, with the estimator settings `e` (temperature, balance_bins,
  radius_weight, gain_weight); each weight factor is normalised to mean 1."""
  binned = chooser.bins(np.asarray(radii))
  labels, keep = soft_labels(binned, e.temperature)
  kept = np.flatnonzero(keep)
  weights = np.ones(len(kept), np.float32)
  if len(kept) and e.balance_bins:
    weights *= bin_weights(labels[kept])
  if len(kept) and e.radius_weight:
    best = np.maximum(binned[kept].max(axis=1), 0.0) ** e.radius_weight
    weights *= (best / best.mean()).astype(np.float32)
  if len(kept) and e.gain_weight:
    top_two = -np.sort(-np.maximum(binned[kept], 0.0), axis=1)[:, :2]
    gain = top_two[:, 0] - top_two[:, 1]
    weights *= (gain / max(gain.mean(), np.finfo(np.float32).tiny)).astype(np.float32)
  weighted = np.zeros_like(labels)
  weighted[kept] = labels[kept] * weights[:, None]
  return weighted, kept


def labels_visit(config, size: int, stream: Stream = Stream.ESTIMATOR_LABELS):
  """The label profile's pass over `size` examples: all of them, `train.estimator.label_samples`
  noise vectors each."""
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), stream)
  return sigma_table.Visit(np.arange(size), key, config.train.estimator.label_samples)


def profile_from_base(config, dataset, base_state, sharder, parts) -> np.ndarray:
  """float32[N, K]: the base model's radius profile of every training example over the grid,
  with `train.estimator.label_samples` noise vectors, one chunk of `train.table.chunk` at a
  time on all devices (sigma_table.update on a copy of its state: the base model's own table
  is left as is), each chunk kept in `parts` (ProfileParts) and the pass going on from them."""
  visit = labels_visit(config, len(dataset.train))
  done, keep = parts.column(Stream.ESTIMATOR_LABELS.name)
  rows = [np.zeros((0, len(estimator.grid_of(config))), np.float32) if done is None else done]

  def after_chunk(state, indices):
    rows.append(np.asarray(state.sigma_profile[jnp.asarray(indices)]))
    keep(rows[-1])

  sigma_table.update(jax.tree_util.tree_map(jnp.copy, base_state), dataset.train, sharder,
                     config, visit._replace(order=visit.order[len(rows[0]):]), after_chunk)
  return np.concatenate(rows)


def profile_from_experts(config, split, fns: dict, stream: Stream, parts=None) -> np.ndarray:
  """float32[N, K]: column k the radius profile of expert k (`fns`, experts.load's {σ: fn})
  at its σ_k, for every example of `split`, on the same noise vectors at every σ; kept
  chunk by chunk in `parts` (ProfileParts) where given."""
  visit, columns = labels_visit(config, len(split), stream), []
  for s in estimator.grid_of(config):
    done, after_chunk = parts.column(f"{stream.name}_sigma_{s:g}") if parts else (None, None)
    columns.append(sigma_table.profile_of(fns[np.float32(s)], split, config, visit, (s,),
                                          done, after_chunk))
  return np.concatenate(columns, axis=1)


class ProfileParts(Parts):
  """The labels' profile pass in parts (storage/parts.py, WORKDIR/estimator/profile_parts/):
  one part per chunk of a column (a split at one expert's σ, or at the whole grid for the base
  model), under the pass's settings, and the run's stop checked after each. A rerun with the
  same settings goes on from the rows kept (each example's noise depends on its index alone,
  so the function that began a column gives the same rows on), so a SIGTERM inside the pass
  stops it within a chunk and a kill -9 loses at most one; removed once profile.npz is
  written."""

  def __init__(self, context, settings: str):
    super().__init__(context.workdir.estimator_dir / "profile_parts", settings,
                     writer=jax.process_index() == 0)
    self.check_stop, columns = context.check_stop, {}
    for part in self.load():
      columns.setdefault(str(part["column"]), []).append(part["rows"])
    self.kept = {name: np.concatenate(rows) for name, rows in columns.items()}

  def column(self, name: str):
    """(the rows kept of column `name` or None, the callback that keeps each next chunk)."""
    return self.kept.get(name), functools.partial(self.keep, name)

  def keep(self, name: str, rows) -> None:
    self.append(column=np.asarray(name), rows=rows)
    self.check_stop("the rest of the labels' profile pass (it goes on from the rows kept)")


def heldout_profile(config, dataset, base_state, fns: dict, parts) -> np.ndarray:
  """float32[H, K]: the held-out examples' profile, from the classifiers of the training
  labels (the experts' `fns`, or with none the base model at every grid σ), kept in `parts`."""
  if fns:
    return profile_from_experts(config, dataset.holdout, fns, Stream.ESTIMATOR_HOLDOUT, parts)
  visit = labels_visit(config, len(dataset.holdout), Stream.ESTIMATOR_HOLDOUT)
  return sigma_table.profile_of(state_lib.logits_fn(base_state), dataset.holdout, config, visit,
                                estimator.grid_of(config),
                                *parts.column(Stream.ESTIMATOR_HOLDOUT.name))


def cached_profile(context, base_state, checked: list) -> dict:
  """{"train": [N, K], "holdout": [H, K]} label profiles (profile_from_base, or
  profile_from_experts of the `checked` experts; no holdout: [0, K]), saved (atomically) and
  read back by a rerun with the same settings, so a resumed or re-tuned estimator, and every
  router node, skip the profile pass."""
  c = context
  path = c.workdir.estimator_dir / PROFILE_FILE
  settings = {"label_samples": c.config.train.estimator.label_samples, "seed": c.config.seed,
              "grid": list(estimator.grid_of(c.config)), "n": c.config.train.table.n,
              "alpha": c.config.train.table.alpha}
  if checked:  # a profile of the base model keeps the key it had before experts existed
    settings["experts"] = checked
  key = json.dumps(settings, sort_keys=True)
  parts = ProfileParts(c, key)
  if path.exists():
    with np.load(path) as saved:
      if str(saved["settings"]) == key and "holdout" in saved:
        parts.remove()  # left by a kill between profile.npz and their removal
        return {"train": saved["profile"], "holdout": saved["holdout"]}
  fns = experts.load(checked)  # once, for both splits
  profile = (profile_from_experts(c.config, c.dataset.train, fns, Stream.ESTIMATOR_LABELS, parts)
             if fns else profile_from_base(c.config, c.dataset, base_state, c.sharder, parts))
  holdout = (heldout_profile(c.config, c.dataset, base_state, fns, parts)
             if c.dataset.holdout is not None else np.zeros((0, profile.shape[1]), np.float32))
  if jax.process_index() == 0:
    write_npz_atomic(path, profile=profile, holdout=holdout, settings=key)
  parts.remove()
  return {"train": profile, "holdout": holdout}


def from_base(template: state_lib.ModelState, base_state) -> state_lib.ModelState:
  """`template` with every layer but its head (the last Dense) from the base model: the base
  model already sees through every grid σ (train.estimator.init = base)."""
  host = lambda tree: jax.tree_util.tree_map(
      lambda a: np.asarray(a.addressable_data(0) if isinstance(a, jax.Array) else a), tree)
  params, base = dict(host(template.params)), host(base_state.params)
  head = max((k for k in params if k.startswith("Dense_")), key=lambda k: int(k.split("_")[1]))
  params.update({k: v for k, v in base.items() if k != head})
  return template.replace(params=params, batch_stats=host(base_state.batch_stats))


@functools.partial(jax.jit, static_argnames=("sigma", "loss"), donate_argnames="state")
def train_step(state: state_lib.ModelState, batch, epoch_key, epoch=0, *, sigma, loss):
  """One SGD step of `loss` (train.estimator.loss: consistency by default, the losses/ module the
  base model can train with too) at σ_e on `batch["label"]`, weight × soft label; its
  "agreement" is the share of noisy copies whose top bin is the label's."""
  keys = state_lib.example_keys(epoch_key, batch["index"])
  state, metrics = steps.loss_step(state, batch["image"], batch["label"],
                                   jnp.full(keys.shape[:1], sigma, jnp.float32), keys, loss,
                                   epoch)
  metrics["agreement"] = metrics.pop("noisy_accuracy")
  return state, metrics


class EstimatorStage:
  """A σ-estimator's or router node's training stage (train/interface.py's `Stage`)."""

  def __init__(self, context, chooser: estimator.Estimator):
    self.context, self.chooser = context, chooser
    self.settings = estimator_settings(context.config, chooser)
    self.loss = losses.from_config(context.config.train.estimator, chooser.sigma)
    self.name, self.sigma = chooser.name, chooser.sigma
    self.directory = chooser.directory
    self.batch_size, self.num_classes = context.config.train.batch_size, chooser.num_bins
    self.steps_per_epoch, self.first_step, self.last_step = 1, 0, 0  # known once the labels are

  def start(self, base_state, offset: int):
    settings_path = self.directory / estimator.SETTINGS_FILE
    self.checkpoints = checkpoints.manager(self.directory)
    if self.checkpoints.latest_step() is not None:
      saved = json.loads(settings_path.read_text())
      if with_earlier_loss_keys(estimator.LATER_SETTINGS | estimator.upgrade(saved)) != \
          self.settings:
        raise ValueError(f"{self.directory} holds an estimator trained with other settings: "
                         "remove it, or rerun with the same estimator settings")
      finished = estimator.finished_steps(self.checkpoints, saved)
      if finished is not None:
        self.last_step = finished
        return None, finished
    c = self.context
    profile = cached_profile(c, base_state, labelling_experts(c))
    labels, self.kept = training_labels(profile["train"], self.chooser, c.config.train.estimator)
    self.heldout = self.chooser.bins(profile["holdout"])
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

  def actions(self, offset: int) -> list:
    """Its soft-label loss has no chance level to stop at; rows are printed, not kept in
    metrics.jsonl; TensorBoard's directory is the estimator's or the node's."""
    c, node = self.context, self.chooser.node
    part = "estimator" if node is None else f"router_node_{node}"
    return [actions.DivergenceWatch(c.config.train.divergence, self.num_classes,
                                    self.steps_per_epoch, chance=False),
            actions.MetricsLog(prefix=f"{self.name} "),
            actions.Checkpoints(self, offset, c.stop),
            actions.TensorBoard(events.EventWriter(c.workdir, part))]

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
        tx=state_lib.optimizer(t, self.steps_per_epoch * self.loss.updates_per_step,
                               s["epochs"]))

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

  def row_labels(self, epoch: int) -> dict:
    return {"stage": self.name, "sigma": self.sigma}

  def describe(self, epoch: int) -> str:
    return f"{self.name} epoch {epoch + 1}/{self.settings['epochs']}"

  def begin_epoch(self, state, epoch: int):
    return state

  def step(self, state, batch, epoch: int):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.context.config.seed),
                                                Stream.ESTIMATOR_NOISE), epoch)
    return train_step(state, self.context.sharder.batch(batch), key, epoch, sigma=self.sigma,
                      loss=self.loss)

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    row = row | {"examples": len(self.kept)}
    if len(self.heldout):
      row |= self.heldout_scores(state)
    return row

  def heldout_scores(self, state) -> dict:
    """The estimator's agreement with the held-out labels and the profile radius of its
    choices there (the module docstring)."""
    c, radii = self.context, np.maximum(self.heldout, 0.0)
    scored = np.flatnonzero(radii.max(axis=1) > 0)
    key = jax.random.fold_in(jax.random.PRNGKey(c.config.seed), Stream.ESTIMATOR_HOLDOUT_VOTES)
    picked = estimator.majority_bins(state_lib.logits_fn(state), self.sigma, self.num_classes,
                                     c.dataset.holdout, scored, key, c.config)
    chosen = radii[scored, picked]
    return {"heldout_agreement": float(np.mean(picked == np.argmax(radii[scored], axis=1))),
            "heldout_radius": float(chosen.sum() / len(radii)),
            "heldout_radius_oracle": float(radii.max(axis=1).mean()),
            "heldout_radius_default": float(radii[:, -1].mean())}

  def finish(self, state, base_state):
    return base_state
