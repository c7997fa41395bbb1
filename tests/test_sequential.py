"""Sequential certification: the anytime-valid bound, the stopping rules, continuous batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import instars_jax as ij
from instars_jax import parallel
from instars_jax.smoothing import bounds
from instars_jax.smoothing.sequential import rules
from instars_jax.smoothing.streams import Stream


def look_bounds(n_max, alpha, family=None, tolerance=0.05):
  """float64 (lower, upper) rows per look; `family`: per-look levels (default: the union bound)."""
  looks = rules.look_schedule(n_max, alpha, tolerance)
  levels = rules.look_alphas(alpha, looks) if family is None else family(len(looks))
  return looks, [(ij.clopper_pearson_lower(np.arange(t + 1), t, a),
                  bounds.clopper_pearson_upper(np.arange(t + 1), t, a))
                 for t, a in zip(looks, levels)]


def stream_counts(p, looks, streams, seed):
  """int[streams, L]: the successes of Bernoulli(p) streams at each look."""
  increments = np.diff(np.concatenate([[0], looks]))
  return np.cumsum(np.random.default_rng(seed).binomial(increments, p, (streams, len(looks))),
                   axis=1)


def crossing_rates(p, n_max, alpha, streams, family=None, seed=0):
  """Shares of Bernoulli(p) streams whose lower bound exceeds p, and whose upper bound falls
  below p, at some look."""
  looks, rows = look_bounds(n_max, alpha, family)
  counts = stream_counts(p, looks, streams, seed)
  low = np.zeros(streams, bool)
  high = np.zeros(streams, bool)
  for l, (lower, upper) in enumerate(rows):
    low |= lower[counts[:, l]] > p
    high |= upper[counts[:, l]] < p
  return low.mean(), high.mean()


def test_schedule_and_levels():
  geometric = rules.geometric_looks(100_000)
  assert geometric[0] == 100 and geometric[-1] == 100_000
  assert np.all(geometric[1:-1] / geometric[:-2] >= 1.5 - 1e-9)
  looks = rules.look_schedule(100_000, 0.001, 0.05)
  assert np.all(np.diff(looks) > 0)
  extra = np.setdiff1d(looks, geometric)  # the saturation look, between two geometric ones
  assert len(extra) == 1 and 43_920 < extra[0] < 65_880
  levels = rules.look_alphas(0.001, looks)
  assert levels.sum() == pytest.approx(0.001)
  np.testing.assert_allclose(levels / looks, levels[0] / looks[0])  # in proportion to t_l
  assert 0.25 < levels[-1] / 0.001 < 0.35
  np.testing.assert_array_equal(rules.look_schedule(60, 0.01, 0.05), [60])
  assert rules.look_alphas(0.01, [60]) == pytest.approx([0.01])


@pytest.mark.parametrize("p", [0.5, 0.7, 0.9, 0.99])
def test_bound_holds_at_every_look_with_probability_alpha(p):
  # 10^5 streams: violated at some look in at most α of them, within 3 Monte Carlo errors.
  alpha, streams = 0.05, 100_000
  low, high = crossing_rates(p, 20_000, alpha, streams)
  slack = 3 * np.sqrt(alpha * (1 - alpha) / streams)
  assert low <= alpha + slack and high <= alpha + slack


def test_per_look_bounds_without_the_union_bound_fail_the_same_check():
  # The check can fail: Clopper–Pearson at the full α at every look crosses far more often.
  alpha, streams = 0.05, 100_000
  low, high = crossing_rates(0.7, 20_000, alpha, streams, family=lambda k: np.full(k, alpha))
  assert min(low, high) > alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)


def test_device_tables_match_the_float64_bounds():
  looks, offsets, lower, upper, likely = rules.bound_tables(5000, 0.01, 0.05)
  assert likely is upper  # U^δ is the anytime bound with tolerance_alpha 0 (α)
  _, rows = look_bounds(5000, 0.01)
  _, likely_rows = look_bounds(5000, 0.01, family=lambda num_looks: np.full(num_looks, 0.2))
  likely = rules.bound_tables(5000, 0.01, 0.05, 0.2)[4]
  for l, ((lo, up), (_, likely_up)) in enumerate(zip(rows, likely_rows)):
    row = slice(offsets[l], offsets[l] + looks[l] + 1)
    np.testing.assert_allclose(lower[row], lo, atol=1e-6)
    np.testing.assert_allclose(upper[row], up, atol=1e-6)
    np.testing.assert_allclose(likely[row], likely_up, atol=1e-6)



@pytest.mark.parametrize("look", [pytest.param(12, marks=pytest.mark.slow), 13])
def test_radius_stop_is_the_documented_rule_in_float64(look):
  # Stop iff Φ⁻¹(L_t) ≥ (1 − ε)·Φ⁻¹(L_final(S + ⌈U^δ(n_max − t)⌉)): the S successes seen are
  # kept and only the rest continue at U^δ (docs/sequential.md), checked against scipy in float64.
  n_max, alpha, eps, delta = 100_000, 0.001, 0.05, 0.05
  rule = rules.RadiusRule(eps, delta)
  looks = rules.look_schedule(n_max, alpha, eps)
  levels = rules.look_alphas(alpha, looks)
  t = int(looks[look])
  s = np.arange(int(0.8 * t), t + 1)
  lower = ij.clopper_pearson_lower(s, t, levels[look])
  likely = bounds.clopper_pearson_upper(s, t, delta)
  continued = np.minimum(s + np.ceil(likely * (n_max - t)), n_max)
  best = stats.norm.ppf(ij.clopper_pearson_lower(continued, n_max, levels[-1]))
  gap = stats.norm.ppf(lower) - (1 - eps) * best
  tables = tuple(jnp.asarray(table) for table in rule.tables(n_max, alpha))
  stop, _ = rule.stop(tables, jnp.full(len(s), look), jnp.asarray(s, jnp.int32),
                      jnp.full(len(s), t, jnp.int32), n_max, jnp.full(len(s), 0.5),
                      jnp.zeros(len(s), jnp.int32))
  clear = np.abs(gap) > 1e-4  # float32 tables: decisions this close to the line may differ
  np.testing.assert_array_equal(np.asarray(stop)[clear], (gap >= 0)[clear])
  assert clear.mean() > 0.95 and 0.01 < (gap >= 0).mean() < 0.99  # both sides are checked

@pytest.mark.parametrize("n_max, eps", [(100_000, 0.05), (20_000, 0.05), (100_000, 0.2)])
def test_an_input_whose_samples_all_agree_stops_at_the_saturation_look(n_max, eps):
  # The look is the first count (less its float32 margin) at which the documented rule, in
  # float64, stops an input with no failure; the device's float32 rule stops it there, and
  # not at the look before.
  alpha = 0.001
  looks = rules.look_schedule(n_max, alpha, eps)
  t = rules.saturation_look(rules.geometric_looks(n_max), alpha, eps)
  final = stats.norm.ppf((alpha * n_max / looks.sum()) ** (1 / n_max))
  z_at = lambda count: stats.norm.ppf((alpha * count / looks.sum()) ** (1 / count))
  assert z_at(t) >= (1 - eps) * final
  assert z_at(int(t / (1 + rules.SATURATION_MARGIN)) - 1) < (1 - eps) * final
  rule = rules.RadiusRule(eps, 0.05)
  at = int(np.flatnonzero(looks == t)[0])
  trials = jnp.asarray(looks[[at - 1, at]], jnp.int32)
  tables = tuple(jnp.asarray(table) for table in rule.tables(n_max, alpha))
  stop, _ = rule.stop(tables, jnp.array([at - 1, at]), trials, trials, n_max,
                      jnp.full(2, 0.5), jnp.zeros(2, jnp.int32))
  np.testing.assert_array_equal(stop, [False, True])


DISTANCES = np.array([-0.3, 0.0, 0.03, 0.1, 0.2, 0.4, 0.6, 0.9, 1.2, 2.5])


def certify_linear(linear, rule=None, key=0, n=20_000, alpha=0.001, batch_size=1000):
  x = linear.points_at_distance(DISTANCES)
  return ij.certify(linear, x, 0.5, jax.random.PRNGKey(key), n0=100, n=n, alpha=alpha,
                    batch_size=batch_size, num_classes=2, rule=rule)


@pytest.mark.slow
def test_radius_mode_is_sound_close_to_fixed_and_cheaper(linear):
  fixed = certify_linear(linear, n=100_000)
  seq = certify_linear(linear, ij.RadiusRule(0.05), n=100_000)
  # Sound: no radius above the true distance to the boundary.
  assert np.all(seq.radius <= np.abs(DISTANCES) + 1e-6)
  np.testing.assert_array_equal(seq.prediction, fixed.prediction)
  certified = fixed.prediction != ij.ABSTAIN
  assert np.all(seq.radius[certified] >= 0.9 * fixed.radius[certified])
  # Boundary inputs need most of n_max, p_A = Φ(1.2), Φ(1.8) stop by 30%, and the saturated
  # p_A = Φ(5) at the saturation look, about half.
  assert np.all(seq.num_samples[6:8] <= 30_000)
  geometric = rules.geometric_looks(100_000)
  assert seq.num_samples[9] == rules.saturation_look(geometric, 0.001, 0.05)
  assert seq.num_samples.sum() < 0.75 * fixed.num_samples.sum()
  np.testing.assert_array_equal(fixed.num_samples, 100_000)
  # The stops are looks, and a look's counts are those of the first samples of fixed CERTIFY.
  assert set(seq.num_samples) <= set(rules.look_schedule(100_000, 0.001, 0.05))
  np.testing.assert_array_equal(seq.counts.sum(1), seq.num_samples)
  x = linear.points_at_distance(DISTANCES)
  key = jax.random.fold_in(jax.random.PRNGKey(0), Stream.ESTIMATE)
  for i in (2, 5, 9):
    first = ij.sample_counts(linear, x[i:i + 1], 0.5, key, num=int(seq.num_samples[i]),
                             batch_size=500, num_classes=2, ids=[i])
    np.testing.assert_array_equal(np.asarray(first)[0], seq.counts[i])


@pytest.mark.slow
def test_a_looser_tolerance_level_stops_sooner_and_stays_sound(linear):
  strict = certify_linear(linear, ij.RadiusRule(0.05, None), n=100_000)
  loose = certify_linear(linear, ij.RadiusRule(0.05), n=100_000)  # at 0.05
  assert np.all(loose.num_samples <= strict.num_samples)
  assert loose.num_samples.sum() < 0.9 * strict.num_samples.sum()
  assert np.all(loose.radius <= np.abs(DISTANCES) + 1e-6)
  np.testing.assert_array_equal(loose.prediction, strict.prediction)
  certified = strict.prediction != ij.ABSTAIN
  assert np.all(loose.radius[certified] >= 0.9 * strict.radius[certified])


def test_far_below_half_abstains_early(linear):
  x = linear.points_at_distance(np.array([-0.01, 0.005]))
  # A classifier that is right only 30% of the time under noise: p_A <= 0.3 for the guess.
  third = lambda z: jnp.where((jnp.sum(z, axis=1) % 1.0 < 0.3)[:, None],
                              jnp.array([[1.0, 0.0, 0.0]]), jnp.array([[0.0, 1.0, 0.5]]) *
                              (jnp.sum(z * 7, axis=1) % 1.0 < 0.5)[:, None]
                              + jnp.array([[0.0, 0.0, 1.0]]) *
                              (jnp.sum(z * 7, axis=1) % 1.0 >= 0.5)[:, None])
  cert = ij.certify(third, x, 1.0, jax.random.PRNGKey(0), n0=50, n=100_000, alpha=0.001,
                    batch_size=500, num_classes=3, rule=ij.RadiusRule())
  np.testing.assert_array_equal(cert.prediction, ij.ABSTAIN)
  assert np.all(cert.num_samples <= 1000)


def test_decision_mode_reports_the_largest_proven_radius(linear):
  radii = (0.25, 0.5, 0.75, 1.0)
  fixed = certify_linear(linear, alpha=0.001)
  seq = certify_linear(linear, ij.DecisionRule(radii))
  assert set(np.round(seq.radius, 6)) <= {0.0, *radii}
  assert np.all(seq.radius <= np.abs(DISTANCES) + 1e-6)
  # It proves the same thresholds as fixed CERTIFY here (none sits near its threshold).
  expected = np.array([max([0.0] + [r for r in radii if r <= f]) for f in fixed.radius])
  np.testing.assert_allclose(seq.radius, expected)
  assert seq.num_samples.sum() < 0.3 * fixed.num_samples.sum()


@pytest.mark.slow
def test_sound_on_many_instances_with_a_loose_alpha(linear):
  # α = 0.05 over 300 instances at distance 0.3: the radius exceeds the truth in at most ~5%.
  x = linear.points_at_distance(np.full(300, 0.3))
  for rule in (ij.RadiusRule(0.05), ij.DecisionRule((0.1, 0.2, 0.3))):
    cert = ij.certify(linear, x, 0.5, jax.random.PRNGKey(3), n0=50, n=3000, alpha=0.05,
                      batch_size=2000, num_classes=2, rule=rule)
    assert np.mean(cert.radius > 0.3) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 300)
    assert np.mean(cert.radius > 0) > 0.5


def test_results_do_not_depend_on_batch_size_or_grouping():
  rng = np.random.default_rng(2)
  w1, w2 = rng.normal(size=(12, 16)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
  model = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ w1) @ w2
  x = rng.uniform(size=(8, 12)).astype(np.float32)
  sigma = np.linspace(0.2, 1.0, 8).astype(np.float32)
  run = lambda rule, batch_size, s=slice(None): ij.certify(
      model, x[s], sigma[s], jax.random.PRNGKey(5), n0=40, n=4000, alpha=0.01,
      batch_size=batch_size, num_classes=3, ids=np.arange(8)[s], rule=rule)
  radius_mode = run(ij.RadiusRule(0.1), 200)
  assert len(set(radius_mode.num_samples)) > 1
  for a, b in zip(radius_mode, run(ij.RadiusRule(0.1), 1)):  # one image per pass, one in flight
    np.testing.assert_array_equal(a, b)
  decision_mode = run(ij.DecisionRule((0.2, 0.5)), 200)
  assert len(set(decision_mode.num_samples)) > 1
  parts = [run(ij.DecisionRule((0.2, 0.5)), 200, s) for s in (slice(0, 4), slice(4, 8))]
  for field in ("prediction", "radius", "num_samples", "counts"):
    np.testing.assert_array_equal(np.concatenate([getattr(p, field) for p in parts]),
                                  getattr(decision_mode, field))


@pytest.mark.parametrize("make, message", [
    (lambda: ij.RadiusRule(0.0), "tolerance must lie in"),
    (lambda: ij.RadiusRule(1.0), "tolerance must lie in"),
    (lambda: ij.RadiusRule(0.05, 1.0), "tolerance_alpha must lie in"),
    (lambda: ij.DecisionRule((0.5,), -0.1), "tolerance_alpha must lie in"),
    (lambda: ij.DecisionRule((0.5, 0.25)), "radii must be sorted"),
    (lambda: ij.DecisionRule((-0.1, 0.25)), "radii must be finite and >= 0"),
    (lambda: ij.DecisionRule((0.1, float("nan"))), "radii must be finite"),
    (lambda: ij.DecisionRule(()), "radii must list at least one"),
    (lambda: rules.make_rule(0.05, (), tolerance_alpha=1.5), "tolerance_alpha must lie in"),
])
def test_bad_rules_are_rejected(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_n_below_n0_is_rejected_before_compiling(linear, monkeypatch):
  compiled = []
  monkeypatch.setattr(parallel, "_mapped", lambda *a, **k: compiled.append(1))
  with pytest.raises(ValueError, match="n must be >= n0 with sequential"):
    ij.certify(linear, np.zeros((2, 8), np.float32), 0.5, jax.random.PRNGKey(0), n0=100, n=50,
               alpha=0.01, batch_size=32, num_classes=2, rule=ij.RadiusRule())
  assert not compiled


def decision_crossing_rate(theta, alpha, streams, n_max=20_000, lowered_by=0.0, seed=0):
  """Share of Bernoulli(θ) streams whose test of "p ≥ θ" proves it at some decision look
  (its evidence bar lowered by `lowered_by` nats)."""
  looks = rules.decision_looks(n_max)
  successes = stream_counts(theta, looks, streams, seed)
  z = np.float32(stats.norm.ppf(theta))
  evidence = jax.jit(lambda s, f: rules.log_evidence(s, f, z))(
      successes, looks[None] - successes)
  return np.mean(np.any(np.asarray(evidence) >= -np.log(alpha) - lowered_by, axis=1))


@pytest.mark.parametrize("theta", [0.5, pytest.param(0.9, marks=pytest.mark.slow),
                                   pytest.param(0.99, marks=pytest.mark.slow), 0.999])
def test_decision_tests_prove_a_false_claim_with_probability_at_most_alpha(theta):
  # At p = θ, the least favourable null: 10^5 streams, at most α within 3 Monte Carlo errors.
  alpha, streams = 0.05, 100_000
  rate = decision_crossing_rate(theta, alpha, streams)
  assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)
  assert rate > 0.005  # and the check sees crossings at all


def test_decision_tests_with_a_lowered_bar_fail_the_same_check():
  # The check can fail: the same evidence with its bar at 4α instead of α crosses too often.
  alpha, streams = 0.05, 100_000
  rate = decision_crossing_rate(0.99, alpha, streams, lowered_by=np.log(4))
  assert rate > alpha + 3 * np.sqrt(alpha * (1 - alpha) / streams)


def exact_log_evidence(successes, failures, z):
  """float64 log of the mixture likelihood ratio with the device's alternatives, no margin."""
  log_odds = np.asarray(rules.alternatives(np.float32(z)), np.float64)
  log_theta, log_rest = stats.norm.logcdf(z), stats.norm.logcdf(-z)
  log_p, log_q = -np.logaddexp(0, -log_odds), -np.logaddexp(0, log_odds)
  terms = list(successes * (log_p - log_theta) + failures * (log_q - log_rest))
  terms.append(-successes * log_theta if failures == 0 else -np.inf)
  return np.logaddexp.reduce(terms) - np.log(len(terms))


