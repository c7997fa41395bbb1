"""Files written whole or not at all, and one error line for a write that the disk refused
(full, read-only, no permission)."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
