"""Insta-RS at test time: choose a noise level σ for each instance by a multi-start search.

The objective is the radius the final CERTIFY would report at σ,

    R(σ) = σ · Φ⁻¹( CP_lower( p̂_A(σ) · n, n, α ) ),

with p̂_A(σ) the top-class frequency among the search's own noisy samples at σ, and the
final n and α plugged in: the Clopper–Pearson cap (p_lower ≤ α^(1/n), about 3.8σ at
n = 100k, α = 0.001) stops a tiny σ with p̂_A = 1 from winning by default. p̂_A takes only the
values c/m (m samples per evaluation), so CP_lower is tabulated with scipy once per (m, n, α).

The search's samples never feed a certificate: CERTIFY at the chosen σ draws fresh ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import parallel
from instars_jax.smoothing import bounds, sampler

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618...
ESTIMATE_ALPHA = 0.01  # caution in the search's own estimate of p_A; see bounds.radius_factors


def objective(x, sigma, ids, key, factors, *, apply_fn, samples, chunk, num_classes):
  """R at σ per instance, from `samples` noisy samples drawn from `key`, for the top class at
  σ. `sigma` may be float32[K, b]: K levels scored on one draw of noise.

  Noise depends on (key, id, j) only, so calls with the same key use the same ε at every σ
  (common random numbers)."""
  counts = sampler.local_counts(x, sigma, ids, key, samples, apply_fn=apply_fn, chunk=chunk,
                                num_classes=num_classes)
  return sigma * factors[jnp.max(counts, axis=-1)]


def _golden_offset(lo, hi):
  return jnp.round(GOLDEN * (hi - lo)).astype(jnp.int32)


def golden_section(evaluate, size, batch, steps, edge_low=False, edge_high=False):
  """Maximizes evaluate(i) over lattice points i in [0, size) (per instance) with `steps`
  evaluations; returns the best index evaluated and its value.

  Golden section only ever evaluates interior points, so a maximum at an end of the range
  (R(σ) still growing at σ_max) would be missed by a fraction of the bracket. Where
  `edge_low` / `edge_high` say that index 0 / size − 1 is an end of the whole search range,
  the last step evaluates that end instead of a golden point whenever the bracket still
  reaches it on the side of the better point: the same number of evaluations.

  Positions are integers, so the search takes the same path whatever the batch shape or
  device count (transcendental functions may round differently in vectorized code)."""
  lo, hi = jnp.zeros((batch,), jnp.int32), jnp.full((batch,), size - 1, jnp.int32)
  x1, x2 = hi - _golden_offset(lo, hi), lo + _golden_offset(lo, hi)
  f1, f2 = evaluate(x1), evaluate(x2)
  best_x, best_f = jnp.where(f2 > f1, x2, x1), jnp.maximum(f1, f2)
  last = steps - 3

  def step(i, carry):
    lo, hi, x1, x2, f1, f2, best_x, best_f = carry
    left = f1 >= f2  # the maximum lies in [lo, x2]; otherwise in [x1, hi]
    lo, hi = jnp.where(left, lo, x1), jnp.where(left, x2, hi)
    new_x = jnp.where(left, hi - _golden_offset(lo, hi), lo + _golden_offset(lo, hi))
    to_low = (i == last) & edge_low & left & (lo == 0)
    to_high = (i == last) & edge_high & ~left & (hi == size - 1)
    new_x = jnp.where(to_low, 0, jnp.where(to_high, size - 1, new_x))
    new_f = evaluate(new_x)
    x1, f1, x2, f2 = (jnp.where(left, new_x, x2), jnp.where(left, new_f, f2),
                      jnp.where(left, x1, new_x), jnp.where(left, f1, new_f))
    improved = new_f > best_f
    return (lo, hi, x1, x2, f1, f2, jnp.where(improved, new_x, best_x),
            jnp.where(improved, new_f, best_f))

  carry = jax.lax.fori_loop(0, steps - 2, step, (lo, hi, x1, x2, f1, f2, best_x, best_f))
  return carry[-2], carry[-1]


LATTICE = 4097  # σ values per start bracket, log-spaced


def start_lattices(sigma_min: float, sigma_max: float, starts: int) -> np.ndarray:
  """float32[starts, LATTICE]: the σ values each start may visit, log-spaced over a bracket.

  Bracket centres are spread geometrically over [σ_min, σ_max], each bracket reaching its
  neighbours' centres (one start: the whole range)."""
  lo, hi = math.log(sigma_min), math.log(sigma_max)
  width = (hi - lo) / starts
  centres = lo + (np.arange(starts) + 0.5) * width
  lows, highs = np.maximum(centres - width, lo), np.minimum(centres + width, hi)
  lattices = np.exp(np.linspace(lows, highs, LATTICE, axis=1))
  return np.clip(lattices, sigma_min, sigma_max).astype(np.float32)