@pytest.mark.parametrize("z", [0.0, 0.3, 1.0, 2.0, 3.0, 4.0, 5.0])
def test_float32_evidence_never_exceeds_the_float64_value(z):
  counts = [0, 1, 7, 60, 500, 4_000, 30_000, 100_000]
  grid = [(s, f) for s in counts for f in counts if 0 < s + f <= 100_000]
  s, f = np.array(grid, np.float64).T
  device = np.asarray(rules.log_evidence(s, f, np.float32(z)), np.float64)
  exact = np.array([exact_log_evidence(a, b, np.float64(np.float32(z))) for a, b in grid])
  finite = np.isfinite(exact)
  assert np.all(device[finite] <= exact[finite])
  # and the margin costs little: under 0.1 nat plus 0.5% where the evidence is large
  assert np.all(device[finite] >= exact[finite] - 0.1 - 5e-3 * np.abs(exact[finite]))
  assert np.all(device[~finite] == -np.inf)


def test_chernoff_upper_bound_lies_between_clopper_pearson_at_its_level_and_far_below():
  # Chernoff's bound is the looser one: P[Bin(t, U) ≤ S] ≤ e^(−t·KL) = δ at its U, so
  # Clopper–Pearson's root (where that probability equals δ) is below it; and it stays
  # within Clopper–Pearson at δ/100 on this grid, so it is not vacuous.
  delta = 0.01
  for t in (50, 1_000, 30_000, 100_000):
    s = np.unique(np.linspace(0, t, 200).astype(np.int64))
    upper = np.asarray(rules.chernoff_upper(jnp.asarray(s), jnp.full(len(s), t),
                                                 np.float32(np.log(1 / delta))), np.float64)
    assert np.all(upper >= bounds.clopper_pearson_upper(s, t, delta) - 1e-6)
    assert np.all(upper <= bounds.clopper_pearson_upper(s, t, delta / 100) + 1e-6)


