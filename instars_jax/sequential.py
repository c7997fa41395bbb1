"""Sequential certification: anytime-valid bounds on p_A, early stopping, continuous batching.

CERTIFY with a fixed n spends the same samples on every input, though most are decided long
before: an input with p_A far below 1/2 abstains after a few hundred samples, and a radius
stops moving long before n = 100,000. Here each instance draws estimation samples until a
stopping rule fires at one of a fixed schedule of *looks* (sample counts t_1 < … < t_L = n_max),
and the device never waits for the slowest instance: a finished instance's slot in the batch
takes the next instance of the queue (continuous batching, inside one compiled loop).

Each stopping rule owns its look schedule, its device-side test and the host-side bound it
certifies (one interface: `looks`, `tables`, `stop`, `certify`):

  RadiusRule(tolerance ε, tolerance level δ)
    Bound: a union bound over a schedule of looks (`look_schedule`: geometric, ratio 1.5,
    plus the saturation look, where an input whose samples all agree meets the stop below; it
    depends on n_max, α and ε alone), with a one-sided Clopper–Pearson bound at each
    (`look_alphas`, `bound_tables`; the union-bound confidence sequence that Voráček, Hein et
    al., NeurIPS 2024, compare with betting sequences). Look l gets level α_l = α·t_l/Σ_l t_l,
    in proportion to its samples (the last look about a third of α): early looks only have
    to catch abstentions and small p_A, which need little precision, while the late ones set
    the radii of most images. Then
    P[∃ l: p_A < L_l] ≤ Σ_l α_l = α for every p_A, so the lower bound at *any* stopping look,
    however chosen from the data, is below p_A with probability ≥ 1 − α, and Cohen et al.'s
    Theorem 1 gives the radius σ Φ⁻¹(L) at that level (recomputed on the host in float64).
    Stop when σΦ⁻¹(L_t) ≥ (1 − ε)·R̄_t, where R̄_t is the best radius a continuation to n_max
    could still certify if p_A ≤ U^δ_t: the last look's bound at the S_t successes seen plus
    ⌈U^δ_t·(n_max − t)⌉ more, and never more than with every remaining sample a success.
    U^δ_t is the look's own Clopper–Pearson upper bound at level δ (`TOLERANCE_ALPHA` = 0.05
    by default, the usual β of a sequential test), so the tolerance holds with probability
    ≥ 1 − δ at each look; δ = α takes the family's upper bound U_t instead, and the tolerance
    then holds as surely as the certificate, at the price of sampling until U_t is as tight
    as L_t. Stop (abstain) once U_t < 1/2 or no continuation can reach L ≥ 1/2. The upper
    bounds only decide when to stop.

  DecisionRule(radii r_1 < … < r_m, tolerance level δ)
    Test: for each threshold θ_k = Φ(r_k/σ) (θ_0 = 1/2: p_A > 1/2, the class itself), a
    mixture of likelihood ratios of alternatives p_j > θ_k against θ_k (`log_evidence`: ten
    alternatives, nine log-odds steps above θ_k and p = 1, equally weighted). Under any
    p_A ≤ θ_k the mixture is a nonnegative supermartingale with mean ≤ 1, so by Ville's
    inequality it ever reaches 1/α with probability ≤ α (the SPRT's argument, Wald 1945,
    with Robbins' mixtures over the alternative, 1970). It is checked at dense looks
    (`decision_looks`: every 5% or 50 samples), which cost nothing in level, unlike a
    union bound. "R ≥ r_k" is proven once the tests of θ_0 … θ_k have all reached 1/α at one
    look (a running maximum of that prefix): testing in this fixed order lets each test use
    the whole α, since a wrong claim needs the first false one, θ_{k*}, rejected (fixed-
    sequence testing, Maurer, Hothorn & Lehmacher 1995). The reported radius is the largest
    r_k proven and the reported lower bound Φ(r_k/σ), both wrong with probability ≤ α.
    "R ≥ r_k" is given up (refuted) once even a continuation at p_A's upper bound could not
    prove it by n_max: the S_t successes seen plus ⌈U^δ_t·(n_max − t)⌉ more would leave the
    test below 1/α at n_max (always so once no proof is possible with every remaining sample
    a success). U^δ_t is the Chernoff bound at level δ/L over the L looks (`chernoff_upper`;
    Chernoff 1952), so with probability ≥ 1 − δ, p_A ≤ U^δ_t at every look, and a claim is
    given up only where even S_t + p_A·(n_max − t), the final count expected from the samples
    seen, would not prove it; δ is the tolerance level, `TOLERANCE_ALPHA` by default.
    Refutations only stop sampling. Stop when every threshold is proven or refuted. The
    device computes the test in float32 and subtracts a bound on its rounding error
    (`ROUNDING`), so it never proves what the exact test would not.

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
from jax.scipy.special import log_ndtr, ndtr, ndtri, xlogy
from scipy import stats

from instars_jax import parallel
from instars_jax.monte_carlo import (certified_radius, clopper_pearson_lower,
                                     clopper_pearson_upper, instance_noise)

FIRST_LOOK = 100
LOOK_RATIO = 1.5
DECISION_GAP = (50, 0.05)  # decision looks: every max(50, 5% of the samples so far)
# Instances in flight per device: one per SAMPLES_PER_SLOT images of the batch, so that the
# instances just started (FIRST_LOOK samples to their first look) can fill it.
SAMPLES_PER_SLOT = 50
# The default level of the upper bound U^δ on p_A that only decides when to stop (both rules).
TOLERANCE_ALPHA = 0.05
# The decision tests' alternatives: log-odds steps above the threshold's.
LOG_ODDS_STEPS = 0.05 * 2.0 ** np.arange(9)
# Bisection steps of chernoff_upper: its bracket shrinks to 2^-30, under float32 spacing at 1.
CHERNOFF_STEPS = 30
# float32 rounding bound of log_evidence: relative to the magnitude of the terms summed, plus
# an absolute part (8 float32 ulps; the tests check it against float64).
ROUNDING = (1e-6, 1e-3)
# Thresholds are tested at z·(1 + Z_INFLATION), covering float32 rounding of r/σ.
Z_INFLATION = 1e-6
# The saturation look is placed this share of its samples late, so that the float32 tables
# still stop an instance with no failure there.
SATURATION_MARGIN = 0.002


def geometric_looks(n_max: int) -> np.ndarray:
  """int64[L]: looks geometric from FIRST_LOOK by LOOK_RATIO, the last n_max; a geometric look
  is kept only if a full step still fits after it (no look just before n_max to split α
  with it)."""
  looks = [min(FIRST_LOOK, n_max)]
  while looks[-1] < n_max:
    step = math.ceil(looks[-1] * LOOK_RATIO)
    looks.append(step if step * LOOK_RATIO < n_max else n_max)
  return np.asarray(looks, np.int64)


def saturation_look(geometric: np.ndarray, alpha: float, tolerance: float) -> int | None:
  """The first count t at which an instance whose every sample so far agreed with its class
  meets RadiusRule's stop, were t a look beside `geometric` (its level then counts in the
  union bound): Φ⁻¹(α_t^(1/t)) ≥ (1 − ε)·Φ⁻¹(α_L^(1/n_max)), the Clopper–Pearson bounds with
  no failure at t and at n_max; then SATURATION_MARGIN later, for the device's float32. σ
  cancels, so this look depends on (n_max, α, ε) alone, never on the data. None where no
  t between the first look and n_max qualifies, or t is a geometric look already."""
  n_max, total = int(geometric[-1]), float(np.sum(geometric))

  def meets(t):
    trials = np.array([t, n_max], np.float64)
    lower, final = (alpha * trials / (total + t)) ** (1.0 / trials)
    return stats.norm.ppf(lower) >= (1.0 - tolerance) * stats.norm.ppf(final)

  low, high = int(geometric[0]), n_max - 1
  if n_max <= low or meets(low) or not meets(high):
    return None
  while high - low > 1:  # meets(t) grows with t: its level rises and the final one falls
    middle = (low + high) // 2
    low, high = (low, middle) if meets(middle) else (middle, high)
  look = math.ceil(high * (1.0 + SATURATION_MARGIN))
  return look if look < n_max and look not in geometric else None


def look_schedule(n_max: int, alpha: float, tolerance: float) -> np.ndarray:
  """int64[L]: RadiusRule's looks: the geometric ones and the saturation look. Without the
  latter an input whose samples all agree, most of an accurate model's easy inputs, would run
  on to the next geometric look, up to LOOK_RATIO times the samples it needs."""
  looks = geometric_looks(n_max)
  extra = saturation_look(looks, alpha, tolerance)
  return looks if extra is None else np.sort(np.append(looks, extra))


def decision_looks(n_max: int) -> np.ndarray:
  """int64[L]: DecisionRule's looks, from FIRST_LOOK every max(DECISION_GAP) samples."""
  least, share = DECISION_GAP
  looks = [min(FIRST_LOOK, n_max)]
  while looks[-1] < n_max:
    looks.append(min(n_max, looks[-1] + max(least, math.ceil(looks[-1] * share))))
  return np.asarray(looks, np.int64)


