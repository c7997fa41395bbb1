"""Files written whole or not at all, and one error line for a write that the disk refused
(full, read-only, no permission)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def raise_write_error(error: BaseException, what: str) -> None:
  """ValueError("cannot write {what}: ...") when an OSError is among the causes of `error`;
  returns otherwise (the caller re-raises what is not a refused write)."""
  while error is not None and not isinstance(error, OSError):
    error = error.__cause__ or error.__context__
  if error is not None:
    raise ValueError(f"cannot write {what}: {error.strerror or error} (errno {error.errno}); "
                     "what was written before is intact") from None


def write_json_atomic(path, content: dict) -> None:
  """Writes `content` to `path` under a temporary name, then renames it into place."""
  path = Path(path)
  tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
  except OSError as error:
    raise_write_error(error, str(path))


def write_npz_atomic(path, **arrays) -> None:
  """np.savez of `arrays` under a temporary name in `path`'s folder, then renamed into place."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