def test_decision_mode_a_looser_tolerance_level_stops_sooner_and_proves_the_same(linear):
  radii = (0.25, 0.5, 0.75, 1.0)
  strict = certify_linear(linear, ij.DecisionRule(radii, None))
  loose = certify_linear(linear, ij.DecisionRule(radii))  # at 0.05
  np.testing.assert_array_equal(loose.radius, strict.radius)
  assert np.all(loose.num_samples <= strict.num_samples)
  assert loose.num_samples.sum() < strict.num_samples.sum()
  # The saturated input (p_A = Φ(5)) proves Φ(1.0/0.5) with its first ~400 successes:
  # log(10/α)/log(1/Φ(2)) = 398 for the mixture's p = 1 alternative.
  assert strict.num_samples[-1] <= 450


def test_decision_mode_gives_up_a_radius_no_continuation_could_prove(linear):
  # p_A = Φ(1.004) sits just above Φ(0.5/σ) = Φ(1): proving "R ≥ 0.5" would take millions of
  # samples, so the test gives it up long before n_max and keeps the proof of R ≥ 0.25.
  x = linear.points_at_distance(np.array([0.502]))
  cert = ij.certify(linear, x, 0.5, jax.random.PRNGKey(0), n0=100, n=100_000, alpha=0.001,
                    batch_size=1000, num_classes=2,
                    rule=ij.DecisionRule((0.25, 0.5, 0.75, 1.0)))
  assert cert.radius[0] == 0.25
  assert cert.num_samples[0] <= 60_000

