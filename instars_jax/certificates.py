"""What a reported radius means when σ may depend on the input, and one function per kind of
certificate behind one interface.

With σ chosen per input, the deployed classifier is G(x) = g_{σ(x)}(x). A radius certified for
g_{σ(x)} around x (`per_sigma`) says nothing about G at x' near x, since σ(x') may differ
(Súkeník, Kuvshinov & Günnemann, ICML 2022). Every results file names one of these kinds:

  fixed_sigma       Cohen et al.'s CERTIFY with one σ for every input (sound).
  locally_constant  σ from a grid chosen by a smoothed, certified σ-estimator; the radius is
                    where both the estimator and the class are certified (Dual Randomized
                    Smoothing, Sun, Mao & Vechev, ICLR 2026). Sound; the default.
  memory            per_sigma radii made consistent by a memory of answered balls
                    (Alfarra et al., "Data Dependent Randomized Smoothing", UAI 2022). Sound
                    only for the classifier that answers the queries in this order.
  per_sigma         Insta-RS as published: g_σ at the searched σ. NOT a certificate of G.

Every kind is a function `(context, x, ids) -> Certified` in `CERTIFIERS`; `Context` carries
the model, the key and the settings each kind reads.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np
from scipy import stats

from instars_jax import monte_carlo, search, smoothing

FIXED_SIGMA = "fixed_sigma"
PER_SIGMA = "per_sigma"
MEMORY = "memory"
LOCALLY_CONSTANT = "locally_constant"
INSTANCE_KINDS = (LOCALLY_CONSTANT, MEMORY, PER_SIGMA)

MEANING = {
    FIXED_SIGMA: "sound: Cohen et al. CERTIFY of the smoothed classifier g_sigma, one sigma for "
                 "every input",
    PER_SIGMA: "certifies g_sigma at the chosen sigma; not a certificate of the input-dependent "
               "classifier G(x) = g_sigma(x)(x) (Insta-RS as published; see Sukenik et al., "
               "ICML 2022)",
    MEMORY: "sound for the memory-based classifier that answers the test points in this file's "
            "order and keeps its memory (Alfarra et al., UAI 2022): certified balls of different "
            "classes never intersect",
    LOCALLY_CONSTANT: "sound for G(x) = g_sigma_e(x)(x) with a smoothed, certified sigma "
                      "estimator e (Dual Randomized Smoothing; e = the bin above 1/2, else "
                      "the smallest sigma): radius = min(estimator radius, class radius); "
                      "failure probability alpha = beta (estimator) + the class test's alpha",
}

# Radii derived from distances are shrunk by one part in a million, so that floating-point
# rounding can never turn two touching balls into overlapping ones.
_ROUNDING_MARGIN = 1e-6

PURPOSE_ESTIMATOR = 30
PURPOSE_CLASS = 31


class Certified(NamedTuple):
  """One kind's answer for a batch: prediction (ABSTAIN = -1), radius (0 on abstention), the
  σ the class was certified at, the class test's estimation samples, and the kind."""
  prediction: np.ndarray
  radius: np.ndarray
  sigma: np.ndarray
  num_samples: np.ndarray
  kind: str


@dataclasses.dataclass
class Context:
  """What the certificate kinds read. `search` (per_sigma, memory) holds search.search_sigma's
  parameters; `estimator_fn`, `grid`, `estimator_sigma`, `n_estimator` and `beta`
  (locally_constant) the σ-estimator; `memory` and `memory_dir` the memory's state;
  `sampling` the class test's sampling arguments of smoothing.certify (sampling, tolerance,
  radii)."""
  apply_fn: Callable
  num_classes: int
  key: jax.Array
  n0: int
  n: int
  alpha: float
  batch_size: int
  sigma: float = 0.0
  search: dict | None = None
  estimator_fn: Callable | None = None
  grid: tuple = ()
  estimator_sigma: float = 0.0
  n_estimator: int = 0
  beta: float = 0.0
  memory: "Memory | None" = None
  memory_dir: Path | None = None
  sampling: dict = dataclasses.field(default_factory=dict)


