"""Atomic, resumable checkpoints of train states (orbax).

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


def restore_as_saved(checkpoints: ocp.CheckpointManager, step: int) -> dict:
  """The tree saved at `step`, as numpy arrays, without a template (for reading parameters
  whose optimizer state the reader does not rebuild)."""
  return checkpoints.restore(step, args=ocp.args.StandardRestore())
