"""A trained classifier for inference: x -> logits of a model at one checkpoint, from the
run's files alone (config.json, run.json and the checkpoint's model variables)."""

from __future__ import annotations

import jax

from instars_jax import models
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import Workdir


def load(workdir, step: int) -> jax.tree_util.Partial:
  """x -> logits of the model of the run in `workdir` at its checkpoint `step` (what
  certification deploys; train/state.py's `logits_fn(load_train_state)` with BatchNorm
  folded: bit-identical for a model without BatchNorm)."""
  workdir = Workdir(workdir)
  config, facts = workdir.read_config(), workdir.read_facts()
  model = models.create_model(config.model.name, facts.num_classes, config.model.dtype,
                              facts.stats)
  return from_checkpoint(model, workdir.checkpoints(), step)


def from_checkpoint(model, manager, step: int) -> jax.tree_util.Partial:
  """x -> logits of `model` with the variables of checkpoint `step` of `manager`, restored
  alone (no optimizer state, no σ table), BatchNorm's running statistics folded into the
  convolutions (models.fold_batch_norm: the same function, the graph certification runs;
  the checkpoint is left as it is). A jax.tree_util.Partial: the sampler passes the weights
  to its compiled programs as arguments, not as constants."""
  folded, variables = models.fold_batch_norm(model, checkpoints.restore_variables(manager, step))
  return models.bind_variables(folded.apply, variables)