def look_alphas(alpha: float, looks: np.ndarray) -> np.ndarray:
  """float64[L]: each look's level, α·t_l / Σ t: in proportion to its sample count, so the late
  looks, where radii need precision and most images stop, get most of α. They sum to α."""
  looks = np.asarray(looks, np.float64)
  return alpha * looks / looks.sum()


def anytime_lower_bound(successes, trials, look, looks: np.ndarray, alpha: float):
  """float64 lower bound on p_A at each instance's stopping look `look` (an index into
  `looks`), at that look's level: valid simultaneously over looks (module doc)."""
  level = look_alphas(alpha, looks)[np.asarray(look)]
  return clopper_pearson_lower(successes, trials, level)


@functools.lru_cache(maxsize=8)
def bound_tables(n_max: int, alpha: float, tolerance: float, likely_alpha: float | None = None):
  """(looks int32[L], offsets int32[L], lower float32[Σ(t_l+1)], upper float32[...],
  likely_upper float32[...]): each look's bounds for every count 0..t_l, flattened; row l
  starts at offsets[l]. likely_upper is the per-look Clopper–Pearson upper bound at level
  `likely_alpha` (RadiusRule's U^δ), or `upper` itself when that is None. The device reads
  them to decide when to stop; the certified bound is recomputed in float64."""
  looks = look_schedule(n_max, alpha, tolerance)
  alphas = look_alphas(alpha, looks)
  counts = np.concatenate([np.arange(t + 1) for t in looks])
  trials = np.repeat(looks, looks + 1)
  level = np.repeat(alphas, looks + 1)
  offsets = np.concatenate([[0], np.cumsum(looks + 1)[:-1]])
  upper = clopper_pearson_upper(counts, trials, level).astype(np.float32)
  likely = (upper if likely_alpha is None else
            clopper_pearson_upper(counts, trials, likely_alpha).astype(np.float32))
  return (looks.astype(np.int32), offsets.astype(np.int32),
          clopper_pearson_lower(counts, trials, level).astype(np.float32), upper, likely)


