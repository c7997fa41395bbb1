"""One writer per workdir: an exclusive OS lock (flock) that the kernel releases when its
holder exits or dies, so a kill -9 never leaves a stale lock behind.

The lock file also records its holder (pid, host, start time), which a second writer names in
its error. Readers (analyze, `load_train_state`) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path


@contextlib.contextmanager
def exclusive(path, what: str):
  """Holds the lock file `path` for the block; ValueError naming the holder if another
  process has it. `what` names the resource in that error."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _holder(fd)
    os.close(fd)
    raise ValueError(f"{what} is in use by {holder}: wait for it to finish, or choose another "
                     "--workdir") from None
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the lock


def _holder(fd, wait_s: float = 2.0) -> str:
  # The holder writes its record just after it takes the lock: give it a moment to appear.
  deadline = time.monotonic() + wait_s
  while True:
    try:
      info = json.loads(os.pread(fd, 4096, 0) or b"{}")
      return f"pid {info['pid']} on {info['host']} (started {info['started']})"
    except (ValueError, KeyError):
      if time.monotonic() > deadline:
        return "another process"
      time.sleep(0.05)