def fixed_sigma(ctx: Context, x, ids) -> Certified:
  """Cohen et al.'s CERTIFY at ctx.sigma for every input."""
  cert = smoothing.certify(ctx.apply_fn, x, ctx.sigma, ctx.key, n0=ctx.n0, n=ctx.n,
                           alpha=ctx.alpha, batch_size=ctx.batch_size,
                           num_classes=ctx.num_classes, ids=ids, **ctx.sampling)
  return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples, FIXED_SIGMA)


def per_sigma(ctx: Context, x, ids) -> Certified:
  """σ per input by the multi-start search (its own key), then CERTIFY at that σ with fresh
  samples. Certifies g_σ at that σ, not the input-dependent classifier."""
  sigma = search.search_sigma(ctx.apply_fn, x, jax.random.fold_in(ctx.key, smoothing.PURPOSE_SEARCH),
                              **ctx.search, n=ctx.n, alpha=ctx.alpha, batch_size=ctx.batch_size,
                              num_classes=ctx.num_classes, ids=ids)
  cert = smoothing.certify(ctx.apply_fn, x, sigma, ctx.key, n0=ctx.n0, n=ctx.n, alpha=ctx.alpha,
                           batch_size=ctx.batch_size, num_classes=ctx.num_classes, ids=ids,
                           **ctx.sampling)
  return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples, PER_SIGMA)


def memory(ctx: Context, x, ids) -> Certified:
  """The per_sigma answers passed through `answer_with_memory` in the order given; the new
  entries are appended to ctx.memory_dir."""
  answer = per_sigma(ctx, x, ids)
  stored, answers = len(ctx.memory.ids), []
  for point, p, r, i in zip(np.asarray(x), answer.prediction, answer.radius, ids):
    p, r, ctx.memory = answer_with_memory(ctx.memory, point, int(p), float(r), int(i))
    answers.append((p, r))
  append_memory(ctx.memory_dir, ctx.memory, stored)
  prediction, radius = (np.asarray(column) for column in zip(*answers))
  return Certified(prediction.astype(np.int32), radius.astype(np.float32), answer.sigma,
                   answer.num_samples, MEMORY)


def locally_constant(ctx: Context, x, ids) -> Certified:
  """`certify_locally_constant` with the context's estimator."""
  cert = certify_locally_constant(
      ctx.apply_fn, ctx.estimator_fn, x, ctx.key, sigma_grid=ctx.grid,
      sigma_estimator=ctx.estimator_sigma, n0=ctx.n0, n=ctx.n, n_estimator=ctx.n_estimator,
      alpha=ctx.alpha, beta=ctx.beta, batch_size=ctx.batch_size, num_classes=ctx.num_classes,
      ids=ids, sampling=ctx.sampling)
  return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples, LOCALLY_CONSTANT)


# ---------------------------------------------------------------------------
# memory


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
  if inside.any():
    j = np.flatnonzero(inside)[np.argmax((memory.radii - distance)[inside])]
    prediction = int(memory.predictions[j])
    radius = float(memory.radii[j] - distance[j]) * (1 - _ROUNDING_MARGIN)
  elif prediction != smoothing.ABSTAIN:
    other = memory.predictions != prediction
    if other.any():
      gap = float(np.min(distance[other] - memory.radii[other])) * (1 - _ROUNDING_MARGIN)
      radius = min(radius, gap)
  if prediction == smoothing.ABSTAIN:
    return prediction, 0.0, memory
  radius = max(radius, 0.0)
  if radius > 0:
    memory = Memory(np.concatenate([memory.points, x[None]]),
                    np.append(memory.predictions, np.int32(prediction)),
                    np.append(memory.radii, radius), np.append(memory.ids, idx))
  return prediction, radius, memory