def alternatives(z):
  """float32[..., len(LOG_ODDS_STEPS)]: the log-odds of the decision test's alternatives
  above p = Φ(z). They depend on z alone, never on the samples, which the test's level
  needs."""
  log_theta, log_rest = _log_threshold(z)
  return log_theta[..., None] - log_rest[..., None] + jnp.asarray(LOG_ODDS_STEPS, jnp.float32)


def _log_threshold(z):
  """float32 (log Φ(z), log Φ(−z)) for z ≥ 0, each to a few ulps: log Φ(z) as log1p(−Φ(−z)),
  since log(Φ(z)) would lose Φ(−z)'s digits once Φ(z) rounds near 1."""
  z = jnp.asarray(z, jnp.float32)
  return jnp.log1p(-ndtr(-z)), log_ndtr(-z)


def log_evidence(successes, failures, z):
  """float32 log of the decision test's mixture likelihood ratio against p = Φ(z), less its
  rounding bound: the mean over alternatives p_j with log-odds logit(Φ(z)) + LOG_ODDS_STEPS,
  and p = 1, of (p_j/θ)^S ((1 − p_j)/(1 − θ))^F. Broadcasts."""
  successes = jnp.asarray(successes, jnp.float32)[..., None]
  failures = jnp.asarray(failures, jnp.float32)[..., None]
  log_theta, log_rest = (a[..., None] for a in _log_threshold(z))
  log_odds = alternatives(z)
  log_p, log_q = jax.nn.log_sigmoid(log_odds), jax.nn.log_sigmoid(-log_odds)
  terms = successes * (log_p - log_theta) + failures * (log_q - log_rest)
  size = successes * (jnp.abs(log_p) + jnp.abs(log_theta)) + failures * (jnp.abs(log_q)
                                                                          + jnp.abs(log_rest))
  # the alternative p = 1: θ^(−S) while no sample has failed
  terms = jnp.concatenate(
      [terms, jnp.where(failures > 0, -jnp.inf, -successes * log_theta)], axis=-1)
  size = jnp.concatenate([size, -2 * successes * log_theta], axis=-1)
  relative, absolute = ROUNDING
  terms = terms - relative * size - absolute
  return jax.scipy.special.logsumexp(terms, axis=-1) - jnp.log(jnp.float32(terms.shape[-1]))


