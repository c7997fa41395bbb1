"""Certification results in Cohen et al.'s TSV format, written with resume, and their metadata.

Columns: `idx label predict radius correct time` (Cohen's), then extra columns: `sigma`, and
`samples`, the class test's estimation samples (n, or fewer with sequential sampling).
`predict` is -1 and `radius` 0 on abstention. A JSON sidecar next to each TSV records how the
numbers were made (certificate kind, n0, n, α, seed, ...).
"""

from __future__ import annotations

import decimal
import json
import os
from pathlib import Path

import numpy as np

from instars_jax.storage.files import raise_write_error, write_json_atomic

COHEN_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
_INT_COLUMNS = ("idx", "label", "predict", "correct")


def metadata_path(tsv_path) -> Path:
  return Path(tsv_path).with_suffix(".json")


def read_metadata(tsv_path) -> dict:
  """The sidecar metadata of a results file, or {} when it has none."""
  path = metadata_path(tsv_path)
  return json.loads(path.read_text()) if path.exists() else {}


def write_metadata(tsv_path, metadata: dict) -> None:
  write_json_atomic(metadata_path(tsv_path), metadata)


def read_results(path) -> dict[str, np.ndarray]:
  """Columns of a results TSV: integers for idx/label/predict/correct, floats for numeric
  extras and radius, strings otherwise (Cohen's `time` is sometimes h:mm:ss)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"results file not found: {path}")
  lines = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines() if line.strip()]
  if not lines or not set(COHEN_COLUMNS[:5]) <= set(lines[0]):
    raise ValueError(f"{path} is not a certification TSV: its header must contain "
                     f"{' '.join(COHEN_COLUMNS)}")
  header, rows = lines[0], lines[1:]
  columns = {name: [row[i] for row in rows] for i, name in enumerate(header)}
  return {name: _typed(name, values) for name, values in columns.items()}


def _typed(name, values):
  if name in _INT_COLUMNS:
    return np.asarray(values, np.int64)
  try:
    return np.asarray(values, np.float64)
  except ValueError:
    return np.asarray(values)


class ResultsWriter:
  """Appends rows to a results TSV, flushed and synced after every batch.

  Opening an existing file resumes it: a torn last line (from a kill mid-write) is dropped,
  and `done` holds the idx values already written, so a rerun certifies only what is missing.
  """

  def __init__(self, path, extra_columns=("sigma", "samples")):
    self.path = Path(path)
    self.columns = COHEN_COLUMNS + tuple(extra_columns)
    self.done: set[int] = set()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists() and self.path.stat().st_size > 0:
      self._resume()
    else:
      self.path.write_text("\t".join(self.columns) + "\n")

  def _resume(self):
    text = self.path.read_text()
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
      self.path.write_text(complete)
    lines = complete.splitlines()
    if tuple(lines[0].split("\t")) != self.columns:
      raise ValueError(f"{self.path} has columns {lines[0].split()} but this run writes "
                       f"{list(self.columns)}; choose another output name")
    self.done = {int(line.split("\t", 1)[0]) for line in lines[1:] if line}

  def write(self, rows) -> None:
    """Writes rows, each a dict with every column, then flushes and syncs the file. A disk
    that is full or unwritable gives one ValueError line; the rows before stay (a torn last
    line is dropped on resume)."""
    try:
      self._append(rows)
    except OSError as error:
      raise_write_error(error, str(self.path))

  def _append(self, rows) -> None:
    with self.path.open("a") as f:
      for row in rows:
        f.write("\t".join(format_radius(row[c]) if c == "radius" else _format(row[c])
                           for c in self.columns) + "\n")
        self.done.add(int(row["idx"]))
      f.flush()
      os.fsync(f.fileno())


def _format(value) -> str:
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.6g}"
  return str(value)


def format_radius(value, digits: int = 6) -> str:
  """`value` to `digits` significant digits, never above it: the radius read back from the
  file never exceeds the one computed (a certificate must not grow in print)."""
  value = float(value)
  return _not_above(value, f"{value:.{digits}g}",
                    decimal.Decimal(value).adjusted() - digits + 1)


def format_down(value, decimals: int) -> str:
  """`value` with `decimals` digits after the point, never above it: a certified accuracy or
  ACR read back from a table never exceeds the one computed (`.3f` rounds to nearest, up to
  half a unit of its last digit above it)."""
  value = float(value)
  return _not_above(value, f"{value:.{decimals}f}", -decimals)


def _not_above(value: float, text: str, exponent: int) -> str:
  """`text`, `value` rounded to nearest, where it is not above `value` (or `value` is not
  finite); else `value` floored to a multiple of 10**exponent."""
  if not np.isfinite(value) or float(text) <= value:
    return text
  quantum = decimal.Decimal(1).scaleb(exponent)
  return str(decimal.Decimal(value).quantize(quantum, rounding=decimal.ROUND_FLOOR))


def merge_results(parts, out_path) -> None:
  """Writes the rows of several results files (one per host) to one file, sorted by idx."""
  tables = [Path(p).read_text().splitlines() for p in parts]
  header = tables[0][0]
  if any(t[0] != header for t in tables):
    raise ValueError(f"cannot merge results files with different columns: {list(parts)}")
  rows = sorted((line for t in tables for line in t[1:] if line),
                key=lambda line: int(line.split("\t", 1)[0]))
  out_path = Path(out_path)
  tmp = out_path.with_name(out_path.name + ".tmp")
  tmp.write_text("\n".join([header] + rows) + "\n")
  os.replace(tmp, out_path)
