"""Certificate kinds: what a reported radius means when σ may depend on the input.

With σ chosen per input, the deployed classifier is G(x) = g_{σ(x)}(x). A radius certified for
g_{σ(x)} around x says nothing about G at x' near x, since σ(x') may differ (Súkeník,
Kuvshinov & Günnemann, ICML 2022). Every results file names the kind that made it, and each
kind is one module of this package, named after it and found by name from the config (as
big_vision finds its models): its docstring states what its radius certifies, how its
failure probability is split, and the proof or its source.

A kind module declares
  NAME, SOUND, MEANING       its name (its file's: NAME = __name__.rpartition(".")[2]);
                             whether its radius certifies the classifier it deploys; what the
                             radius certifies (written into every results file)
  DEFAULTS, SECTION          optional: a literal dict, its config section certify.<SECTION>
                             (default: its name) with defaults, gathered by configs/default.py
  MULTI_HOST                 whether hosts may certify disjoint shares of the test set
  validate(config)           ValueError naming a bad value of its own settings
  sigmas(config)             the σ its class test may certify at (None: any, found by search),
                             which σ experts (selection/experts.py) must cover
  file_stem(config)          its default results file name
  metadata(config, workdir)  its settings, recorded in the results' metadata
  prepare(smoothed, config)       -> certify(x, ids) -> Certified, for one batch of test images
Adding a kind is one new module here (found by name: certify.certificate=<file name>), or
a module anywhere on the path, named by its dotted path (certify.certificate=my_pkg.my_kind);
one with a section of its own declares FAMILY = "instars_jax.certificates" and is named to
the config (--config=configs/default.py:my_pkg.my_kind; plugins.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from instars_jax import plugins
from instars_jax.smoothing import sampler

FIXED = "fixed_sigma"  # what sigma_mode = fixed certifies
# fixed: certify.sigma | grid: fixed σ at each σ of the grid, a file each | instance: a kind
SIGMA_MODES = ("fixed", "grid", "instance")
INTERFACE = ("NAME", "SOUND", "MEANING", "MULTI_HOST", "validate", "sigmas", "file_stem",
             "metadata", "prepare")

# Radii derived from distances are shrunk by one part in a million of the lengths involved
# (the distance and the stored radius), so that floating-point rounding can never turn two
# touching balls into overlapping ones.
ROUNDING_MARGIN = 1e-6


class Certified(NamedTuple):
  """One kind's answer for a batch: prediction (ABSTAIN = -1), radius (0 on abstention), the
  σ the class was certified at, and the class test's estimation samples."""
  prediction: np.ndarray
  radius: np.ndarray
  sigma: np.ndarray
  num_samples: np.ndarray


@dataclasses.dataclass(frozen=True)
class SmoothedModel:
  """What every kind gets of the certification run: the base model, the run's key and
  CERTIFY settings (n0, n, α, batch, the sequential stopping rule or None), and where the
  run lives (its Workdir, its results file and the test indices already written there)."""
  apply_fn: Callable
  num_classes: int
  key: jax.Array
  n0: int
  n: int
  alpha: float
  batch_size: int
  rule: object = None  # sequential/rules.py's RadiusRule or DecisionRule; None: fixed n
  workdir: object = None  # storage/workdir.Workdir
  results_path: Path | None = None
  done: frozenset = frozenset()
  image_size: int = 0  # values per image (the memory's width)
  experts: dict = dataclasses.field(default_factory=dict)  # {float32 σ: fn}; {}: apply_fn at every σ
  # The results' metadata: the checkpoints to load (the estimator's or the router nodes' "step").
  metadata: dict = dataclasses.field(default_factory=dict)

  def model_at(self, sigma) -> Callable:
    """The classifier smoothed at `sigma`: its σ expert (selection/experts.py), or the base
    model when the run has none; ValueError for a σ off the experts' grid."""
    if not self.experts:
      return self.apply_fn
    try:
      return self.experts[np.float32(sigma)]
    except KeyError:
      raise ValueError(f"no σ expert for σ = {float(sigma):g}; the experts cover "
                       f"{sorted(float(s) for s in self.experts)}") from None

  def certify(self, x, sigma, ids, *, key=None, alpha=None) -> sampler.Certificate:
    """CERTIFY at `sigma` (a scalar or one σ per input) with this run's settings, each input
    by the classifier `model_at` its σ; `key` and `alpha` default to the run's. The noise of
    input i depends only on (key, ids[i]), so certifying the inputs of each σ apart gives
    the same counts as one call."""
    x, sigma, ids = sampler.validate_instances(x, sigma, ids)
    settings = dict(n0=self.n0, n=self.n, alpha=self.alpha if alpha is None else alpha,
                    batch_size=self.batch_size, num_classes=self.num_classes, rule=self.rule)
    key = self.key if key is None else key
    if not self.experts:
      return sampler.certify(self.apply_fn, x, sigma, key, ids=ids, **settings)
    parts = {}
    for s in np.unique(sigma):
      rows = padded_rows(np.flatnonzero(sigma == s))
      parts[s] = sampler.certify(self.model_at(s), x[rows], s, key, ids=ids[rows], **settings)
    return sampler.Certificate(*(stitch(sigma, {s: cert[i] for s, cert in parts.items()})
                                 for i in range(len(sampler.Certificate._fields))))


