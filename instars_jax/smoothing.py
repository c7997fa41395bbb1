"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): Monte Carlo counts, CERTIFY, PREDICT.

The smoothed classifier is g(x) = argmax_c P[f(x + ε) = c], ε ~ N(0, σ²I). Everything here
is batched over instances: `x` is float32[B, ...], `sigma` a scalar or float32[B], and
`apply_fn` maps a batch of inputs [b, ...] to logits [b, C].

Noise for instance i and sample j is a pure function of (key, ids[i], j), so counts do not
depend on batch size, on how instances are grouped into calls, or on the device count.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from instars_jax import parallel, sequential
from instars_jax.monte_carlo import certified_radius, clopper_pearson_lower, instance_noise

ABSTAIN = -1

# Independent streams for each use of a key, so no two purposes ever share noise.
PURPOSE_SELECT = 0
PURPOSE_ESTIMATE = 1
PURPOSE_PREDICT = 2
PURPOSE_SEARCH = 3


class Certificate(NamedTuple):
  """The result of `certify` for a batch of instances (host numpy arrays)."""
  prediction: np.ndarray  # int32[B], ABSTAIN where no class could be certified
  radius: np.ndarray  # float32[B], 0 on abstention
  p_lower: np.ndarray  # float64[B], lower confidence bound on p_A (decision mode: Φ(r/σ) of the
  #                      radius proven, 0 where none is)
  sigma: np.ndarray  # float32[B], the noise level certified at
  counts: np.ndarray  # int32[B, C], counts of the estimation samples
  num_samples: np.ndarray  # int64[B], estimation samples drawn (n with sampling="fixed")


# ---------------------------------------------------------------------------
# Monte Carlo sampling


