"""A long pass kept in parts: a folder of numbered .npz files, each written whole
(files.write_npz_atomic) and never rewritten, under the settings the pass ran with.

The pass appends one part per chunk, so a stop or a kill -9 loses at most the chunk in
flight, and its writes grow with each chunk, not with what it kept before. A rerun with the
same settings reads the parts back in order and goes on after them; parts kept under other
settings are removed when the folder is opened."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from instars_jax.storage.files import write_npz_atomic

SETTINGS_FILE = "settings.txt"


class Parts:
  """The parts in `directory`. `settings` (a string, or None for parts that need none) is
  written before the first part; `writer` False (every host but the first) reads and never
  writes."""

  def __init__(self, directory, settings: str | None = None, writer: bool = True):
    self.directory, self.settings, self.writer = Path(directory), settings, writer
    self.next_number = None  # after the last part's, read once
    if self.directory.is_dir() and not self.same_settings():
      self.remove()

  def same_settings(self) -> bool:
    saved = self.directory / SETTINGS_FILE
    return self.settings is None or (saved.exists() and saved.read_text() == self.settings)

  def paths(self) -> list:
    return sorted(self.directory.glob("part_*.npz")) if self.directory.is_dir() else []

  def load(self) -> list:
    """[{name: array}], one dict per part, in the order they were appended (none where they
    were kept under other settings)."""
    loaded = []
    for path in self.paths() if self.same_settings() else []:
      with np.load(path) as part:
        loaded.append({k: part[k] for k in part.files})
    return loaded

  def append(self, **arrays) -> None:
    if not self.writer:
      return
    if not self.directory.is_dir():
      self.directory.mkdir(parents=True)
      if self.settings is not None:
        (self.directory / SETTINGS_FILE).write_text(self.settings)
    if self.next_number is None:
      paths = self.paths()
      self.next_number = int(paths[-1].stem.removeprefix("part_")) + 1 if paths else 0
    write_npz_atomic(self.directory / f"part_{self.next_number:08d}.npz", **arrays)
    self.next_number += 1

  def remove(self) -> None:
    if self.writer:
      shutil.rmtree(self.directory, ignore_errors=True)
      self.next_number = None
