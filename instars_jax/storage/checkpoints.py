"""Atomic, resumable checkpoints by global step (orbax), and stopping at a safe point.

Every training stage has one orbax manager. Its checkpoints are numbered by the run's global
step (the stages' steps counted one after another), which only grows, as JAX's preemption
sync point needs: orbax saves every `every_steps` steps and, on several hosts, at the step
all hosts agree on after a preemption notice (its own save policies), and the loop saves at
every epoch end. A manager keeps its latest checkpoint and every epoch end. Each checkpoint
carries the stage's progress (`progress`) as orbax custom metadata.

orbax writes each step to a temporary directory and renames it when complete, so a kill
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import checkpoint_managers as policies

from instars_jax.storage.files import raise_write_error

ITEM = "default"  # the directory of a checkpoint's one item (orbax's name for it)
VARIABLES = ("params", "batch_stats")  # what a model needs of its train state to infer


class Interrupted(Exception):
  """Raised after a checkpoint was written because the process was asked to stop (SIGTERM,
  SIGINT): rerunning the same command resumes from it. Entry points exit with status 143."""


class StopRequest:
  """Turns SIGTERM (what a preemption sends) and SIGINT into `requested`, for the duration of
  a `with` block. With several hosts SIGTERM belongs to JAX's preemption notifier (a Python
  handler would disable it), which orbax's `reached_preemption` reads. Nested (a stage's own
  run inside the run), a signal the inner one received is passed on to the outer one at exit,
  so a stop that came as the inner run finished still stops the run."""

  def __init__(self):
    self.requested = False
    self.received = []

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    self.received.append(signum)

  def __enter__(self):
    self.received, self.previous = [], {}
    signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():  # elsewhere signals can't be set
      self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}
    return self

  def __exit__(self, *exc):
    for sig, previous in self.previous.items():
      signal.signal(sig, previous)
    for sig in dict.fromkeys(self.received):
      outer = self.previous.get(sig)
      if isinstance(getattr(outer, "__self__", None), StopRequest):
        outer(sig, None)


def manager(directory, every_steps: int = 0, keep=()) -> ocp.CheckpointManager:
  """The checkpoints in `directory`/checkpoints: `save(..., force=False)` saves every
  `every_steps` global steps (0: never) and at a preemption; every save keeps the latest
  checkpoint and the steps in `keep` (epoch ends)."""
  saving = [policies.PreemptionCheckpointingPolicy()]
  if every_steps:
    saving.append(policies.FixedIntervalPolicy(every_steps))
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False,
      save_decision_policy=policies.AnySavePolicy(saving),
      preservation_policy=policies.AnyPreservationPolicy(
          [policies.LatestN(n=1), policies.CustomSteps(sorted(keep))]))
  return ocp.CheckpointManager(Path(directory).resolve() / "checkpoints", options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(checkpoints: ocp.CheckpointManager, step: int, state, progress: dict,
         force: bool = True) -> bool:
  """Saves `state` as global `step` with `progress` (force=False: if orbax's policies say so);
  whether it saved. A disk that is full or unwritable gives one ValueError line, and the
  checkpoints before stay intact (orbax writes to a temporary directory first)."""
  try:
    saved = checkpoints.save(step, args=ocp.args.StandardSave(state), custom_metadata=progress,
                             force=force)
    checkpoints.wait_until_finished()
  except Exception as error:  # noqa: BLE001 (re-raised: as one line when the disk failed)
    raise_write_error(error, f"checkpoint {step} to {checkpoints.directory}")
    raise
  return saved


def progress(checkpoints: ocp.CheckpointManager, step: int) -> dict:
  """The progress saved with checkpoint `step` ({} for one written before it was saved)."""
  return dict(checkpoints.metadata(step).custom_metadata or {})


def restore(checkpoints: ocp.CheckpointManager, step: int, template=None):
  """Checkpoint `step` restored onto `template`'s structure and shardings (None: as saved,
  numpy arrays), with any failure of a damaged step turned into one ValueError line (orbax
  and tensorstore report them in many types, some kilobytes long)."""
  if template is None:
    args = ocp.args.StandardRestore()
  else:
    args = ocp.args.StandardRestore(
        jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template))
  return _restoring(checkpoints, step, lambda: checkpoints.restore(step, args=args))


def restore_variables(checkpoints: ocp.CheckpointManager, step: int) -> dict:
  """The model variables of checkpoint `step`, {"params", "batch_stats"} ({} for a model
  without BatchNorm), on the default device: read alone, without the optimizer state or the
  σ table, as inference needs. A damaged step: one ValueError line, as `restore`."""

  def read():
    saved = checkpoints.item_metadata(step)
    item = {k: v for k, v in getattr(saved, "tree", saved).items() if k in VARIABLES}
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    # The manager's handler restores a whole tree only; the item's PyTree handler, a part.
    with contextlib.closing(ocp.PyTreeCheckpointer()) as reader:
      return reader.restore(
          Path(checkpoints.directory) / str(step) / ITEM,
          args=ocp.args.PyTreeRestore(item, restore_args=as_numpy, partial_restore=True))

  return jax.device_put({"batch_stats": {}} | _restoring(checkpoints, step, read))


def _restoring(checkpoints: ocp.CheckpointManager, step: int, read):
  """read(), checkpoint `step` checked readable first, with any failure turned into one
  ValueError line (orbax and tensorstore report them in many types, some kilobytes long)."""
  try:
    _check_readable(Path(checkpoints.directory) / str(step))
    return read()
  except Exception as error:  # noqa: BLE001 (re-raised as one line)
    while error.__cause__ is not None or error.__context__ is not None:  # the root cause
      error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    raise ValueError(f"checkpoint {step} in {checkpoints.directory} is corrupt or incomplete "
                     f"({lines[0][:160]}): remove {checkpoints.directory / str(step)} to fall back "
                     "to the one before it") from None


def _check_readable(step_dir: Path) -> None:
  """Reads every stored value of the checkpoint in `step_dir` once, synchronously, so that a
  damaged one fails here, before orbax's concurrent restore would fail with reads still in
  flight (whose callbacks then print tracebacks into its closed event loop). The values land
  in the page cache, where orbax reads them next."""
  item = step_dir / ITEM
  if not (item / "manifest.ocdbt").exists():
    return
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{item}/"}).result()
  for key in store.list().result():
    store.read(key).result()


def restore_latest(checkpoints: ocp.CheckpointManager, template=None):
  """The latest checkpoint (see `restore`); FileNotFoundError when there is none."""
  step = checkpoints.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
  return restore(checkpoints, step, template)


def latest_step_saved(run_dir) -> int | None:
  """The largest global step that any stage of the run in `run_dir` saved (None before the
  first), read from the step directories orbax renames into place when complete: no orbax
  manager, so no barrier across hosts."""
  steps = [int(step.name) for step in Path(run_dir).glob("**/checkpoints/*")
           if step.name.isdigit()]
  return max(steps, default=None)