def _local_search(x, ids, key, factors, lattices, *, apply_fn, samples, chunk, num_classes,
                  steps):
  """The best σ per instance over all starts (by R on fresh samples); start k uses its own
  common random numbers."""
  b = x.shape[0]

  def one_start(best, start):
    k, lattice = start
    evaluator = lambda stream: lambda i: objective(
        x, lattice[i], ids, jax.random.fold_in(key, stream), factors, apply_fn=apply_fn,
        samples=samples, chunk=chunk, num_classes=num_classes)
    index, _ = golden_section(evaluator(2 * k), lattice.shape[0], b, steps - 1,
                              edge_low=k == 0, edge_high=k == len(lattices) - 1)
    radius = evaluator(2 * k + 1)(index)  # fresh samples: no winner's curse across starts
    better = radius > best[1]
    return (jnp.where(better, lattice[index], best[0]), jnp.where(better, radius, best[1])), None

  initial = (jnp.zeros((b,)), jnp.full((b,), -jnp.inf))
  (sigma, _), _ = jax.lax.scan(one_start, initial, (jnp.arange(len(lattices)), lattices))
  return sigma


def default_samples_per_step(n: int, starts: int, steps: int) -> int:
  """The samples per evaluation that keep the whole search within 10% of n."""
  return max(1, int(0.1 * n) // max(1, starts * steps))


def search_budget(starts: int, steps: int, samples_per_step: int) -> int:
  """Noisy samples the search draws per instance."""
  return starts * steps * samples_per_step


def search_sigma(apply_fn, x, key, *, sigma_min: float, sigma_max: float, starts: int = 4,
                 steps: int = 6, samples_per_step: int | None = None, n: int = 100_000,
                 alpha: float = 0.001, estimate_alpha: float = ESTIMATE_ALPHA,
                 batch_size: int, num_classes: int, ids=None):
  """float32[B]: the σ in [sigma_min, sigma_max] chosen for each instance (Insta-RS).

  Multi-start search: `starts` brackets in log σ, centred geometrically over the range and
  overlapping their neighbours. In each, a golden-section ascent of R(σ) with steps − 1
  evaluations on one set of noise (the lowest and highest starts spend their last step on
  σ_min / σ_max when the ascent heads there), then one evaluation of its end point on fresh noise; the
  start whose end point scores best on that fresh evaluation wins. Every evaluation uses
  `samples_per_step` samples, so the search draws starts × steps × samples_per_step per
  instance (default samples_per_step: the whole search uses ≤ 10% of n).

  Why golden section: p̂_A(σ) counts hard argmax decisions, so R(σ) is piecewise constant in
  σ and has no useful gradient; a soft surrogate would optimise a different function. Golden
  section needs no derivative, spends one evaluation per step after the first two, shrinks
  the bracket by 0.618 each step, and with common random numbers (one ε per start, reused at
  every σ) each comparison is between the same samples. It finds the maximum of a unimodal
  function; the starts cover objectives with several local maxima. Judging the starts on
  fresh samples, and estimating p_A cautiously (`estimate_alpha`, see `bounds.radius_factors`),
  keeps the noisiest σ (the largest) from winning by luck.

  Deterministic in (key, ids[i]); independent of batch size, grouping and device count.
  """
  x, _, ids = sampler.validate_instances(x, 1.0, ids)
  samples_per_step = samples_per_step or default_samples_per_step(n, starts, steps)
  validate_search(sigma_min=sigma_min, sigma_max=sigma_max, starts=starts, steps=steps,
                  samples_per_step=samples_per_step, n=n, alpha=alpha,
                  estimate_alpha=estimate_alpha, batch_size=batch_size)
  sampler.check_model(apply_fn, x, num_classes)

  chunk = sampler.samples_per_pass(batch_size, parallel.per_device(len(x)), samples_per_step)
  sigma = parallel.map_instances(
      _local_search, (x, ids),
      (key, bounds.radius_factors(samples_per_step, n, alpha, estimate_alpha),
       start_lattices(sigma_min, sigma_max, starts)),
      apply_fn=apply_fn, samples=samples_per_step, chunk=chunk, num_classes=num_classes,
      steps=steps)
  return np.asarray(sigma, np.float32)


def validate_search(*, sigma_min, sigma_max, starts, steps, samples_per_step, n, alpha,
                    estimate_alpha, batch_size) -> None:
  """Rejects bad search parameters with a ValueError naming the parameter."""
  if not (np.isfinite(sigma_min) and sigma_min > 0):
    raise ValueError(f"sigma_min must be finite and > 0; got {sigma_min}")
  if not (np.isfinite(sigma_max) and sigma_max > sigma_min):
    raise ValueError(f"sigma_max must be finite and > sigma_min={sigma_min}; got {sigma_max}")
  if int(steps) != steps or steps < 3:
    raise ValueError(f"steps must be an integer >= 3 (two golden-section points to compare, "
                     f"then a fresh evaluation of the winner); got {steps}")
  sampler.check_positive_ints(starts=starts, samples_per_step=samples_per_step, n=n,
                              batch_size=batch_size)
  sampler.check_alpha(alpha)
  if not 0.0 < estimate_alpha < 1.0:
    raise ValueError(f"estimate_alpha must lie in (0, 1); got {estimate_alpha}")
