"""One writer per workdir: the lock names its holder and dies with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instars_jax.storage import checkpoints, locks

ROOT = Path(__file__).resolve().parents[1]


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
  with locks.exclusive(tmp_path / "a.lock", "the thing"):
    with pytest.raises(ValueError, match=rf"the thing is in use by pid {os.getpid()} on "):
      with locks.exclusive(tmp_path / "a.lock", "the thing"):
        pass
  with locks.exclusive(tmp_path / "a.lock", "the thing"):  # released on exit
    pass


def test_kill_9_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from instars_jax.storage import locks\n"
       f"with locks.exclusive({str(tmp_path / 'b.lock')!r}, 'x'):\n"
       "  print('held', flush=True); time.sleep(60)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(ValueError, match=f"pid {holder.pid}"):
    with locks.exclusive(tmp_path / "b.lock", "x"):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  began = time.monotonic()
  with locks.exclusive(tmp_path / "b.lock", "x"):
    assert time.monotonic() - began < 1


def test_a_stop_received_by_a_nested_stop_request_reaches_the_outer_one_at_exit():
  # A stage's own run (an expert's) holds its StopRequest inside the run's: a SIGTERM that
  # arrives as the inner run finishes must still stop the run; outside any, it is not raised.
  before = signal.getsignal(signal.SIGTERM)
  with checkpoints.StopRequest() as outer:
    with checkpoints.StopRequest() as inner:
      os.kill(os.getpid(), signal.SIGTERM)
      assert inner.requested and not outer.requested
    assert outer.requested
    with checkpoints.StopRequest() as quiet:
      pass
    assert not quiet.requested
  assert signal.getsignal(signal.SIGTERM) == before
  called = []  # a handler not a StopRequest's gets nothing passed on: the stop was handled
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: called.append(signum))
  try:
    with checkpoints.StopRequest() as alone:
      os.kill(os.getpid(), signal.SIGTERM)
    assert alone.requested and called == []
  finally:
    signal.signal(signal.SIGTERM, previous)