def chernoff_upper(successes, trials, log_inverse_level):
  """float32 upper bound on p at level e^(−log_inverse_level) after `trials` Bernoulli(p)
  draws: the largest q ≥ p̂ with trials·KL(p̂ ‖ q) ≤ log_inverse_level, by bisection. Valid
  since P[p̂ ≤ a] ≤ exp(−t·KL(a ‖ p)) for a < p (Chernoff 1952)."""
  trials = jnp.maximum(trials, 1).astype(jnp.float32)
  p_hat = successes.astype(jnp.float32) / trials
  divergence = lambda q: (xlogy(p_hat, p_hat) - xlogy(p_hat, q) + xlogy(1 - p_hat, 1 - p_hat)
                          - xlogy(1 - p_hat, 1 - q))
  def halve(_, bracket):
    low, high = bracket
    middle = (low + high) / 2
    inside = trials * divergence(middle) <= log_inverse_level
    return jnp.where(inside, middle, low), jnp.where(inside, high, middle)
  return jax.lax.fori_loop(0, CHERNOFF_STEPS, halve, (p_hat, jnp.ones_like(p_hat)))[1]


def continued_successes(successes, trials, upper, n_max):
  """int32 successes at n_max if the remaining samples come at rate `upper`: the S_t seen
  plus ⌈upper·(n_max − t)⌉, both rules' plausible continuation (module doc)."""
  more = jnp.ceil(upper * (n_max - trials)).astype(jnp.int32)
  return jnp.minimum(n_max, successes + more)


def _radius(p_lower, sigma):
  """σ Φ⁻¹(L) where L ≥ 1/2, else 0 (Cohen et al.'s Theorem 1)."""
  return np.where(p_lower >= 0.5, certified_radius(np.maximum(p_lower, 0.5), sigma), 0.0)


@dataclasses.dataclass(frozen=True)
class RadiusRule:
  """Stop once the radius is within a factor (1 − tolerance) of the best still reachable if
  p_A is below its upper bound at level `likely_alpha` (None: the anytime bound's α)."""
  tolerance: float
  likely_alpha: float | None = None

  def looks(self, n_max: int, alpha: float) -> np.ndarray:
    return look_schedule(n_max, alpha, self.tolerance)

  def tables(self, n_max: int, alpha: float):
    """(offsets, lower, upper, likely_upper) of bound_tables."""
    return bound_tables(n_max, alpha, self.tolerance, self.likely_alpha)[1:]

  def stop(self, tables, look, successes, trials, n_max, sigma, level):
    """(stop bool[S], level) at a look; `level` is DecisionRule's and passes through."""
    offsets, lower_tab, upper_tab, likely_tab = tables
    row, final = offsets[look], offsets[-1]
    lower, upper = lower_tab[row + successes], upper_tab[row + successes]
    reachable = lower_tab[final + jnp.minimum(n_max, successes + n_max - trials)]
    likely = likely_tab[row + successes]
    plausible = lower_tab[final + continued_successes(successes, trials, likely, n_max)]
    abstain = (upper < 0.5) | (reachable < 0.5)
    best = ndtri(jnp.minimum(plausible, reachable))
    close = (lower >= 0.5) & (ndtri(lower) >= (1.0 - self.tolerance) * best)
    return abstain | close, level

  def certify(self, successes, trials, look, level, sigma, n_max: int, alpha: float):
    """float64 (p_lower, radius): the anytime lower bound at the stopping look, σ Φ⁻¹(L)."""
    p_lower = anytime_lower_bound(successes, trials, look, self.looks(n_max, alpha), alpha)
    return p_lower, _radius(p_lower, sigma)