def giving_up_rates(p, tables, rule, n_max, sigma, proof_count, streams=10_000, seed=0):
  """Shares of Bernoulli(p) streams that DecisionRule gives up "R ≥ r" on (stops without
  proving it), and that do so at a look where S_t + p·(n_max − t), the final count expected
  from the samples seen, would still prove it."""
  looks = rules.decision_looks(n_max)
  successes = stream_counts(p, looks, streams, seed)
  stop = jax.jit(lambda s, t, level: rule.stop(tables, 0, s, t, n_max,
                                               jnp.full(s.shape, sigma, jnp.float32), level))
  level = jnp.zeros(streams, jnp.int32)
  done, gave_up, wrongly = (np.zeros(streams, bool) for _ in range(3))
  for l, t in enumerate(looks):
    stopped, level = stop(jnp.asarray(successes[:, l], jnp.int32), jnp.full(streams, t, jnp.int32),
                          level)
    now = np.asarray(stopped) & ~done & (np.asarray(level) < 2)
    gave_up |= now
    wrongly |= now & (successes[:, l] + p * (n_max - t) >= proof_count)
    done |= np.asarray(stopped)
  return gave_up.mean(), wrongly.mean()


@pytest.mark.slow
def test_decision_mode_gives_up_a_provable_radius_with_probability_at_most_delta():
  # p_A just above the rate a proof of R ≥ 0.5 needs by n_max: the rule may give up (it
  # often does: the proof is a coin flip), but at a look where the expected final count
  # given the samples seen would still prove it in at most δ of the streams (docs/sequential.md).
  n_max, alpha, delta, sigma = 20_000, 0.001, 0.05, 0.5
  rule = rules.DecisionRule((0.5,), delta)
  z = np.float32(0.5 / sigma * (1 + rules.Z_INFLATION))
  counts = np.arange(n_max + 1)
  proof_count = int(np.argmax(np.asarray(rules.log_evidence(counts, n_max - counts, z))
                              >= -np.log(alpha)))
  tables = rule.tables(n_max, alpha)
  for p in (proof_count / n_max + 0.002, proof_count / n_max + 0.005):
    gave_up, wrongly = giving_up_rates(p, tables, rule, n_max, sigma, proof_count)
    assert gave_up > 0.01 and wrongly <= delta + 3 * np.sqrt(delta * (1 - delta) / 10_000)
  # The check can fail: with the estimate p̂ in place of the upper bound it gives up wrongly
  # in most streams.
  plug_in = (tables[0], np.float32(0.0))
  _, wrongly = giving_up_rates(proof_count / n_max + 0.002, plug_in, rule, n_max, sigma,
                               proof_count)
  assert wrongly > 0.5


