"""Atomic, resumable checkpoints of train states (orbax), and stopping at a safe point.

orbax writes each step to a temporary directory and renames it when complete, so a kill
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from instars_jax.run.files import raise_write_error

class Interrupted(Exception):
  """Raised after a checkpoint was written because the process was asked to stop (SIGTERM,
  SIGINT): rerunning the same command resumes from it. Entry points exit with status 143."""


class StopRequest:
  """Turns SIGTERM (what a preemption sends) and SIGINT into a request to stop at the next
  safe point, for the duration of a `with` block. With several hosts, SIGTERM belongs to
  JAX's preemption notifier (a Python handler, or restoring the one Python saw at start-up,
  would disable it), and with `sync_hosts` each `due()` is JAX's preemption sync point,
  numbered by a count of such calls in this process (which every host makes alike, and which
  only grows, as the sync protocol needs), so that every host stops at the same step."""

  def __init__(self, sync_hosts: bool = False):
    self.sync_hosts = sync_hosts
    self.requested = False

  def __enter__(self):
    handler = lambda signum, frame: setattr(self, "requested", True)
    self.previous = {}
    signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():  # elsewhere signals can't be set
      self.previous = {sig: signal.signal(sig, handler) for sig in signals}
    return self

  def _synced(self) -> bool:
    return self.sync_hosts and jax.process_count() > 1

  def __exit__(self, *exc):
    for sig, previous in self.previous.items():
      signal.signal(sig, previous)

  def due(self) -> bool:
    if self._synced():
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_POINTS)) or self.requested
    return self.requested


_SYNC_POINTS = itertools.count(1)


class _Manager(ocp.CheckpointManager):
  """orbax's manager, but it never queries JAX's preemption sync point itself: the training
  loop does, once per step (`StopRequest.due`). The sync protocol needs one increasing step
  id per call; orbax asking with checkpoint numbers would break it."""

  def reached_preemption(self, step: int) -> bool:
    return False


def manager(workdir, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return _Manager(Path(workdir).resolve() / "checkpoints", options=options)


def save(checkpoints: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` as `step`; a disk that is full or unwritable gives one ValueError line, and
  the checkpoints before stay intact (orbax writes to a temporary directory first)."""
  try:
    checkpoints.save(step, args=ocp.args.StandardSave(state))
    checkpoints.wait_until_finished()
  except Exception as error:  # noqa: BLE001 (re-raised: as one line when the disk failed)
    raise_write_error(error, f"checkpoint {step} to {checkpoints.directory}")
    raise


def restore_latest(checkpoints: ocp.CheckpointManager, template):
  """(state, step) of the latest checkpoint restored onto `template`'s structure and
  shardings, or (template, 0) when there is none."""
  step = checkpoints.latest_step()
  if step is None:
    return template, 0
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
  return _restore(checkpoints, step, ocp.args.StandardRestore(abstract)), step


def restore_as_saved(checkpoints: ocp.CheckpointManager, step: int) -> dict:
  """The tree saved at `step`, as numpy arrays, without a template (for reading parameters
  whose optimizer state the reader does not rebuild)."""
  return _restore(checkpoints, step, ocp.args.StandardRestore())


def _restore(checkpoints: ocp.CheckpointManager, step: int, args):
  """checkpoints.restore, with any failure of a damaged step turned into one ValueError line
  (orbax and tensorstore report them in many types, some kilobytes long).

  While a restore runs, file descriptor 2 points at /dev/null: on a damaged step orbax's
  event-loop threads print tracebacks of their own, during and shortly after the failure. On
  success it is put back at once; on failure a few seconds later (`error_stream()` is the real
  one meanwhile, for the command line's one-line error)."""
  global _saved_stderr
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  try:
    restored = checkpoints.restore(step, args=args)
  except Exception as error:  # noqa: BLE001 (re-raised as one line)
    _saved_stderr = saved
    timer = threading.Timer(5.0, _put_back_stderr)
    timer.daemon = True
    timer.start()
    while error.__cause__ is not None or error.__context__ is not None:  # the root cause
      error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    raise ValueError(f"checkpoint {step} in {checkpoints.directory} is corrupt or incomplete "
                     f"({lines[0][:160]}): remove {checkpoints.directory / str(step)} to fall back "
                     "to the one before it") from None
  os.dup2(saved, 2)
  os.close(saved)
  return restored


_saved_stderr = None


def _put_back_stderr() -> None:
  global _saved_stderr
  if _saved_stderr is not None:
    os.dup2(_saved_stderr, 2)
    os.close(_saved_stderr)
    _saved_stderr = None


def error_stream() -> int:
  """The file descriptor of the real standard error (see `_restore`)."""
  return _saved_stderr if _saved_stderr is not None else 2