def padded_rows(rows: np.ndarray) -> np.ndarray:
  """`rows` padded with copies of its first to a power-of-two length, so that the shrinking or
  splitting sets of inputs that reach a sampler share a few compiled programs (cut the
  results back to len(rows))."""
  size = 1 << max(0, len(rows) - 1).bit_length()
  return np.concatenate([rows, np.full(size - len(rows), rows[0], rows.dtype)])


def stitch(sigma, by_sigma: dict) -> np.ndarray:
  """One array over all inputs from the per-σ arrays (padded) of the inputs at each σ."""
  first = next(iter(by_sigma.values()))
  out = np.zeros((len(sigma),) + first.shape[1:], first.dtype)
  for s, values in by_sigma.items():
    out[sigma == s] = values[: np.count_nonzero(sigma == s)]
  return out


def kinds() -> list:
  """The kinds of this package, by name (its modules not named with a leading underscore)."""
  return plugins.names(__name__)


def instance_kinds() -> list:
  return [name for name in kinds() if name != FIXED]


def name_of(config) -> str:
  """The kind config.certify selects: fixed_sigma (sigma_mode fixed or grid), or with
  sigma_mode = instance certify.certificate; ValueError naming a bad value."""
  c = config.certify
  if c.sigma_mode not in SIGMA_MODES:
    raise ValueError(f"certify.sigma_mode must be one of {SIGMA_MODES}; got {c.sigma_mode!r}")
  if c.sigma_mode != "instance":
    return FIXED
  if "." not in c.certificate and c.certificate not in instance_kinds():
    raise ValueError(f"certify.certificate must be one of {instance_kinds()} or a dotted "
                     f"module path; got {c.certificate!r}")
  return c.certificate


def get(name: str):
  """The module of the kind `name` (a module of this package, or a dotted module path),
  checked to declare the interface; ValueError otherwise."""
  if "." not in name and name not in kinds():
    raise ValueError(f"unknown certificate kind {name!r}; known: {kinds()}")
  try:
    kind = plugins.load(__name__, name)
  except ImportError as error:
    raise ValueError(f"cannot import the certificate kind {name!r}: {error}") from None
  missing = [attribute for attribute in INTERFACE if not hasattr(kind, attribute)]
  if missing:
    raise ValueError(f"{name!r} is not a certificate kind: it lacks {', '.join(missing)}")
  return kind


def for_config(config):
  """The module of the kind config.certify selects, its own settings validated."""
  kind = get(name_of(config))
  kind.validate(config)
  return kind


def intersecting_pairs(points, predictions, radii) -> int:
  """How many pairs of certified balls of different predictions intersect (a sound
  certificate of one classifier admits none)."""
  points = np.asarray(points, np.float64).reshape(len(points), -1)
  keep = (np.asarray(predictions) != sampler.ABSTAIN) & (np.asarray(radii) > 0)
  p, c, r = points[keep], np.asarray(predictions)[keep], np.asarray(radii, np.float64)[keep]
  distance = np.linalg.norm(p[:, None] - p[None], axis=-1)
  clash = (c[:, None] != c[None]) & (distance < r[:, None] + r[None])
  return int(np.triu(clash, 1).sum())