def append_memory(directory, memory: Memory, start: int) -> None:
  """Saves the entries memory[start:] as the next part of the memory in `directory`.

  Each batch adds one part, written atomically, so a run's I/O grows with what it answers,
  not with what it has answered before."""
  if start >= len(memory.ids):
    return
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  part = directory / f"part_{len(list(directory.glob('part_*.npz'))):08d}.npz"
  tmp = directory / f".{part.name}.tmp.npz"
  np.savez(tmp, **{k: v[start:] for k, v in memory._asdict().items()})
  os.replace(tmp, part)


def load_memory(directory, dim: int, keep_ids=None) -> Memory:
  """The memory saved in `directory`, its parts in order (empty when there is none).

  With keep_ids, entries of other test points are dropped (a kill can save a batch's memory
  before its rows reach the results file), and the parts are rewritten as one."""
  directory = Path(directory)
  parts = sorted(directory.glob("part_*.npz")) if directory.is_dir() else []
  if not parts:
    return Memory.empty(dim)
  loaded = []
  for part in parts:
    with np.load(part) as f:
      loaded.append(Memory(**{k: f[k] for k in Memory._fields}))
  memory = Memory(*(np.concatenate(column) for column in zip(*loaded)))
  if keep_ids is not None:
    keep = np.isin(memory.ids, np.fromiter(keep_ids, np.int64))
    if not keep.all():
      memory = Memory(*(column[keep] for column in memory))
      for part in parts:
        part.unlink()
      append_memory(directory, memory, 0)
  return memory


def intersecting_pairs(points, predictions, radii) -> int:
  """How many pairs of certified balls of different predictions intersect (a sound
  certificate of one classifier admits none)."""
  points = np.asarray(points, np.float64).reshape(len(points), -1)
  keep = (np.asarray(predictions) != smoothing.ABSTAIN) & (np.asarray(radii) > 0)
  p, c, r = points[keep], np.asarray(predictions)[keep], np.asarray(radii, np.float64)[keep]
  distance = np.linalg.norm(p[:, None] - p[None], axis=-1)
  clash = (c[:, None] != c[None]) & (distance < r[:, None] + r[None])
  return int(np.triu(clash, 1).sum())


# ---------------------------------------------------------------------------
# locally_constant


class LocallyConstantCertificate(NamedTuple):
  prediction: np.ndarray  # int32[B], ABSTAIN where either test fails
  radius: np.ndarray  # float32[B]: min(estimator radius, class radius)
  sigma: np.ndarray  # float32[B]: the grid σ the estimator certified (bin 0 on abstention)
  estimator_radius: np.ndarray
  class_radius: np.ndarray
  num_samples: np.ndarray  # int64[B]: the class test's estimation samples


def certify_estimator(estimator_fn, x, key, *, sigma_estimator, n0, n, beta, batch_size,
                      num_bins, ids=None):
  """(bin int32[B], radius float32[B]) on which the smoothed estimator's choice ẽ is constant,
  bin = ABSTAIN where neither route below certifies it.

  ẽ(x) is the bin whose probability under N(0, σ_e²I) noise exceeds 1/2, or bin 0 (the
  smallest σ) when no bin's does. Two routes on the same n samples, with the failure budget β
  split by the union bound:
    decided    CERTIFY at β/2: bin k with p_k ≥ p_lower ≥ 1/2 and, by Cohen et al.'s
               Theorem 1, p_k(x') > 1/2 (so ẽ(x') = k) for ‖x' − x‖ < σ_e Φ⁻¹(p_lower);
    undecided  one-sided Clopper–Pearson upper bounds u_k, each at β/(2K): if every u_k < 1/2,
               the same theorem applied to each bin gives p_k(x') < 1/2 for all k, so
               ẽ(x') = 0, for ‖x' − x‖ < σ_e Φ⁻¹(1 − max_k u_k).
  The routes cannot both hold (a lower bound never exceeds an upper bound), and an input
  whose estimator is unsure gets the smallest σ with a radius instead of an abstention."""
  decided = smoothing.certify(estimator_fn, x, sigma_estimator, key, n0=n0, n=n, alpha=beta / 2,
                              batch_size=batch_size, num_classes=num_bins, ids=ids)
  counts = np.asarray(decided.counts)
  upper = monte_carlo.clopper_pearson_upper(counts, n, beta / (2 * num_bins))
  undecided = upper.max(axis=1) < 0.5
  bin_ = np.where(decided.prediction != smoothing.ABSTAIN, decided.prediction,
                  np.where(undecided, 0, smoothing.ABSTAIN)).astype(np.int32)
  undecided_radius = sigma_estimator * stats.norm.ppf(1.0 - np.minimum(upper.max(axis=1), 0.5))
  radius = np.where(decided.prediction != smoothing.ABSTAIN, decided.radius,
                    np.where(undecided, undecided_radius, 0.0))
  return bin_, radius.astype(np.float32)


