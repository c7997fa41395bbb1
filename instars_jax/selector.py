"""The σ selector of the `locally_constant` certificate: a small network that maps an input to
a bin of a σ grid, trained on the Insta-RS Train σ table (each training example's own σ).

It is trained with Gaussian noise at the selector's smoothing σ, as a base classifier for
randomized smoothing is, and cached in WORKDIR/selector/ after the first use.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from instars_jax import checkpoints, data, training


def grid_bins(sigma, grid) -> np.ndarray:
  """The index of the grid σ nearest to each σ, in log scale."""
  log_grid = np.log(np.asarray(grid, np.float64))
  return np.abs(np.log(np.asarray(sigma, np.float64))[:, None] - log_grid[None]).argmin(1) \
      .astype(np.int32)


def _selector_config(config):
  s = config.certify.selector
  selector_config = config.copy_and_resolve_references()
  with selector_config.unlocked():
    selector_config.train.sigma = s.sigma
    selector_config.train.epochs = s.epochs
    selector_config.train.insta = False
    selector_config.seed = config.seed + 1
  return selector_config


def load_or_train(config, workdir, dataset, sigma_table):
  """x -> logits over the grid bins: the cached selector of `workdir`, trained first if absent."""
  s = config.certify.selector
  directory = Path(workdir) / "selector"
  selector_config = _selector_config(config)
  template = training.create_train_state(selector_config, dataset.image_shape, len(s.grid),
                                         dataset.stats, len(dataset.train),
                                         data.num_batches(len(dataset.train),
                                                          config.train.batch_size, True))
  manager = checkpoints.manager(directory, max_to_keep=1)
  settings = {"grid": list(s.grid), "sigma": s.sigma, "epochs": s.epochs}
  settings_path = directory / "selector.json"
  if manager.latest_step() is not None:
    if json.loads(settings_path.read_text()) != settings:
      raise ValueError(f"{directory} holds a selector trained with other settings; remove it or "
                       "use the same certify.selector settings")
    state, _ = checkpoints.restore_latest(manager, template)
    return training.logits_fn(state)

  labels = grid_bins(np.asarray(sigma_table), s.grid)
  split = data.Split(dataset.train.images, labels)
  sharder = training.Sharder()
  state = sharder.replicate(template)
  key = jax.random.fold_in(jax.random.PRNGKey(selector_config.seed), training.PURPOSE_TRAIN_NOISE)
  for epoch in range(s.epochs):
    batches = data.batches(split, config.train.batch_size, seed=selector_config.seed, epoch=epoch,
                           shuffle=True, drop_remainder=True, host_id=jax.process_index(),
                           host_count=jax.process_count())
    for batch in tqdm(batches, desc=f"selector epoch {epoch + 1}/{s.epochs}", leave=False,
                      disable=None):
      state, _ = training.train_step(state, sharder.batch(batch), jax.random.fold_in(key, epoch),
                                     False)
  checkpoints.save(manager, s.epochs, state)
  checkpoints.write_json_atomic(settings_path, settings)
  return training.logits_fn(state)
