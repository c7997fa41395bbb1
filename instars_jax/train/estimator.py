"""The σ-estimator of the sound instance-wise certificate, after Dual Randomized Smoothing
(Sun, Mao & Vechev, ICLR 2026), and its training stage.

A classifier over the K noise levels of `train.table.grid`, smoothed at σ_e (default: the top
of the grid) and certified by CERTIFY like any base classifier
(instars_jax/certificates/). It learns from the trained base model:

1. Labels. Each training example's radius profile R_k at every grid σ (`sigma_table.update`
   with `estimator.label_samples` noise vectors, on the final base model, or with
   `estimator.experts` on expert k at σ_k: train/stages/sigma_estimators.py) becomes the
   soft label softmax(R_k / τ), R clipped at 0; examples whose R is 0 at every σ are dropped
   (no σ certifies them, so they say nothing about which σ is best).
2. Loss. `estimator.loss`, a module of train/losses/ that takes soft targets, by default
   the consistency loss (Jeong & Shin, NeurIPS 2020) with λ = 10, m = 2: soft-label
   cross-entropy on two noisy copies at σ_e plus λ times the KL divergence of each copy's
   prediction from the copies' mean, which makes the smoothed estimator confident, so its
   certified radius is rarely the smaller of the two.
3. Weights. Each example weighs 1 / (frequency of its label's top bin), normalised to mean 1,
   so that rare σ bins are learnt too.

Works for Insta-RS and Cohen base models alike. Saved in WORKDIR/estimator/ (orbax, one
checkpoint per epoch, resumable) with `estimator.json`, the settings certification reads; the
profile of step 1 is kept in WORKDIR/estimator/profile.npz.

With `estimator.router`, the same recipe trains a router tree instead (the `router`
certificate): for the grid σ_1 < … < σ_K, node k (k = K … 2) decides "σ_k" against "a lower
σ", smoothed at σ_k, from soft labels over (max_{j<k} R_j, R_k); saved in WORKDIR/router/
node_k/. Options (DualRS's, `configs/default.py`): `estimator.init` = base starts each
estimator from the base model's weights with a new head; `estimator.consistency.eta` (η)
adds η·H(p̄) of the copies' mean prediction; `estimator.radius_weight` (w_r) weighs each
example by its best radius to the power w_r; `estimator.balance_bins` = False drops the
1/frequency weights; `estimator.gain_weight` weighs each example by its radius gain, its best
bin's radius minus the next bin's (what choosing wrong there costs), so that examples where
the choice hardly matters teach little (with balance_bins: gain-weighted, bin-balanced).

4. Optionally (`estimator.finetune_epochs`, DualRS's last step) the base model is fine-tuned
   with each training example at the σ the trained estimator picks for it (`assigned_sigmas`:
   the majority bin over `label_samples` noisy copies at σ_e), so that the base model is
   trained where the certificate will use it (train/stages/finetune.py, after this stage).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data, models
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import Workdir
from instars_jax.smoothing.streams import Stream
from instars_jax.train import losses, steps
from instars_jax.train import state as state_lib

SETTINGS_FILE = "estimator.json"
INITS = ("scratch", "base")
# Settings added after estimators were trained, with the value that means what those did.
LATER_SETTINGS = {"node": None, "init": "scratch", "radius_weight": 0.0,
                  "balance_bins": True, "gain_weight": False, "experts": ""}


@dataclasses.dataclass(frozen=True)
class Estimator:
  """One σ-estimator, to train or to certify with: the grid (σ values, smallest first), the σ
  it is smoothed at, and `node`: None for the estimator over the whole grid, else the index k
  of the grid σ that a router node decides against every lower one (bins: 0 = lower, 1 = σ_k).
  Training reads `directory`; certification adds `fn` (x -> logits over the bins) and `n`,
  the samples of its test (`loaded`)."""
  grid: tuple
  sigma: float
  node: int | None = None
  directory: Path | None = None
  fn: Callable | None = None
  n: int = 0

  def __post_init__(self):
    grid = np.asarray(self.grid, np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(grid <= 0):
      raise ValueError(f"sigma_grid must list at least two positive σ; got {self.grid}")

  def loaded(self, fn: Callable, n: int, sigma: float) -> "Estimator":
    return dataclasses.replace(self, fn=fn, n=n, sigma=sigma)

  @property
  def bin_sigmas(self) -> tuple:
    """The σ each bin stands for: the grid, or a node's (next lower σ, σ_k)."""
    if self.node is None:
      return tuple(self.grid)
    return (self.grid[self.node - 1], self.grid[self.node])

  @property
  def name(self) -> str:
    return "estimator" if self.node is None else f"router node {self.node}"

  @property
  def num_bins(self) -> int:
    return len(self.grid) if self.node is None else 2

  def bins(self, radii: np.ndarray) -> np.ndarray:
    """[N, bins] of the radius profile [N, K] over the grid."""
    if self.node is None:
      return radii
    return np.stack([radii[:, : self.node].max(axis=1), radii[:, self.node]], axis=1)