@dataclasses.dataclass(frozen=True)
class DecisionRule:
  """Stop once every "R ≥ r_k" (and p_A > 1/2) is proven by its test, or given up because a
  continuation at p_A's upper bound at level `likely_alpha` (None: α) could not prove it."""
  radii: tuple
  likely_alpha: float | None = None

  def looks(self, n_max: int, alpha: float) -> np.ndarray:
    del alpha  # the tests' level does not depend on the looks
    return decision_looks(n_max)

  def tables(self, n_max: int, alpha: float):
    """(log(1/α), log(L/δ)): the evidence that proves, the Chernoff level of U^δ per look."""
    per_look = (self.likely_alpha or alpha) / len(decision_looks(n_max))
    return np.float32(-math.log(alpha)), np.float32(-math.log(per_look))

  def _levels(self):
    return (0.0,) + self.radii

  def stop(self, tables, look, successes, trials, n_max, sigma, level):
    """(stop bool[S], level int32[S]): level, the number of thresholds θ_0, θ_1, … proven
    together at one look so far (module doc)."""
    threshold, likely_level = tables
    z = (jnp.asarray(self._levels(), jnp.float32)[None, :] / sigma[:, None]) * (1 + Z_INFLATION)
    proves = lambda s, f: log_evidence(s[:, None], f[:, None], z) >= threshold
    proven = proves(successes, trials - successes)
    level = jnp.maximum(level, jnp.sum(jnp.cumprod(proven, axis=1), axis=1).astype(jnp.int32))
    upper = chernoff_upper(successes, trials, likely_level)
    continued = continued_successes(successes, trials, upper, n_max)
    refuted = ~proves(continued, n_max - continued)
    refuted = jnp.cumsum(refuted, axis=1) > 0  # refuting θ_k refutes every larger one
    index = jnp.arange(len(self._levels()))[None, :]
    decided = (index < level[:, None]) | proven | refuted
    return jnp.all(decided, axis=1), level

  def certify(self, successes, trials, look, level, sigma, n_max: int, alpha: float):
    """float64 (p_lower, radius): Φ(r_k/σ) and r_k for the largest r_k proven (p_lower 1/2
    and radius 0 where only p_A > 1/2 is; p_lower 0 and radius 0 where nothing is)."""
    levels = np.asarray(self._levels(), np.float64)
    level = np.asarray(level)
    radius = np.where(level > 0, levels[np.maximum(level - 1, 0)], 0.0)
    p_lower = np.where(level > 0, stats.norm.cdf(radius / np.asarray(sigma, np.float64)), 0.0)
    return p_lower, radius


def make_rule(tolerance: float, radii,
              tolerance_alpha: float = TOLERANCE_ALPHA) -> RadiusRule | DecisionRule:
  """DecisionRule when `radii` is non-empty, else RadiusRule, each with its upper bound U^δ
  at level tolerance_alpha (0 means α). ValueError on bad values."""
  if not 0.0 <= tolerance_alpha < 1.0:
    raise ValueError(f"tolerance_alpha must lie in [0, 1) (0: alpha); got {tolerance_alpha}")
  radii = tuple(float(r) for r in (radii or ()))
  if radii:
    if not all(math.isfinite(r) and r >= 0 for r in radii):
      raise ValueError(f"radii must be finite and >= 0; got {list(radii)}")
    if any(b <= a for a, b in zip(radii, radii[1:])):
      raise ValueError(f"radii must be sorted in increasing order; got {list(radii)}")
    return DecisionRule(radii, float(tolerance_alpha) or None)
  if not 0.0 < tolerance < 1.0:
    raise ValueError(f"tolerance must lie in (0, 1); got {tolerance}")
  return RadiusRule(float(tolerance), float(tolerance_alpha) or None)


