"""One error line for a write that the disk refused (full, read-only, no permission)."""

from __future__ import annotations


def raise_write_error(error: BaseException, what: str) -> None:
  """ValueError("cannot write {what}: ...") when an OSError is among the causes of `error`;
  returns otherwise (the caller re-raises what is not a refused write)."""
  while error is not None and not isinstance(error, OSError):
    error = error.__cause__ or error.__context__
  if error is not None:
    raise ValueError(f"cannot write {what}: {error.strerror or error} (errno {error.errno}); "
                     "what was written before is intact") from None
