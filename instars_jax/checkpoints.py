"""Atomic, resumable checkpoints of the train state (orbax), and loading a run for notebooks.

A workdir holds `config.json` (the run's config), `run.json` (what the state's shapes depend
on: image shape, classes, training-set size) and `checkpoints/<epochs done>/` (orbax writes
each step to a temporary directory and renames it when complete, so a kill never leaves a
half-written checkpoint behind).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


def manager(workdir, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(Path(workdir).resolve() / "checkpoints", options=options)


def save(checkpoints: ocp.CheckpointManager, step: int, state) -> None:
  checkpoints.save(step, args=ocp.args.StandardSave(state))
  checkpoints.wait_until_finished()


def restore_latest(checkpoints: ocp.CheckpointManager, template):
  """(state, step) of the latest checkpoint restored onto `template`'s structure and
  shardings, or (template, 0) when there is none."""
  step = checkpoints.latest_step()
  if step is None:
    return template, 0
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  return checkpoints.restore(step, args=ocp.args.StandardRestore(abstract)), step


def write_json_atomic(path: Path, content: dict) -> None:
  tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
  tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_config(workdir) -> ml_collections.ConfigDict:
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"no training run in {workdir}: {CONFIG_FILE} is missing "
                            "(train first with train.py --workdir)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_train_state(workdir):
  """The latest train state of the run in `workdir` (σ table included), for notebooks.

  `state.apply_fn` is the model's apply; `training.logits_fn(state)` gives x -> logits.
  """
  from instars_jax import training  # training imports this module

  config = read_config(workdir)
  run = json.loads((Path(workdir) / RUN_FILE).read_text())
  template = training.create_train_state(config, tuple(run["image_shape"]), run["num_classes"],
                                         run["stats"], run["num_train"], run["steps_per_epoch"])
  checkpoints = manager(workdir)
  if checkpoints.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
  state, _ = restore_latest(checkpoints, template)
  return state
