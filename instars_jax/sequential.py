"""Sequential certification: anytime-valid bounds on p_A, early stopping, continuous batching.

CERTIFY with a fixed n spends the same samples on every input, though most are decided long
before: an input with p_A far below 1/2 abstains after a few hundred samples, and a radius
stops moving long before n = 100,000. Here each instance draws estimation samples until a
stopping rule fires at one of a fixed schedule of *looks* (sample counts t_1 < … < t_L = n_max),
and the device never waits for the slowest instance: a finished instance's slot in the batch
takes the next instance of the queue (continuous batching, inside one compiled loop).

The bound (`look_schedule`, `look_alphas`, `bound_tables`): a union bound over the looks,
with a one-sided Clopper–Pearson bound at each (the union-bound confidence sequence that
Voráček, Hein et al., NeurIPS 2024, compare with betting sequences). Look l gets level α_l,
Σ_l α_l = α: half of α at the last look (n_max, where radii need precision) and the other
half split evenly over the earlier ones. Then P[∃ l: p_A < L_l] ≤ Σ_l α_l = α for every p_A, so the lower bound at *any*
stopping time that is a look, however chosen from the data, is below p_A with probability
≥ 1 − α, and Cohen et al.'s Theorem 1 gives the radius σ Φ⁻¹(L) at that level. The upper
bounds U_l hold simultaneously in the same way; they only decide when to stop and abstain,
never what is certified, so the certificate's guarantee rests on the lower family alone.

Stopping rules (one interface: a device-side `stop` evaluated at looks only, and a host-side
`radius` computed from the float64 bound):
  RadiusRule(tolerance ε, tolerance level δ)
                           stop when σΦ⁻¹(L_t) ≥ (1 − ε)·R̄_t, where R̄_t is the best radius a
                           continuation to n_max could still certify if p_A ≤ U^δ_t: the
                           last look's bound at count ⌈U^δ_t·n_max⌉, and never more than with
                           every remaining sample a success. U^δ_t is U_t (δ = α, the
                           default: the tolerance then holds as surely as the certificate) or
                           the look's own Clopper–Pearson upper bound at level δ > α, which
                           stops sooner and keeps the tolerance with probability ≥ 1 − δ at
                           each look. Stop (abstain) once U_t < 1/2 or no continuation can
                           reach L ≥ 1/2.
  DecisionRule(radii)      stop when "R ≥ r_k" is decided for every k (and for r = 0, i.e.
                           p_A > 1/2): proven (L_t ≥ Φ(r_k/σ)), refuted (U_t < Φ(r_k/σ)) or
                           out of reach (not provable with every remaining sample a success).
                           The reported radius is the largest r_k proven.

Noise for instance i, sample j is the fixed-n CERTIFY's (monte_carlo.instance_noise with
the estimation key), so the first t samples are the same in both modes, and stopping depends
only on the counts at looks: results do not depend on batch size, grouping or device count.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from instars_jax import parallel
from instars_jax.monte_carlo import (certified_radius, clopper_pearson_lower,
                                     clopper_pearson_upper, instance_noise)

FIRST_LOOK = 100
LOOK_RATIO = 1.5
# Instances in flight per device: one per SAMPLES_PER_SLOT images of the batch, so that the
# instances just started (FIRST_LOOK samples to their first look) can fill it.
SAMPLES_PER_SLOT = 50


def look_schedule(n_max: int) -> np.ndarray:
  """int64[L]: the sample counts at which stopping is considered, geometric from FIRST_LOOK
  by LOOK_RATIO, the last one n_max."""
  looks = [min(FIRST_LOOK, n_max)]
  while looks[-1] < n_max:
    looks.append(min(n_max, math.ceil(looks[-1] * LOOK_RATIO)))
  return np.asarray(looks, np.int64)


def look_alphas(alpha: float, num_looks: int) -> np.ndarray:
  """float64[L]: each look's level; α/2 at the last look, α/(2(L − 1)) at the others (α at
  the only look when L = 1). They sum to α."""
  if num_looks == 1:
    return np.array([alpha])
  return np.append(np.full(num_looks - 1, alpha / (2 * (num_looks - 1))), alpha / 2)


def anytime_lower_bound(successes, trials, look, n_max: int, alpha: float):
  """float64 lower bound on p_A at each instance's stopping look `look` (an index into
  look_schedule(n_max)), at that look's level: valid simultaneously over looks (module doc)."""
  level = look_alphas(alpha, len(look_schedule(n_max)))[np.asarray(look)]
  return clopper_pearson_lower(successes, trials, level)