def grid_of(config) -> tuple:
  return tuple(float(s) for s in config.train.table.grid)


def choosers(config, workdir: Workdir) -> list:
  """The estimators `config` asks for: one over the grid, or with estimator.router the router
  nodes from the top of the grid down."""
  grid = grid_of(config)
  if not config.estimator.router:
    return [Estimator(grid, smoothing_sigma(config), directory=workdir.estimator_dir)]
  return [router_node(workdir, grid, k) for k in range(len(grid) - 1, 0, -1)]


def router_node(workdir: Workdir, grid: tuple, node: int) -> Estimator:
  return Estimator(grid, grid[node], node, workdir.router_dir(node))


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


def training_labels(radii, chooser: Estimator, e):
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


def smoothing_sigma(config) -> float:
  return float(config.estimator.sigma or max(config.train.table.grid))


def settings(config, chooser: Estimator) -> dict:
  """What an estimator depends on; certification reads the grid and σ_e from here."""
  e = config.estimator
  return {"grid": list(chooser.grid), "sigma": chooser.sigma, "node": chooser.node,
          "model": e.model or config.model.name, "dtype": config.model.dtype,
          "epochs": e.epochs, "label_samples": e.label_samples, "temperature": e.temperature,
          "loss": e.loss, "loss_settings": e[e.loss].to_dict(), "learning_rate": e.learning_rate,
          "init": e.init, "radius_weight": e.radius_weight, "balance_bins": e.balance_bins,
          "gain_weight": e.gain_weight, "experts": e.experts, "seed": config.seed}


def upgrade(saved: dict) -> dict:
  """Settings saved before the estimators took their loss from losses/ (a float
  `consistency` λ and `entropy` η), as the consistency loss's settings, and loss settings
  saved before a key of their section existed, with what they trained with (losses.EARLIER);
  others unchanged."""
  saved = dict(saved)
  if "consistency" in saved:
    saved |= {"loss": "consistency",
              "loss_settings": {"num_noise_vec": 2, "lbd": saved.pop("consistency"),
                                "eta": saved.pop("entropy", 0.0)}}
  section = losses.estimator_defaults(saved["loss"])
  earlier = {k: v for k, v in losses.EARLIER.items() if k in section}
  return saved | {"loss_settings": earlier | saved["loss_settings"]}


def saved_settings(directory) -> dict:
  """The settings of the finished estimator in `directory` (those added later at their old
  value); FileNotFoundError saying what to run when there is none or it stopped early."""
  directory = Path(directory)
  settings_path = directory / SETTINGS_FILE
  manager = checkpoints.manager(directory) if settings_path.exists() else None
  if manager is None or manager.latest_step() is None:
    what = "router node" if directory.parent.name == "router" else "σ-estimator"
    option = " --config.estimator.router=True" if what == "router node" else ""
    raise FileNotFoundError(f"no {what} in {directory}: train one with train.py (same "
                            f"--config and --workdir) and --config.estimator.epochs=N{option}")
  saved = upgrade(json.loads(settings_path.read_text()))
  if finished_steps(manager, saved) is None:
    raise FileNotFoundError(f"the σ-estimator in {directory} stopped before its last step "
                            f"(checkpoint {manager.latest_step()}): rerun train.py to finish it")
  return saved


def finished_steps(manager, saved: dict) -> int | None:
  """The steps of the estimator whose checkpoints `manager` holds, if its latest checkpoint
  is its last step, else None (a run from before checkpoints carried their progress: its
  last epoch's checkpoint number, then equal to the epochs)."""
  latest = manager.latest_step()
  done = checkpoints.progress(manager, latest)
  if done:
    return done["steps"] if done["step"] == done["steps"] else None
  return latest if latest == saved["epochs"] else None


