"""memory: per_sigma's answers made consistent by a memory of the balls answered so far
(Alfarra et al., "Data Dependent Randomized Smoothing", UAI 2022).

Sound only for the classifier that answers the test points one at a time in this file's
order and keeps its memory: under that assumption, certified balls of different classes never
intersect (`answer_with_memory`). Not for a fresh stream of queries. The failure probability
is per_sigma's α per answer. Runs on one host, since the order is part of the classifier.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from instars_jax.certificates import ROUNDING_MARGIN, Certified, per_sigma
from instars_jax.smoothing.sampler import ABSTAIN
from instars_jax.storage.parts import Parts

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = False
MEANING = ("sound for the memory-based classifier that answers the test points in this file's "
           "order and keeps its memory (Alfarra et al., UAI 2022): certified balls of different "
           "classes never intersect")
validate = per_sigma.validate
metadata = per_sigma.metadata
sigmas = per_sigma.sigmas


def file_stem(config) -> str:
  return f"{NAME}_{per_sigma.search_range(config)}"


def prepare(smoothed, config):
  """per_sigma's answers passed through `answer_with_memory` in the order given; each batch's
  new entries are appended to the memory beside the results file."""
  searched = per_sigma.prepare(smoothed, config)
  directory = smoothed.results_path.with_suffix(".memory")
  memory = load_memory(directory, smoothed.image_size, keep_ids=smoothed.done)

  def certify(x, ids) -> Certified:
    nonlocal memory
    answer = searched(x, ids)
    stored, answers = len(memory.ids), []
    for point, p, r, i in zip(np.asarray(x), answer.prediction, answer.radius, ids):
      p, r, memory = answer_with_memory(memory, point, int(p), float(r), int(i))
      answers.append((p, r))
    append_memory(directory, memory, stored)
    prediction, radius = (np.asarray(column) for column in zip(*answers))
    return Certified(prediction.astype(np.int32), radius.astype(np.float64), answer.sigma,
                     answer.num_samples)

  return certify


class Memory(NamedTuple):
  """The balls answered so far: centres (flattened), predictions, radii and test ids."""
  points: np.ndarray  # float32[M, D]
  predictions: np.ndarray  # int32[M]
  radii: np.ndarray  # float64[M]
  ids: np.ndarray  # int64[M]

  @classmethod
  def empty(cls, dim: int) -> "Memory":
    return cls(np.zeros((0, dim), np.float32), np.zeros((0,), np.int32),
               np.zeros((0,), np.float64), np.zeros((0,), np.int64))


def answer_with_memory(memory: Memory, x, prediction: int, radius: float, idx: int):
  """The memory certificate of one point: (prediction, radius, memory with the answer added).

  Rests on one assumption: points are answered one at a time in a fixed order, and the memory
  of earlier answers is kept and consulted for every later one. Under it, the classifier that
  answers x by this rule returns `prediction` everywhere within `radius`, because stored balls
  of different classes never intersect:
    - x inside a stored ball of another class takes that ball's prediction, with the distance
      left to that ball's edge as its radius (a sub-ball of a ball already answered);
    - otherwise its per-σ radius is cut to min over stored balls of other classes of
      ‖x − x_j‖ − R_j, so its ball does not meet theirs.
  An abstaining point inside a stored ball takes that ball's answer too. Abstentions and zero
  radii are answered but not stored.
  """
  x = np.asarray(x, np.float32).reshape(-1)
  distance = np.linalg.norm(memory.points.astype(np.float64) - x, axis=1)
  inside = (memory.predictions != prediction) & (distance < memory.radii)
  slack = ROUNDING_MARGIN * (distance + memory.radii)  # relative to the lengths involved
  if inside.any():
    j = np.flatnonzero(inside)[np.argmax((memory.radii - distance)[inside])]
    prediction = int(memory.predictions[j])
    radius = float(memory.radii[j] - distance[j] - slack[j])
  elif prediction != ABSTAIN:
    other = memory.predictions != prediction
    if other.any():
      radius = min(radius, float(np.min((distance - memory.radii - slack)[other])))
  if prediction == ABSTAIN:
    return prediction, 0.0, memory
  radius = max(radius, 0.0)
  if radius > 0:
    memory = Memory(np.concatenate([memory.points, x[None]]),
                    np.append(memory.predictions, np.int32(prediction)),
                    np.append(memory.radii, radius), np.append(memory.ids, idx))
  return prediction, radius, memory


def append_memory(directory, memory: Memory, start: int) -> None:
  """Saves the entries memory[start:] as the next part of the memory in `directory`
  (storage/parts.py: each batch adds one part, so a run's I/O grows with what it answers, not
  with what it has answered before)."""
  if start < len(memory.ids):
    Parts(directory).append(**{k: v[start:] for k, v in memory._asdict().items()})


def load_memory(directory, dim: int, keep_ids=None) -> Memory:
  """The memory saved in `directory`, its parts in order (empty when there is none).

  With keep_ids, entries of other test points are dropped (a kill can save a batch's memory
  before its rows reach the results file), and the parts are rewritten as one."""
  parts = Parts(directory)
  loaded = [Memory(**part) for part in parts.load()]
  if not loaded:
    return Memory.empty(dim)
  memory = Memory(*(np.concatenate(column) for column in zip(*loaded)))
  if keep_ids is not None:
    keep = np.isin(memory.ids, np.fromiter(keep_ids, np.int64))
    first = np.zeros_like(keep)
    first[np.unique(memory.ids, return_index=True)[1]] = True
    if not (keep & first).all():  # a kill in a consolidation below can leave balls twice
      memory, old = Memory(*(column[keep & first] for column in memory)), parts.paths()
      append_memory(directory, memory, 0)  # then the old parts
      for path in old:
        path.unlink()
  return memory
