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

from instars_jax import parallel
from instars_jax.smoothing.bounds import certified_radius, clopper_pearson_lower, instance_noise
from instars_jax.smoothing.sequential import engine
from instars_jax.smoothing.streams import Stream

ABSTAIN = -1


class Certificate(NamedTuple):
  """The result of `certify` for a batch of instances (host numpy arrays)."""
  prediction: np.ndarray  # int32[B], ABSTAIN where no class could be certified
  radius: np.ndarray  # float64[B], 0 on abstention (float64 to the results file: a float32
  #                    radius could round up above the one proven)
  p_lower: np.ndarray  # float64[B], lower confidence bound on p_A (decision mode: Φ(r/σ) of the
  #                      radius proven, 0 where none is)
  sigma: np.ndarray  # float32[B], the noise level certified at
  counts: np.ndarray  # int32[B, C], counts of the estimation samples
  num_samples: np.ndarray  # int64[B], estimation samples drawn (n without a stopping rule)


# ---------------------------------------------------------------------------
# Monte Carlo sampling


def local_counts(x, sigma, ids, key, num, *, apply_fn, chunk, num_classes):
  """Counts for the instances on one device over `num` samples each (a traced scalar, so one
  program serves every sample count), `chunk` samples per instance per forward pass.

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

  num_chunks = (num + chunk - 1) // chunk
  initial = jnp.zeros((levels.shape[0], b, num_classes), jnp.int32)
  counts = jax.lax.fori_loop(0, num_chunks, add_chunk, initial)
  return counts.reshape(sigma.shape + (num_classes,))


def samples_per_pass(batch_size: int, instances_per_device: int, num: int) -> int:
  """Samples of each instance in one forward pass so that a pass holds about `batch_size` images."""
  return max(1, min(num, batch_size // instances_per_device))


def counts(apply_fn, x, sigma, ids, key, *, num, batch_size, num_classes):
  """`sample_counts` on validated host arrays, sharded over this host's devices."""
  chunk = samples_per_pass(batch_size, parallel.per_device(len(x)), num)
  return parallel.map_instances(local_counts, (x, sigma, ids), (key, np.int32(num)),
                                apply_fn=apply_fn, chunk=chunk, num_classes=num_classes)


def sample_counts(apply_fn: Callable, x, sigma, key, *, num: int, batch_size: int,
                  num_classes: int, ids=None) -> jax.Array:
  """int32[B, C]: counts of argmax apply_fn(x_i + σ_i ε) over `num` samples per instance.

  `batch_size` is the number of noisy images in one forward pass on one device; each pass
  holds every local instance with batch_size // instances-per-device samples of each.
  """
  x, sigma, ids = validate_instances(x, sigma, ids)
  check_positive_ints(num=num, batch_size=batch_size)
  check_model(apply_fn, x, num_classes)
  return counts(apply_fn, x, sigma, ids, key, num=num, batch_size=batch_size,
                num_classes=num_classes)


# ---------------------------------------------------------------------------
# CERTIFY and PREDICT


def certify(apply_fn: Callable, x, sigma, key, *, n0: int = 100, n: int = 100_000,
            alpha: float = 0.001, batch_size: int, num_classes: int, ids=None,
            rule=None) -> Certificate:
  """CERTIFY of Cohen et al. (2019), for a batch of instances.

  Guarantee: for each instance, with probability at least 1 − α over the sampling, if the
  prediction is not ABSTAIN then the smoothed classifier g at that σ returns `prediction`
  at every x' with ‖x' − x‖₂ < radius.

  Ties: a lower bound of exactly 1/2 answers, with radius 0 (the package's one tie rule;
  the instance-wise kinds follow it). Radii are float64 up to the results file, which rounds
  them down.

  Without a `rule`, n estimation samples per instance and a one-sided Clopper–Pearson bound.
  With a stopping rule (sequential/rules.py: RadiusRule, DecisionRule) up to n (n_max),
  stopping early; its bounds and tests hold at every look it may stop at (a union bound, or
  Ville's inequality), so the guarantee above is unchanged (docs/sequential.md). Either
  way the class comes from n0 separate selection samples; `num_samples` counts the
  estimation samples drawn, and `counts` is over those samples.
  """
  x, sigma, ids = validate_instances(x, sigma, ids)
  check_positive_ints(n0=n0, n=n, batch_size=batch_size)
  check_alpha(alpha)
  if rule is not None and n < n0:
    raise ValueError(f"n must be >= n0 with sequential sampling (n is n_max); got n={n} < n0={n0}")
  check_model(apply_fn, x, num_classes)
  count = functools.partial(counts, apply_fn, x, sigma, ids, batch_size=batch_size,
                            num_classes=num_classes)

  selection = count(jax.random.fold_in(key, Stream.SELECT), num=n0)
  guess = np.asarray(jnp.argmax(selection, axis=1)).astype(np.int32)
  estimation_key = jax.random.fold_in(key, Stream.ESTIMATE)
  rows = np.arange(len(x))
  if rule is None:
    estimation = np.asarray(count(estimation_key, num=n))
    num_samples = np.full(len(x), n, np.int64)
    p_lower = clopper_pearson_lower(estimation[rows, guess], n, alpha)
    radius = certified_radius(np.maximum(p_lower, 0.5), sigma)
  else:
    estimation, num_samples, look, level = engine.sample(
        apply_fn, x, sigma, ids, guess, estimation_key, n_max=n, alpha=alpha,
        batch_size=batch_size, num_classes=num_classes, rule=rule)
    p_lower, radius = rule.certify(estimation[rows, guess], num_samples, look, level, sigma, n,
                                   alpha)

  certified = p_lower >= 0.5
  prediction = np.where(certified, guess, ABSTAIN).astype(np.int32)
  radius = np.where(certified, radius, 0.0)
  return Certificate(prediction, np.asarray(radius, np.float64), p_lower, sigma, estimation,
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
  tally = np.asarray(counts(apply_fn, x, sigma, ids, jax.random.fold_in(key, Stream.PREDICT),
                            num=n, batch_size=batch_size, num_classes=num_classes))
  top_two = np.argsort(-tally, axis=1, kind="stable")[:, :2]
  n_a = tally[np.arange(len(x)), top_two[:, 0]]
  n_b = tally[np.arange(len(x)), top_two[:, 1]]
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