class NaiveDecisionRule(rules.DecisionRule):
  """The unsound control: proves "R ≥ r" once the Clopper–Pearson bound at the whole α, at
  whichever look the engine is at, clears Φ(r/σ), so every look spends α afresh."""

  def tables(self, n_max, alpha):
    looks = self.looks(n_max, alpha)
    counts = np.concatenate([np.arange(t + 1) for t in looks])
    offsets = np.concatenate([[0], np.cumsum(looks + 1)[:-1]]).astype(np.int32)
    lower = bounds.clopper_pearson_lower(counts, np.repeat(looks, looks + 1), alpha)
    return offsets, lower.astype(np.float32)

  def stop(self, tables, look, successes, trials, n_max, sigma, level):
    offsets, lower = tables
    bound = lower[offsets[look] + successes]
    thresholds = jax.scipy.stats.norm.cdf(jnp.asarray(self.radii)[None, :] / sigma[:, None])
    proven = jnp.concatenate([(bound > 0.5)[:, None], bound[:, None] >= thresholds], axis=1)
    level = jnp.maximum(level, jnp.sum(jnp.cumprod(proven, axis=1), axis=1).astype(jnp.int32))
    return level == len(self.radii) + 1, level


@pytest.mark.slow
def test_the_engine_is_sound_end_to_end_where_full_alpha_at_every_look_is_not(linear):
  # 2,000 inputs at distance 0.245 < r = 0.25 (p_A = Φ(0.49) just under Φ(0.5)): "R ≥ 0.25"
  # is false for every one. Through the same engine, the decision test proves it in at most
  # α of them; a test spending the whole α at each of its ~50 looks, in far more.
  x = linear.points_at_distance(np.full(2000, 0.245))
  slack = 3 * np.sqrt(0.05 * 0.95 / 2000)
  certify = lambda rule: ij.certify(linear, x, 0.5, jax.random.PRNGKey(3), n0=50, n=4000,
                                    alpha=0.05, batch_size=4000, num_classes=2, rule=rule)
  assert np.mean(certify(ij.DecisionRule((0.25,))).radius > 0.245) <= 0.05 + slack
  assert np.mean(certify(NaiveDecisionRule((0.25,))).radius > 0.245) > 0.05 + slack


def test_the_reported_radius_is_the_bound_at_the_stopping_looks_level(linear):
  # Radius mode's certificate: σ·Φ⁻¹ of the Clopper–Pearson bound at level α_l of the look l
  # it stopped at (the union bound's share of that look), recomputed here in float64.
  cert = certify_linear(linear, ij.RadiusRule(0.05), n=20_000)
  looks = rules.look_schedule(20_000, 0.001, 0.05)
  levels = rules.look_alphas(0.001, looks)
  stopped = np.searchsorted(looks, cert.num_samples)
  np.testing.assert_array_equal(looks[stopped], cert.num_samples)
  assert len(set(cert.num_samples)) >= 3  # several stopping looks are checked
  certified = cert.prediction != ij.ABSTAIN
  assert certified.sum() >= 8 and np.all(cert.radius[~certified] == 0)
  successes = cert.counts[certified, cert.prediction[certified]]
  bound = bounds.clopper_pearson_lower(successes, cert.num_samples[certified],
                                       levels[stopped[certified]])
  np.testing.assert_allclose(cert.p_lower[certified], bound, rtol=1e-12)
  np.testing.assert_allclose(cert.radius[certified],
                             (0.5 * stats.norm.ppf(bound)).astype(np.float32), rtol=1e-6)