def validate(config) -> list:
  e = config.estimator
  return [
      (e.epochs >= 0, f"estimator.epochs must be >= 0; got {e.epochs}"),
      (e.sigma >= 0, f"estimator.sigma must be > 0 (or 0: the top of the grid); got {e.sigma}"),
      (e.label_samples >= 1, f"estimator.label_samples must be >= 1; got {e.label_samples}"),
      (e.temperature > 0, f"estimator.temperature must be > 0; got {e.temperature}"),
      (e.radius_weight >= 0, f"estimator.radius_weight must be >= 0; got {e.radius_weight}"),
      (e.learning_rate > 0, f"estimator.learning_rate must be > 0; got {e.learning_rate}"),
      (e.init in INITS, f"estimator.init must be one of {INITS}; got {e.init!r}"),
      (e.init == "scratch" or e.model in ("", config.model.name),
       f"estimator.init=base needs the base model's architecture; got estimator.model={e.model!r}"),
      (e.finetune_epochs >= 0, f"estimator.finetune_epochs must be >= 0; got {e.finetune_epochs}"),
      (e.finetune_learning_rate > 0,
       f"estimator.finetune_learning_rate must be > 0; got {e.finetune_learning_rate}"),
      (not (e.router and e.finetune_epochs),
       "estimator.finetune_epochs needs the estimator over the grid, not estimator.router"),
      ((e.model or config.model.name) in models.ARCHITECTURES,
       f"estimator.model must be one of {models.ARCHITECTURES}; got {e.model!r}"),
  ] + losses.validate(e, "estimator", None, config.train.batch_size, losses.estimator_defaults,
                      soft_targets=True)


@functools.partial(jax.jit, static_argnames=("sigma", "loss"), donate_argnames="state")
def train_step(state: state_lib.ModelState, batch, epoch_key, epoch=0, *, sigma, loss):
  """One SGD step of `loss` (estimator.loss: consistency by default, the losses/ module the
  base model can train with too) at σ_e on `batch["label"]`, weight × soft label; its
  "agreement" is the share of noisy copies whose top bin is the label's."""
  keys = state_lib.example_keys(epoch_key, batch["index"])
  state, metrics = steps.loss_step(state, batch["image"], batch["label"],
                                   jnp.full(keys.shape[:1], sigma, jnp.float32), keys, loss,
                                   epoch)
  metrics["agreement"] = metrics.pop("noisy_accuracy")
  return state, metrics


def load(directory, workdir):
  """(x -> logits over the estimator's bins, its settings) of the finished estimator in
  `directory` of the run in `workdir`."""
  saved = LATER_SETTINGS | saved_settings(directory)
  restored = checkpoints.restore_latest(checkpoints.manager(directory))
  bins = len(saved["grid"]) if saved["node"] is None else 2
  model = models.create_model(saved["model"], bins, saved["dtype"], Workdir(workdir).read_facts().stats)
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
  return models.bind_variables(model.apply, variables), saved


def assigned_sigmas(workdir, split: data.Split, config) -> np.ndarray:
  """float32[N]: for each example of `split`, the grid σ of the estimator's majority bin over
  `estimator.label_samples` copies at σ_e (noise keyed on (seed, example, copy); ties go to
  the smaller σ). Every host computes all of them, on its first local device."""
  apply, saved = load(Workdir(workdir).estimator_dir, workdir)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.ESTIMATOR_ASSIGN)
  bins = majority_bins(apply, saved["sigma"], len(saved["grid"]), split,
                       np.arange(len(split)), key, config)
  return np.asarray(saved["grid"], np.float32)[bins]


def majority_bins(apply, sigma: float, num_bins: int, split: data.Split, order: np.ndarray,
                  key, config) -> np.ndarray:
  """int[len(order)]: the majority bin of `apply` (x -> logits over the bins) over
  `estimator.label_samples` noisy copies at `sigma` of each example `order` of `split` (the
  noise of example i, copy c from (key, i, c); ties go to the lower bin)."""
  counts = [np.asarray(_votes(apply, b["image"], b["index"], key, sigma, num_bins=num_bins,
                              copies=config.estimator.label_samples))
            for b in data.batches(split, config.train.table.chunk, order=order,
                                  settings=config.input)]
  return np.argmax(np.concatenate(counts), axis=1) if counts else np.zeros(0, np.int64)


@functools.partial(jax.jit, static_argnames=("num_bins", "copies"))
def _votes(apply, images, indices, key, sigma, *, num_bins, copies):
  keys = state_lib.example_keys(key, indices)

  def copy_votes(c):
    noisy = state_lib.gaussian_noise(jax.vmap(lambda k: jax.random.fold_in(k, c))(keys),
                                     images, jnp.full(indices.shape, sigma))
    return jax.nn.one_hot(jnp.argmax(apply(noisy), -1), num_bins)
  return jax.lax.map(copy_votes, jnp.arange(copies)).sum(axis=0)