# ---------------------------------------------------------------------------
# Continuous batching


def local_run(x, sigma, ids, guess, key, looks, tables, *, apply_fn, slots, batch_size,
              num_classes, rule):
  """Counts for the queue of instances on one device: (counts int32[Q, C], trials int32[Q],
  look int32[Q], level int32[Q]) at each instance's stop.

  `slots` instances are in flight. Each step's batch of `batch_size` noisy images is filled
  slot by slot with the samples each in-flight instance still needs to reach its next look
  (so nothing is drawn past a look, and in the tail the last instances get the whole batch);
  an instance that stops at a look hands its slot to the next instance of the queue."""
  queue, shape = x.shape[0], x.shape[1:]
  n_max = looks[-1]
  slots = min(slots, queue)
  positions = jnp.arange(batch_size)

  def step(state):
    slot, next_in_queue, counts, trials, look, level = state
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
    rule_stop, rule_level = rule.stop(tables, look[q], successes, new_trials, n_max, sigma[q],
                                      level[q])
    stop = at_look & (rule_stop | (new_trials >= n_max))
    new_look = look[q] + (at_look & ~stop)
    new_level = jnp.where(at_look, rule_level, level[q])
    write = jnp.where(active, q, queue)  # idle slots write nowhere
    counts = counts.at[write].set(new_counts, mode="drop")
    trials = trials.at[write].set(new_trials, mode="drop")
    look = look.at[write].set(new_look, mode="drop")
    level = level.at[write].set(new_level, mode="drop")
    refill = next_in_queue + jnp.cumsum(stop) - 1
    slot = jnp.where(stop, jnp.where(refill < queue, refill, queue), slot)
    return slot, next_in_queue + jnp.sum(stop), counts, trials, look, level

  zeros = jnp.zeros((queue,), jnp.int32)
  initial = (jnp.arange(slots, dtype=jnp.int32), jnp.int32(slots),
             jnp.zeros((queue, num_classes), jnp.int32), zeros, zeros, zeros)
  _, _, counts, trials, look, level = jax.lax.while_loop(lambda s: jnp.any(s[0] < queue), step,
                                                         initial)
  return counts, trials, look, level


@functools.partial(jax.jit, static_argnames=("apply_fn", "slots", "batch_size", "num_classes",
                                             "rule", "mesh"))
def _sharded_run(x, sigma, ids, guess, key, looks, tables, *, apply_fn, slots, batch_size,
                 num_classes, rule, mesh):
  local = functools.partial(local_run, apply_fn=apply_fn, slots=slots, batch_size=batch_size,
                            num_classes=num_classes, rule=rule)
  return parallel.shard_instances(local, mesh, num_sharded=4, num_replicated=3)(
      x, sigma, ids, guess, key, looks, tables)


def run(apply_fn, x, sigma, ids, guess, key, *, n_max, alpha, batch_size, num_classes, rule):
  """(counts int[B, C], trials int[B], look int[B], level int[B]) of sequential sampling on
  validated host arrays: each device takes a contiguous share of the instances as its queue
  and keeps batch_size // SAMPLES_PER_SLOT of them in flight."""
  mesh = parallel.local_data_mesh()
  devices = mesh.devices.size
  padded = [parallel.pad_rows(a, devices) for a in (x, sigma, ids, guess)]
  slots = max(1, batch_size // SAMPLES_PER_SLOT)
  looks = rule.looks(int(n_max), float(alpha)).astype(np.int32)
  results = _sharded_run(*padded, key, looks, rule.tables(int(n_max), float(alpha)),
                         apply_fn=apply_fn, slots=slots, batch_size=batch_size,
                         num_classes=num_classes, rule=rule, mesh=mesh)
  return tuple(np.asarray(a)[: len(x)] for a in results)