def local_counts(x, sigma, ids, key, *, apply_fn, num, chunk, num_classes):
  """Counts for the instances on one device, `chunk` samples per instance per forward pass.

  `sigma` is float32[b], or float32[K, b] for K noise levels that share every ε (common
  random numbers, one noise draw for all K); the counts are then int32[K, b, C].
  """
  b, shape = x.shape[0], x.shape[1:]
  levels = sigma.reshape((-1, b) + (1,) * (len(shape) + 1))

  def add_chunk(c, counts):
    sample_ids = c * chunk + jnp.arange(chunk)
    eps = jax.vmap(instance_noise, in_axes=(None, 0, None, None))(key, ids, sample_ids, shape)
    noisy = x[None, :, None] + levels * eps[None]
    logits = apply_fn(noisy.reshape((-1,) + shape))
    predictions = jnp.argmax(logits, axis=-1).reshape(-1, b, chunk)
    hits = jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
    return counts + jnp.sum(hits * (sample_ids < num)[None, None, :, None], axis=2)

  num_chunks = -(-num // chunk)
  initial = jnp.zeros((levels.shape[0], b, num_classes), jnp.int32)
  counts = jax.lax.fori_loop(0, num_chunks, add_chunk, initial)
  return counts.reshape(sigma.shape + (num_classes,))


@functools.partial(jax.jit, static_argnames=("apply_fn", "num", "chunk", "num_classes", "mesh"))
def _sharded_counts(x, sigma, ids, key, *, apply_fn, num, chunk, num_classes, mesh):
  local = functools.partial(local_counts, apply_fn=apply_fn, num=num, chunk=chunk,
                            num_classes=num_classes)
  return parallel.shard_instances(local, mesh, num_sharded=3, num_replicated=1)(x, sigma, ids, key)


def samples_per_pass(batch_size: int, instances_per_device: int, num: int) -> int:
  """Samples of each instance in one forward pass so that a pass holds about `batch_size` images."""
  return max(1, min(num, batch_size // instances_per_device))


def _counts(apply_fn, x, sigma, ids, key, *, num, batch_size, num_classes):
  """`sample_counts` on validated host arrays: pads to the device count, shards, unpads."""
  mesh = parallel.local_data_mesh()
  devices = mesh.devices.size
  padded = [parallel.pad_rows(a, devices) for a in (x, sigma, ids)]
  chunk = samples_per_pass(batch_size, len(padded[0]) // devices, num)
  counts = _sharded_counts(*padded, key, apply_fn=apply_fn, num=num, chunk=chunk,
                           num_classes=num_classes, mesh=mesh)
  return counts[: len(x)]


def sample_counts(apply_fn: Callable, x, sigma, key, *, num: int, batch_size: int,
                  num_classes: int, ids=None) -> jax.Array:
  """int32[B, C]: counts of argmax apply_fn(x_i + σ_i ε) over `num` samples per instance.

  `batch_size` is the number of noisy images in one forward pass on one device; each pass
  holds every local instance with batch_size // instances-per-device samples of each.
  """
  x, sigma, ids = validate_instances(x, sigma, ids)
  check_positive_ints(num=num, batch_size=batch_size)
  check_model(apply_fn, x, num_classes)
  return _counts(apply_fn, x, sigma, ids, key, num=num, batch_size=batch_size,
                 num_classes=num_classes)


# ---------------------------------------------------------------------------
# CERTIFY and PREDICT


def certify(apply_fn: Callable, x, sigma, key, *, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, batch_size: int, num_classes: int, ids=None,
            sampling: str = "fixed", tolerance: float = 0.05, radii=(),
            tolerance_alpha: float = sequential.TOLERANCE_ALPHA) -> Certificate:
  """CERTIFY of Cohen et al. (2019), for a batch of instances.

  Guarantee: for each instance, with probability at least 1 − α over the sampling, if the
  prediction is not ABSTAIN then the smoothed classifier g at that σ returns `prediction`
  at every x' with ‖x' − x‖₂ < radius.

  sampling="fixed" draws n estimation samples per instance. sampling="sequential" draws up
  to n (n_max) and stops early (sequential.py): with `radii` empty when the radius is within
  a factor (1 − tolerance) of the best still reachable, else once "radius ≥ r_k" is proven,
  or out of reach by n_max, for every r_k in `radii`, reporting the largest r_k proven.
  "Reachable" assumes p_A below its upper bound at level tolerance_alpha (0: α), which only
  decides when to stop. Radius mode's lower bound holds at every look simultaneously (a
  union bound over the looks); decision mode's tests of "p_A ≥ Φ(r_k/σ)" hold at every look
  by Ville's inequality, in a fixed order that lets each use the whole α (sequential.py);
  so the guarantee above is unchanged.
  In both, the class comes from n0 separate selection samples; `num_samples` counts the
  estimation samples drawn, and `counts` is over those samples.
  """
  x, sigma, ids = validate_instances(x, sigma, ids)
  check_positive_ints(n0=n0, n=n, batch_size=batch_size)
  check_alpha(alpha)
  rule = check_sampling(sampling, tolerance, radii, n0=n0, n=n, tolerance_alpha=tolerance_alpha)
  check_model(apply_fn, x, num_classes)
  count = functools.partial(_counts, apply_fn, x, sigma, ids, batch_size=batch_size,
                            num_classes=num_classes)

  selection = count(jax.random.fold_in(key, PURPOSE_SELECT), num=n0)
  guess = np.asarray(jnp.argmax(selection, axis=1)).astype(np.int32)
  estimation_key = jax.random.fold_in(key, PURPOSE_ESTIMATE)
  rows = np.arange(len(x))
  if rule is None:
    estimation = np.asarray(count(estimation_key, num=n))
    num_samples = np.full(len(x), n, np.int64)
    p_lower = clopper_pearson_lower(estimation[rows, guess], n, alpha)
    radius = certified_radius(np.maximum(p_lower, 0.5), sigma)
  else:
    estimation, num_samples, look, level = sequential.run(
        apply_fn, x, sigma, ids, guess, estimation_key, n_max=n, alpha=alpha,
        batch_size=batch_size, num_classes=num_classes, rule=rule)
    p_lower, radius = rule.certify(estimation[rows, guess], num_samples, look, level, sigma, n,
                                   alpha)

  certified = p_lower >= 0.5
  prediction = np.where(certified, guess, ABSTAIN).astype(np.int32)
  radius = np.where(certified, radius, 0.0)
  return Certificate(prediction, radius.astype(np.float32), p_lower, sigma, estimation,
                     num_samples.astype(np.int64))


def predict(apply_fn: Callable, x, sigma, key, *, n: int, alpha: float, batch_size: int,
            num_classes: int, ids=None) -> np.ndarray:
  """PREDICT of Cohen et al. (2019), for a batch of instances.

  Guarantee: for each instance, the probability of returning a class other than g(x)
  (rather than the class or ABSTAIN) is at most α.
  """
  x, sigma, ids = validate_instances(x, sigma, ids)
  check_positive_ints(n=n, batch_size=batch_size)
  check_alpha(alpha)
  check_model(apply_fn, x, num_classes)
  counts = np.asarray(_counts(apply_fn, x, sigma, ids, jax.random.fold_in(key, PURPOSE_PREDICT),
                              num=n, batch_size=batch_size, num_classes=num_classes))
  top_two = np.argsort(-counts, axis=1, kind="stable")[:, :2]
  n_a = counts[np.arange(len(x)), top_two[:, 0]]
  n_b = counts[np.arange(len(x)), top_two[:, 1]]
  p_values = np.array([stats.binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(n_a, n_b)])
  return np.where(p_values <= alpha, top_two[:, 0], ABSTAIN).astype(np.int32)


# ---------------------------------------------------------------------------
# Input checks: each raises ValueError naming the argument, before anything compiles.


def validate_instances(x, sigma, ids=None):
  """Host copies of (x float32[B, ...], sigma float32[B], ids int32[B]), checked."""
  x = np.asarray(x, np.float32)
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"x must have shape [B, ...] with B >= 1; got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("x contains NaN or inf")
  batch = x.shape[0]
  sigma = np.asarray(sigma, np.float32)
  if sigma.ndim == 0:
    sigma = np.full((batch,), sigma, np.float32)
  if sigma.shape != (batch,):
    raise ValueError(f"sigma must be a scalar or have shape ({batch},) to match x; "
                     f"got shape {sigma.shape}")
  if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
    raise ValueError(f"sigma must be finite and > 0; got min {np.min(sigma)}")
  ids = np.arange(batch, dtype=np.int32) if ids is None else np.asarray(ids)
  if ids.shape != (batch,) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids must be integers of shape ({batch},) to match x; "
                     f"got {ids.dtype} of shape {ids.shape}")
  return x, sigma, ids.astype(np.int32)


SAMPLINGS = ("fixed", "sequential")


def check_sampling(sampling, tolerance, radii, *, n0, n, tolerance_alpha):
  """None for fixed sampling, else the sequential stopping rule; ValueError on bad values."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"sampling must be one of {SAMPLINGS}; got {sampling!r}")
  if sampling == "fixed":
    return None
  if n < n0:
    raise ValueError(f"n must be >= n0 with sequential sampling (n is n_max); got n={n} < n0={n0}")
  return sequential.make_rule(tolerance, radii, tolerance_alpha)


def check_alpha(alpha):
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1); got {alpha}")


def check_positive_ints(**values):
  for name, value in values.items():
    if int(value) != value or value < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {value}")


def check_model(apply_fn, x, num_classes):
  """Traces (never compiles) apply_fn on one input to check it returns logits [b, num_classes]."""
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f"num_classes must be an integer >= 2; got {num_classes}")
  probe = jax.ShapeDtypeStruct((2,) + x.shape[1:], jnp.float32)
  try:
    out = jax.eval_shape(apply_fn, probe)
  except Exception as error:
    raise ValueError(f"apply_fn cannot take inputs of shape [b, {', '.join(map(str, x.shape[1:]))}] "
                     f"(from x): {error}") from error
  if out.shape != (2, num_classes):
    raise ValueError(f"apply_fn must map [b, ...] to logits [b, num_classes={num_classes}]; "
                     f"it maps {probe.shape} to {out.shape}")
