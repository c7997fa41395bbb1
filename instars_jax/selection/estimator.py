"""The σ-estimator of the sound instance-wise certificate, after Dual Randomized Smoothing
(Sun, Mao & Vechev, ICLR 2026), as a model: what it is, its saved settings, loading it.

A classifier over the K noise levels of `train.table.grid`, smoothed at σ_e (default: the top
of the grid) and certified by CERTIFY like any base classifier (instars_jax/certificates/).
With `train.estimator.router`, a router tree instead (the `router` certificate): for the grid
σ_1 < … < σ_K, node k (k = K … 2) decides "σ_k" against "a lower σ", smoothed at σ_k.

Trained by train/stages/sigma_estimators.py. Saved in WORKDIR/estimator/ (a router node in
WORKDIR/router/node_k/): orbax checkpoints, one per epoch, and `estimator.json`, the settings
certification reads.
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
from instars_jax.selection import classifier
from instars_jax.smoothing.bounds import instance_noise
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import Workdir

SETTINGS_FILE = "estimator.json"
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


def router_node(workdir: Workdir, grid: tuple, node: int, sigma_factor: float = 1.0) -> Estimator:
  """Router node `node` (σ_node against the lower σ), smoothed at sigma_factor × σ_node."""
  return Estimator(grid, grid[node] * sigma_factor, node, workdir.router_dir(node))


def upgrade(saved: dict) -> dict:
  """Settings saved before the estimators took their loss from losses/ (a float
  `consistency` λ and `entropy` η), as the consistency loss's settings; others unchanged."""
  if "consistency" not in saved:
    return saved
  saved = dict(saved)
  settings = {"num_noise_vec": 2, "lbd": saved.pop("consistency"),
              "eta": saved.pop("entropy", 0.0)}
  return saved | {"loss": "consistency", "loss_settings": settings}


def saved_settings(directory) -> dict:
  """The settings of the finished estimator in `directory` (those added later at their old
  value); FileNotFoundError saying what to run when there is none or it stopped early."""
  directory = Path(directory)
  settings_path = directory / SETTINGS_FILE
  manager = checkpoints.manager(directory) if settings_path.exists() else None
  if manager is None or manager.latest_step() is None:
    what = "router node" if directory.parent.name == "router" else "σ-estimator"
    option = " --config.train.estimator.router=True" if what == "router node" else ""
    raise FileNotFoundError(f"no {what} in {directory}: train one with train.py (same "
                            f"--config and --workdir) and --config.train.estimator.epochs=N{option}")
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


def checkpointed_settings(directory) -> dict:
  """The settings of the finished estimator in `directory` (`saved_settings`) and "step", the
  checkpoint that certifies with them (what a results file records)."""
  return saved_settings(directory) | {"step": int(checkpoints.manager(directory).latest_step())}


def load(directory, workdir, step: int | None = None):
  """(x -> logits over the estimator's bins, its settings) of the finished estimator in
  `directory` of the run in `workdir`, at checkpoint `step` (None: the latest)."""
  saved = LATER_SETTINGS | saved_settings(directory)
  manager = checkpoints.manager(directory)
  bins = len(saved["grid"]) if saved["node"] is None else 2
  model = models.create_model(saved["model"], bins, saved["dtype"],
                              Workdir(workdir).read_facts().stats)
  step = manager.latest_step() if step is None else step
  return classifier.from_checkpoint(model, manager, step), saved


def majority_bins(apply, sigma: float, num_bins: int, split: data.Split, order: np.ndarray,
                  key, config) -> np.ndarray:
  """int[len(order)]: the majority bin of `apply` (x -> logits over the bins) over
  `train.estimator.label_samples` noisy copies at `sigma` of each example `order` of `split` (the
  noise of example i, copy c from (key, i, c); ties go to the lower bin)."""
  counts = [np.asarray(_votes(apply, b["image"], b["index"], key, sigma, num_bins=num_bins,
                              copies=config.train.estimator.label_samples))
            for b in data.batches(split, config.train.table.chunk, order=order,
                                  settings=config.input)]
  return np.argmax(np.concatenate(counts), axis=1) if counts else np.zeros(0, np.int64)


@functools.partial(jax.jit, static_argnames=("num_bins", "copies"))
def _votes(apply, images, indices, key, sigma, *, num_bins, copies):
  noise = jax.vmap(instance_noise, in_axes=(None, 0, None, None))

  def copy_votes(c):
    noisy = images + sigma * noise(key, indices, c[None], images.shape[1:])[:, 0]
    return jax.nn.one_hot(jnp.argmax(apply(noisy), -1), num_bins)
  return jax.lax.map(copy_votes, jnp.arange(copies)).sum(axis=0)
