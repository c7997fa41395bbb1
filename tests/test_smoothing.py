"""CERTIFY, PREDICT and the Monte Carlo counts against cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import instars_jax as ij
from instars_jax import parallel


def mlp(num_classes=3, seed=0, dim=12):
  rng = np.random.default_rng(seed)
  w1 = rng.normal(size=(dim, 16)).astype(np.float32)
  w2 = rng.normal(size=(16, num_classes)).astype(np.float32)
  return lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


# --- Clopper–Pearson ---------------------------------------------------------------

def test_clopper_pearson_known_values():
  # 95% two-sided exact interval for 5/10 is (0.1871, 0.8129): its lower end is the
  # one-sided 97.5% bound.
  assert ij.clopper_pearson_lower(5, 10, 0.025) == pytest.approx(0.18709, abs=1e-5)
  # Closed forms: all successes -> α^(1/n); one success -> 1 − (1 − α)^(1/n).
  assert ij.clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** 0.1, rel=1e-12)
  assert ij.clopper_pearson_lower(1, 20, 0.01) == pytest.approx(1 - 0.99 ** (1 / 20), rel=1e-9)
  assert ij.clopper_pearson_lower(0, 100, 0.001) == 0.0
  bounds = ij.clopper_pearson_lower(np.array([0, 50, 100]), 100, 0.001)
  assert np.all(np.isfinite(bounds)) and bounds[0] == 0.0 and 0.3 < bounds[1] < 0.5


def test_clopper_pearson_covers_at_level():
  # Coverage of a one-sided bound: P[lower > p] <= α for every p.
  rng = np.random.default_rng(0)
  for p in (0.3, 0.9, 0.999):
    draws = rng.binomial(200, p, size=20_000)
    assert np.mean(ij.clopper_pearson_lower(draws, 200, 0.05) > p) <= 0.05 + 0.005


# --- counts ------------------------------------------------------------------------

def test_counts_sum_to_num_and_are_deterministic():
  f = mlp()
  x = np.random.default_rng(1).uniform(size=(5, 12)).astype(np.float32)
  key = jax.random.PRNGKey(3)
  counts = np.asarray(ij.sample_counts(f, x, 0.5, key, num=257, batch_size=64, num_classes=3))
  assert counts.dtype == np.int32 and counts.shape == (5, 3)
  np.testing.assert_array_equal(counts.sum(1), 257)
  again = ij.sample_counts(f, x, 0.5, key, num=257, batch_size=64, num_classes=3)
  np.testing.assert_array_equal(counts, again)
  other = ij.sample_counts(f, x, 0.5, jax.random.PRNGKey(4), num=257, batch_size=64, num_classes=3)
  assert not np.array_equal(counts, other)


def test_counts_match_analytic_probability(linear):
  distances = np.array([0.05, 0.2, 0.5])
  x = linear.points_at_distance(distances)
  counts = np.asarray(ij.sample_counts(linear, x, 0.4, jax.random.PRNGKey(0), num=20_000,
                                       batch_size=4096, num_classes=2))
  p = stats.norm.cdf(distances / 0.4)
  # 5 standard errors: a real check, failing with negligible probability under a fixed seed.
  assert np.all(np.abs(counts[:, 0] / 20_000 - p) < 5 * np.sqrt(p * (1 - p) / 20_000))


def test_counts_invariant_to_batch_size_and_grouping():
  f = mlp()
  x = np.random.default_rng(2).uniform(size=(7, 12)).astype(np.float32)
  sigma = np.linspace(0.2, 1.0, 7).astype(np.float32)
  key = jax.random.PRNGKey(5)
  reference = np.asarray(ij.sample_counts(f, x, sigma, key, num=300, batch_size=100, num_classes=3))
  for batch_size in (1, 5000):  # one sample per pass; every sample in one pass
    np.testing.assert_array_equal(
        ij.sample_counts(f, x, sigma, key, num=300, batch_size=batch_size, num_classes=3), reference)
  # Split into groups, each with the instances' own ids: same counts.
  parts = [ij.sample_counts(f, x[s], sigma[s], key, num=300, batch_size=37, num_classes=3,
                            ids=np.arange(7)[s]) for s in (slice(0, 3), slice(3, 6), slice(6, 7))]
  np.testing.assert_array_equal(np.concatenate(parts), reference)
  # Reordering instances (with their ids) reorders the counts.
  order = np.array([6, 0, 3, 1, 5, 2, 4])
  np.testing.assert_array_equal(
      ij.sample_counts(f, x[order], sigma[order], key, num=300, batch_size=50, num_classes=3,
                       ids=order), reference[order])


def test_typed_keys_give_the_counts_of_their_raw_keys():
  f = mlp()
  x = np.random.default_rng(2).uniform(size=(3, 12)).astype(np.float32)
  typed = ij.sample_counts(f, x, 0.3, jax.random.key(0), num=50, batch_size=8, num_classes=3)
  raw = ij.sample_counts(f, x, 0.3, jax.random.PRNGKey(0), num=50, batch_size=8, num_classes=3)
  np.testing.assert_array_equal(typed, raw)
  assert len(np.unique(np.asarray(raw), axis=0)) > 1  # the three inputs do differ


# --- CERTIFY / PREDICT against the analytic linear classifier ----------------------

def test_certify_radius_is_sound_and_tight(linear):
  sigma = 0.5
  distances = np.array([0.02, 0.1, 0.25, 0.5, 0.8, 1.0])
  x = linear.points_at_distance(distances)
  cert = ij.certify(linear, x, sigma, jax.random.PRNGKey(0), n0=100, n=100_000, alpha=0.001,
                    batch_size=20_000, num_classes=2)
  assert isinstance(cert, ij.Certificate)
  certified = cert.prediction != ij.ABSTAIN
  assert np.all(cert.prediction[certified] == 0)
  # Sound: never above the true distance to the boundary.
  assert np.all(cert.radius <= linear.distance(x) + 1e-6)
  # Tight where p_A is not near 1 (p_A = Φ(d/σ) <= Φ(2) here): within 6% at n = 100k.
  assert np.all(certified[1:])
  np.testing.assert_allclose(cert.radius[1:], distances[1:], rtol=0.06)
  # The bound is the Clopper–Pearson bound of the estimation counts.
  n_a = cert.counts[np.arange(len(x)), 0]
  np.testing.assert_allclose(cert.p_lower, ij.clopper_pearson_lower(n_a, 100_000, 0.001))
  np.testing.assert_allclose(cert.radius[certified],
                             sigma * stats.norm.ppf(cert.p_lower[certified]), rtol=1e-5)
  np.testing.assert_array_equal(cert.counts.sum(1), 100_000)
  np.testing.assert_array_equal(cert.sigma, sigma)


def test_certify_handles_all_and_no_successes(linear):
  # Far on class 0's side: n_A = n, radius capped at σ·Φ⁻¹(α^(1/n)), no NaN.
  x = linear.points_at_distance(np.array([50.0]))
  cert = ij.certify(linear, x, 0.25, jax.random.PRNGKey(1), n0=10, n=1000, alpha=0.001,
                    batch_size=512, num_classes=2)
  assert cert.prediction[0] == 0
  assert cert.radius[0] == pytest.approx(0.25 * stats.norm.ppf(0.001 ** (1 / 1000)), rel=1e-5)
  # A classifier that ignores its input and always says class 1 gives n_A = n for class 1.
  constant = lambda x: jnp.zeros((x.shape[0], 2)).at[:, 1].set(1.0)
  cert = ij.certify(constant, x, 0.25, jax.random.PRNGKey(1), n0=10, n=1000, alpha=0.001,
                    batch_size=512, num_classes=2)
  assert cert.prediction[0] == 1 and np.isfinite(cert.radius[0])


def test_certify_abstains_on_the_boundary(linear):
  x = linear.points_at_distance(np.array([0.0, 0.0005]))
  cert = ij.certify(linear, x, 0.5, jax.random.PRNGKey(2), n0=100, n=10_000, alpha=0.001,
                    batch_size=4096, num_classes=2)
  np.testing.assert_array_equal(cert.prediction, ij.ABSTAIN)
  np.testing.assert_array_equal(cert.radius, 0.0)


def test_certify_failure_rate_is_at_most_alpha(linear):
  # 400 points at distance 0.3 with α = 0.05: the radius exceeds the truth at most ~5% of the time.
  x = linear.points_at_distance(np.full(400, 0.3))
  cert = ij.certify(linear, x, 0.5, jax.random.PRNGKey(7), n0=50, n=500, alpha=0.05,
                    batch_size=8192, num_classes=2)
  assert np.mean(cert.radius > 0.3) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 400)


def test_predict(linear):
  x = linear.points_at_distance(np.array([0.0, 0.001, 0.5, 1.0]))
  prediction = ij.predict(linear, x, 0.5, jax.random.PRNGKey(0), n=1000, alpha=0.001,
                          batch_size=4000, num_classes=2)
  np.testing.assert_array_equal(prediction, [ij.ABSTAIN, ij.ABSTAIN, 0, 0])
  flipped = ij.predict(linear, linear.points_at_distance(np.array([-0.5])), 0.5,
                       jax.random.PRNGKey(0), n=1000, alpha=0.001, batch_size=1000, num_classes=2)
  np.testing.assert_array_equal(flipped, [1])


# --- bad input ---------------------------------------------------------------------

GOOD = dict(n0=10, n=100, alpha=0.01, batch_size=32, num_classes=2)


@pytest.mark.parametrize("change, message", [
    (dict(x=np.full((2, 8), np.nan, np.float32)), "x contains NaN"),
    (dict(x=np.array([[np.inf] * 8], np.float32)), "x contains NaN"),
    (dict(x=np.zeros((8,), np.float32)), "x must have shape"),
    (dict(sigma=0.0), "sigma must be finite and > 0"),
    (dict(sigma=-1.0), "sigma must be finite and > 0"),
    (dict(sigma=float("nan")), "sigma must be finite"),
    (dict(sigma=np.ones(3, np.float32)), "sigma must be a scalar or have shape"),
    (dict(ids=np.arange(5)), "ids must be integers of shape"),
    (dict(n0=0), "n0 must be an integer >= 1"),
    (dict(n=0), "n must be an integer >= 1"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(alpha=0.0), "alpha must lie in"),
    (dict(alpha=1.0), "alpha must lie in"),
    (dict(num_classes=1), "num_classes must be"),
    (dict(num_classes=3), "apply_fn must map"),
    (dict(x=np.zeros((2, 5), np.float32)), "apply_fn cannot take inputs"),
])
def test_bad_input_is_rejected_before_compiling(linear, change, message, monkeypatch):
  compiled = []
  monkeypatch.setattr(parallel, "_mapped", lambda *a, **k: compiled.append(1))
  args = dict(x=np.zeros((2, 8), np.float32), sigma=0.5, ids=None, **GOOD)
  args.update(change)
  with pytest.raises(ValueError, match=message):
    ij.certify(linear, args.pop("x"), args.pop("sigma"), jax.random.PRNGKey(0), **args)
  assert not compiled


def test_predict_and_counts_validate_too(linear):
  x = np.zeros((2, 8), np.float32)
  with pytest.raises(ValueError, match="alpha"):
    ij.predict(linear, x, 0.5, jax.random.PRNGKey(0), n=10, alpha=2.0, batch_size=4, num_classes=2)
  with pytest.raises(ValueError, match="num must be"):
    ij.sample_counts(linear, x, 0.5, jax.random.PRNGKey(0), num=0, batch_size=4, num_classes=2)