@functools.lru_cache(maxsize=8)
def bound_tables(n_max: int, alpha: float, likely_alpha: float | None = None):
  """(looks int32[L], offsets int32[L], lower float32[Σ(t_l+1)], upper float32[...],
  likely_upper float32[...]): each look's bounds for every count 0..t_l, flattened; row l
  starts at offsets[l]. likely_upper is the per-look Clopper–Pearson upper bound at level
  `likely_alpha` (RadiusRule's U^δ), or `upper` itself when that is None. The device reads
  them to decide when to stop; the certified bound is recomputed in float64."""
  looks = look_schedule(n_max)
  alphas = look_alphas(alpha, len(looks))
  counts = np.concatenate([np.arange(t + 1) for t in looks])
  trials = np.repeat(looks, looks + 1)
  level = np.repeat(alphas, looks + 1)
  offsets = np.concatenate([[0], np.cumsum(looks + 1)[:-1]])
  upper = clopper_pearson_upper(counts, trials, level).astype(np.float32)
  likely = (upper if likely_alpha is None else
            clopper_pearson_upper(counts, trials, likely_alpha).astype(np.float32))
  return (looks.astype(np.int32), offsets.astype(np.int32),
          clopper_pearson_lower(counts, trials, level).astype(np.float32), upper, likely)


# ---------------------------------------------------------------------------
# Stopping rules: device-side `stop` on float32 bounds, host-side `radius` in float64.


def _radius(p_lower, sigma):
  """σ Φ⁻¹(L) where L ≥ 1/2, else 0 (Cohen et al.'s Theorem 1)."""
  return np.where(p_lower >= 0.5, certified_radius(np.maximum(p_lower, 0.5), sigma), 0.0)


@dataclasses.dataclass(frozen=True)
class RadiusRule:
  """Stop once the radius is within a factor (1 − tolerance) of the best still reachable if
  p_A is below its upper bound at level `likely_alpha` (None: the anytime bound's α)."""
  tolerance: float
  likely_alpha: float | None = None

  def stop(self, lower, upper, reachable, plausible, sigma):
    abstain = (upper < 0.5) | (reachable < 0.5)
    best = ndtri(jnp.minimum(plausible, reachable))
    close = (lower >= 0.5) & (ndtri(lower) >= (1.0 - self.tolerance) * best)
    return abstain | close

  def radius(self, p_lower, sigma):
    """σ Φ⁻¹(L) where L ≥ 1/2, else 0."""
    return _radius(p_lower, sigma)


@dataclasses.dataclass(frozen=True)
class DecisionRule:
  """Stop once every "R ≥ r_k" (and p_A > 1/2) is proven, refuted or out of reach."""
  radii: tuple
  likely_alpha = None  # decisions need no guess of the final radius

  def stop(self, lower, upper, reachable, plausible, sigma):
    levels = jnp.concatenate([jnp.zeros((1,)), jnp.asarray(self.radii, jnp.float32)])
    thresholds = ndtr(levels[None, :] / sigma[:, None])
    decided = ((lower[:, None] >= thresholds) | (upper[:, None] < thresholds)
               | (reachable[:, None] < thresholds))
    return jnp.all(decided, axis=1)

  def radius(self, p_lower, sigma):
    """The largest r_k with L ≥ Φ(r_k/σ), i.e. r_k ≤ σΦ⁻¹(L); 0 where none is."""
    exact = _radius(p_lower, sigma)
    radii = np.asarray(self.radii, np.float64)
    proven = radii[None, :] <= exact[:, None]
    return np.where(proven, radii[None, :], 0.0).max(axis=1, initial=0.0)


def make_rule(tolerance: float, radii, tolerance_alpha: float = 0.0) -> RadiusRule | DecisionRule:
  """DecisionRule when `radii` is non-empty, else RadiusRule (its U^δ at level
  tolerance_alpha; 0: the anytime bound's α); ValueError on bad values."""
  if not 0.0 <= tolerance_alpha < 1.0:
    raise ValueError(f"tolerance_alpha must lie in [0, 1) (0: alpha); got {tolerance_alpha}")
  radii = tuple(float(r) for r in (radii or ()))
  if radii:
    if not all(math.isfinite(r) and r >= 0 for r in radii):
      raise ValueError(f"radii must be finite and >= 0; got {list(radii)}")
    if any(b <= a for a, b in zip(radii, radii[1:])):
      raise ValueError(f"radii must be sorted in increasing order; got {list(radii)}")
    return DecisionRule(radii)
  if not 0.0 < tolerance < 1.0:
    raise ValueError(f"tolerance must lie in (0, 1); got {tolerance}")
  return RadiusRule(float(tolerance), float(tolerance_alpha) or None)


# ---------------------------------------------------------------------------
# Continuous batching