def certify_locally_constant(apply_fn, estimator_fn, x, key, *, sigma_grid, sigma_estimator,
                             n0, n, n_estimator, alpha, beta, batch_size, num_classes,
                             ids=None, sampling=None) -> LocallyConstantCertificate:
  """A sound certificate for the input-dependent classifier G(x) = g_{σ_{ẽ(x)}}(x).

  `estimator_fn` maps inputs to logits over the K bins of `sigma_grid`; ẽ is its smoothed
  version at `sigma_estimator` (`certify_estimator`: the bin of probability above 1/2 under
  that noise, else the smallest σ).

  Guarantee (Sun, Mao & Vechev, ICLR 2026, Theorem: min of the two radii, failure α + β).
  `alpha` is the failure probability of the whole certificate; the estimator's tests run at
  β = `beta` and the class's at α − β. `certify_estimator` returns a bin k and R_e such that,
  with probability ≥ 1 − β, ẽ(x') = k for all ‖x' − x‖ < R_e. CERTIFY of the base classifier
  at σ_k returns c and R_c such that, with probability ≥ 1 − (α − β), g_{σ_k}(x') = c for all
  ‖x' − x‖ < R_c. By the union bound both hold with probability ≥ 1 − α, and then for every
  ‖x' − x‖ < min(R_e, R_c): G(x') = g_{σ_{ẽ(x')}}(x') = g_{σ_k}(x') = c. If either test
  abstains, so does G's certificate. The tests use independent noise. `sampling` (a dict of
  smoothing.certify's sampling arguments) applies to the class test; the estimator's test
  draws its fixed n_estimator samples.
  """
  sigma_grid = np.asarray(sigma_grid, np.float32)
  if sigma_grid.ndim != 1 or len(sigma_grid) < 2 or np.any(sigma_grid <= 0):
    raise ValueError(f"sigma_grid must list at least two positive σ; got {sigma_grid}")
  if not 0 < beta < alpha:
    raise ValueError(f"beta must lie in (0, alpha={alpha}); got {beta}")
  bin_, estimator_radius = certify_estimator(
      estimator_fn, x, jax.random.fold_in(key, PURPOSE_ESTIMATOR), sigma_estimator=sigma_estimator,
      n0=n0, n=n_estimator, beta=beta, batch_size=batch_size, num_bins=len(sigma_grid), ids=ids)
  selected = bin_ != smoothing.ABSTAIN
  sigma = sigma_grid[np.where(selected, bin_, 0)]
  cls = smoothing.certify(apply_fn, x, sigma, jax.random.fold_in(key, PURPOSE_CLASS), n0=n0,
                          n=n, alpha=alpha - beta, batch_size=batch_size,
                          num_classes=num_classes, ids=ids, **(sampling or {}))
  certified = selected & (cls.prediction != smoothing.ABSTAIN)
  radius = np.where(certified, np.minimum(estimator_radius, cls.radius), 0.0)
  prediction = np.where(certified, cls.prediction, smoothing.ABSTAIN).astype(np.int32)
  return LocallyConstantCertificate(prediction, radius.astype(np.float32), sigma,
                                    estimator_radius, cls.radius, cls.num_samples)


CERTIFIERS = {FIXED_SIGMA: fixed_sigma, LOCALLY_CONSTANT: locally_constant, MEMORY: memory,
              PER_SIGMA: per_sigma}