def local_run(x, sigma, ids, guess, key, looks, offsets, lower_tab, upper_tab, likely_tab, *,
              apply_fn, slots, batch_size, num_classes, rule):
  """Counts for the queue of instances on one device: (counts int32[Q, C], trials int32[Q],
  look int32[Q]) at each instance's stop.

  `slots` instances are in flight. Each step's batch of `batch_size` noisy images is filled
  slot by slot with the samples each in-flight instance still needs to reach its next look
  (so nothing is drawn past a look, and in the tail the last instances get the whole batch);
  an instance that stops at a look hands its slot to the next instance of the queue."""
  queue, shape = x.shape[0], x.shape[1:]
  n_max = looks[-1]
  final = offsets[-1]
  slots = min(slots, queue)
  positions = jnp.arange(batch_size)

  def step(state):
    slot, next_in_queue, counts, trials, look = state
    active = slot < queue
    q = jnp.minimum(slot, queue - 1)
    start, boundary = trials[q], looks[look[q]]
    need = jnp.where(active, boundary - start, 0)
    ends = jnp.cumsum(need)
    begins = ends - need
    owner = jnp.minimum(jnp.searchsorted(ends, positions, side="right"), slots - 1)
    valid = positions < ends[-1]
    instance = q[owner]
    sample = start[owner] + positions - begins[owner]
    eps = jax.vmap(lambda i, j: instance_noise(key, i, j[None], shape)[0])(ids[instance], sample)
    noisy = x[instance] + sigma[instance].reshape((-1,) + (1,) * len(shape)) * eps
    predictions = jnp.argmax(apply_fn(noisy), -1)
    hits = jax.ops.segment_sum(jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
                               * valid[:, None], owner, num_segments=slots)
    new_counts = counts[q] + hits
    new_trials = start + jnp.clip(batch_size - begins, 0, need)
    successes = jnp.take_along_axis(new_counts, guess[q][:, None], axis=1)[:, 0]
    at_look = active & (new_trials == boundary)
    lower = lower_tab[offsets[look[q]] + successes]
    upper = upper_tab[offsets[look[q]] + successes]
    reachable = lower_tab[final + jnp.minimum(n_max, successes + n_max - new_trials)]
    likely = likely_tab[offsets[look[q]] + successes]
    plausible = lower_tab[final + jnp.minimum(n_max, jnp.ceil(likely * n_max).astype(jnp.int32))]
    stop = at_look & (rule.stop(lower, upper, reachable, plausible, sigma[q])
                      | (new_trials >= n_max))
    new_look = look[q] + (at_look & ~stop)
    write = jnp.where(active, q, queue)  # idle slots write nowhere
    counts = counts.at[write].set(new_counts, mode="drop")
    trials = trials.at[write].set(new_trials, mode="drop")
    look = look.at[write].set(new_look, mode="drop")
    refill = next_in_queue + jnp.cumsum(stop) - 1
    slot = jnp.where(stop, jnp.where(refill < queue, refill, queue), slot)
    return slot, next_in_queue + jnp.sum(stop), counts, trials, look

  initial = (jnp.arange(slots, dtype=jnp.int32), jnp.int32(slots),
             jnp.zeros((queue, num_classes), jnp.int32), jnp.zeros((queue,), jnp.int32),
             jnp.zeros((queue,), jnp.int32))
  _, _, counts, trials, look = jax.lax.while_loop(lambda s: jnp.any(s[0] < queue), step, initial)
  return counts, trials, look


@functools.partial(jax.jit, static_argnames=("apply_fn", "slots", "batch_size", "num_classes",
                                             "rule", "mesh"))
def _sharded_run(x, sigma, ids, guess, key, looks, offsets, lower_tab, upper_tab, likely_tab, *,
                 apply_fn, slots, batch_size, num_classes, rule, mesh):
  local = functools.partial(local_run, apply_fn=apply_fn, slots=slots, batch_size=batch_size,
                            num_classes=num_classes, rule=rule)
  return parallel.shard_instances(local, mesh, num_sharded=4, num_replicated=6)(
      x, sigma, ids, guess, key, looks, offsets, lower_tab, upper_tab, likely_tab)


def run(apply_fn, x, sigma, ids, guess, key, *, n_max, alpha, batch_size, num_classes, rule):
  """(counts int[B, C], trials int[B], look int[B]) of sequential sampling on validated host
  arrays: each device takes a contiguous share of the instances as its queue and keeps
  batch_size // SAMPLES_PER_SLOT of them in flight."""
  mesh = parallel.local_data_mesh()
  devices = mesh.devices.size
  padded = [parallel.pad_rows(a, devices) for a in (x, sigma, ids, guess)]
  slots = max(1, batch_size // SAMPLES_PER_SLOT)
  tables = bound_tables(int(n_max), float(alpha), rule.likely_alpha)
  counts, trials, look = _sharded_run(*padded, key, *tables, apply_fn=apply_fn, slots=slots,
                                      batch_size=batch_size, num_classes=num_classes, rule=rule,
                                      mesh=mesh)
  return tuple(np.asarray(a)[: len(x)] for a in (counts, trials, look))
