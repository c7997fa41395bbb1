"""The certificate kinds' steps, each pinned so that a variant breaking it fails: the exact
counts and levels of thresholded's bounds, the cascade against an island its levels see,
the tie rules, float32(σ) in every radius, the cascade with σ experts, and thresholded
with sequential sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import instars_jax as ij
from helpers import LinearClassifier, prepared, recorded_bounds, x7_chain
from instars_jax import certificates
from instars_jax.certificates import SmoothedModel, cascade, fixed_sigma, locally_constant
from instars_jax.certificates import thresholded
from instars_jax.smoothing import bounds, sampler
from instars_jax.smoothing.sequential import rules
from instars_jax.smoothing.streams import Stream
from instars_jax.selection.estimator import Estimator


def node_lower_counts(smoothed, chain, grid, x, ids):
  """[int[B] per node]: each node's bin-0 count over all of x, from the chain's stream
  fold_in(fold_in(key, THRESHOLDED), k) for the node of grid index k (the noise of input i
  depends only on (key, ids[i]), so the inputs a node sees get these counts)."""
  found = []
  for depth, node in enumerate(chain):
    key = jax.random.fold_in(jax.random.fold_in(smoothed.key, Stream.THRESHOLDED),
                             len(grid) - 1 - depth)
    found.append(np.asarray(ij.sample_counts(node.fn, x, node.sigma, key, num=node.n,
                                             batch_size=smoothed.batch_size, num_classes=2,
                                             ids=ids))[:, 0])
  return found


def thresholded_path(counts, chain, grid, beta, tau):
  """(σ float32[B], path radius float64[B], abstains bool[B], the inputs each node saw): the
  chain of thresholded's module doc recomputed input by input from the nodes' counts: a
  two-sided Clopper–Pearson interval at β/(2(K − 1)) per side, moving with radius
  float32(σ_k)(Φ⁻¹(L) − Φ⁻¹(τ)) where L ≥ τ, keeping with float32(σ_k)(Φ⁻¹(τ) − Φ⁻¹(U))
  where U < τ, abstaining otherwise."""
  size, level = len(counts[0]), beta / (2 * (len(grid) - 1))
  sigma = np.full(size, grid[0], np.float32)
  path, abstains = np.full(size, np.inf), np.zeros(size, bool)
  seen = [[] for _ in chain]
  for i in range(size):
    for depth, node in enumerate(chain):
      seen[depth].append(i)
      node_sigma = float(np.float32(node.sigma))
      lower = float(bounds.clopper_pearson_lower(counts[depth][i], node.n, level))
      upper = float(bounds.clopper_pearson_upper(counts[depth][i], node.n, level))
      if lower >= tau:
        path[i] = min(path[i], node_sigma * (stats.norm.ppf(lower) - stats.norm.ppf(tau)))
        continue
      if upper < tau:
        path[i] = min(path[i], node_sigma * (stats.norm.ppf(tau) - stats.norm.ppf(upper)))
        sigma[i] = grid[len(grid) - 1 - depth]
      else:
        abstains[i] = True
      break
  return sigma, path, abstains, [np.asarray(s, int) for s in seen]


def chain_rows(smoothed, sigma, path, abstains, x, ids, beta):
  """(prediction, radius, class test) of the chain: CERTIFY of the base model at σ(x) on the
  class-test stream at α − β, its radius capped by the path; abstaining where a node did."""
  cls = ij.certify(smoothed.apply_fn, x, sigma, jax.random.fold_in(smoothed.key, Stream.CLASS_TEST),
                   n0=smoothed.n0, n=smoothed.n, alpha=smoothed.alpha - beta,
                   batch_size=smoothed.batch_size, num_classes=smoothed.num_classes, ids=ids,
                   rule=smoothed.rule)
  certified = ~abstains & (cls.prediction != ij.ABSTAIN)
  return (np.where(certified, cls.prediction, ij.ABSTAIN),
          np.where(certified, np.minimum(path, cls.radius), 0.0), cls)


# ---------------------------------------------------------------------------
# thresholded: every bound's counts and level, and the radius recomputed


def test_thresholded_bounds_each_node_at_its_share_and_its_rows_recompute_exactly(linear,
                                                                                monkeypatch):
  # Nodes on x_7 (helpers.x7_chain) at σ 0.3 and 0.2, neither a float32; τ = 0.8. x_7 = 1.0
  # and 0.6 are kept by node 2 (q = Φ((0.5 − x_7)/0.3) = 0.05, 0.37), 0.25 is too close to
  # its boundary (q = 0.80: abstains), −0.05 is moved by node 2 and kept by node 1 (q = 0.6),
  # −0.3 and −1.0 are moved by both. Each node's L and U must be taken on its own counts at
  # β/(2(K − 1)): a variant with U at the node's whole β/(K − 1) keeps with a larger radius,
  # and the kept inputs' radii below are their node's.
  tau, beta, grid = 0.8, 5e-4, np.float32([0.25, 0.5, 1.0])
  chain = x7_chain(scale=100.0, sigmas=(0.3, 0.2), n=200)
  x = linear.points_at_distance(np.full(6, 1.5))
  x[:, 7] = [1.0, 0.6, 0.25, -0.05, -0.3, -1.0]
  ids = np.arange(20, 26)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(11),
                           n0=16, n=200, alpha=1e-3, batch_size=4096)
  calls = recorded_bounds(monkeypatch)
  cert = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, beta, tau)
  lower_calls, upper_calls = list(calls["lower"]), list(calls["upper"])
  monkeypatch.undo()
  counts = node_lower_counts(smoothed, chain, grid, x, ids)
  sigma, path, abstains, seen = thresholded_path(counts, chain, grid, beta, tau)
  np.testing.assert_array_equal(sigma, np.float32([1.0, 1.0, 0.25, 0.5, 0.25, 0.25]))
  np.testing.assert_array_equal(abstains, [False, False, True, False, False, False])
  for calls_of_one_bound in (lower_calls, upper_calls):  # node 2 on all six, node 1 on three
    assert len(calls_of_one_bound) == 2
    for (successes, trials, level), node_counts, inputs in zip(calls_of_one_bound, counts, seen):
      np.testing.assert_array_equal(successes, node_counts[inputs])
      assert trials == 200 and level == pytest.approx(beta / 4, rel=1e-12)
  prediction, radius, cls = chain_rows(smoothed, sigma, path, abstains, x, ids, beta)
  np.testing.assert_array_equal(cert.sigma, sigma)
  np.testing.assert_array_equal(cert.prediction, prediction)
  np.testing.assert_allclose(cert.radius, radius, rtol=1e-13, atol=0)
  kept = np.array([True, True, False, True, False, False])  # the last node on the path keeps
  assert np.all(path[kept] < cls.radius[kept])  # so the keeping radius is the one reported
  assert np.all(cert.radius <= linear.distance(x) + 1e-6)


def test_thresholded_below_one_half_starts_low_with_the_nodes_own_sigma_and_n(linear,
                                                                            monkeypatch):
  # τ = 0.2: node 2 keeps x at σ = 1.0 only where sure that q = Φ((0.5 − x_7)/0.3) < 0.2, i.e.
  # x_7 beyond 0.5 + 0.3 Φ⁻¹(0.8) = 0.752. x_7 = 1.0 (q = 0.05) stays at 1.0; 0.6 (q = 0.37),
  # which τ = 0.8 keeps at 1.0, is moved, and node 1 (q = Φ(−0.6/0.2) = 0.001) keeps it at
  # 0.5; 0.15 is too close to node 1's boundary 0.2 Φ⁻¹(0.8) = 0.168 (abstains); −0.5 goes to
  # 0.25. The nodes draw n = 300 samples at σ 0.3 and 0.2, the class test n = 200 at the grid's
  # σ: each row recomputes exactly from the module doc's formulas with the node's own σ and n.
  tau, beta, grid = 0.2, 5e-4, np.float32([0.25, 0.5, 1.0])
  chain = x7_chain(scale=100.0, sigmas=(0.3, 0.2), n=300)
  x = linear.points_at_distance(np.full(4, 1.5))
  x[:, 7] = [1.0, 0.6, 0.15, -0.5]
  ids = np.arange(40, 44)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(12), n0=16, n=200, alpha=1e-3,
                           batch_size=4096)
  calls = recorded_bounds(monkeypatch)
  cert = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, beta, tau)
  trials = {int(t) for _, t, _ in calls["lower"]}
  monkeypatch.undo()
  assert trials == {300}
  sigma, path, abstains, _ = thresholded_path(node_lower_counts(smoothed, chain, grid, x, ids),
                                              chain, grid, beta, tau)
  np.testing.assert_array_equal(sigma, np.float32([1.0, 0.5, 0.25, 0.25]))
  np.testing.assert_array_equal(abstains, [False, False, True, False])
  prediction, radius, cls = chain_rows(smoothed, sigma, path, abstains, x, ids, beta)
  assert set(cls.num_samples) == {200}
  np.testing.assert_array_equal(cert.sigma, sigma)
  np.testing.assert_array_equal(cert.prediction, prediction)
  np.testing.assert_allclose(cert.radius, radius, rtol=1e-13, atol=0)
  assert np.all(cert.radius[[0, 1, 3]] > 0)


@pytest.mark.parametrize("tau", [0.8, 0.2])
def test_a_node_radius_with_its_exact_probability_is_the_distance_to_its_boundary(monkeypatch,
                                                                                 tau):
  # A node smoothed at 1.5 (1.5x the grid's top σ, its own) on x_7 with cut 0.5 has
  # q(x) = Φ((0.5 − x_7)/1.5) exactly; its decision boundary is x_7 = 0.5 − 1.5 Φ⁻¹(τ).
  # With the interval replaced by the exact q (any n), the node's radius must be the exact
  # distance to that boundary on both routes: the formula σ_node |Φ⁻¹(q) − Φ⁻¹(τ)| with the
  # node's σ, not the class test's.
  node = x7_chain(scale=1.0, sigmas=(1.5, 0.2), n=777)[0]
  x7 = np.array([-2.0, -0.7, 0.1, 0.9, 1.6, 3.0])
  exact = stats.norm.cdf((0.5 - x7) / 1.5)
  monkeypatch.setattr(bounds, "clopper_pearson_lower", lambda successes, trials, level: exact)
  monkeypatch.setattr(bounds, "clopper_pearson_upper", lambda successes, trials, level: exact)
  moves, keeps, radius = thresholded.node_decision(np.zeros(len(x7), int), node, 1e-3, tau)
  boundary = 0.5 - 1.5 * stats.norm.ppf(tau)
  np.testing.assert_array_equal(moves, x7 <= boundary)
  np.testing.assert_array_equal(keeps, x7 > boundary)
  np.testing.assert_allclose(radius, np.abs(x7 - boundary), rtol=1e-12)


# ---------------------------------------------------------------------------
# thresholded with shared samples: the class test on its path's last node's z_j


def test_shared_samples_give_the_class_test_the_node_s_very_draws(linear, monkeypatch):
  # The node (σ 1.0 against 0.5, smoothed at 1.0) votes "lower" where x_7 + 1.0 ε_7 > 0 and
  # the class model says 0 where x_7 + σ ε_7 > 0: at x_7 = 0 both depend on the sign of z_7
  # alone, so on shared samples the class test's count of class 0 at either route σ is the
  # node's count of "lower", sample for sample; apart, they differ.
  grid, beta = np.float32([0.5, 1.0]), 5e-4
  node = x7_chain(scale=100.0, sigmas=(1.0, 0.5), n=300)[0]
  node = type(node)(node.grid, 1.0, fn=lambda z: jnp.stack([z[:, 7], -z[:, 7]], -1) * 100.0,
                    n=300)
  x = linear.points_at_distance(np.full(3, 1.0))
  x[:, 7] = 0.0
  ids = np.arange(3)
  sign = lambda z: jnp.stack([z[:, 7], -z[:, 7]], -1) * 100.0
  smoothed = SmoothedModel(sign, 2, jax.random.PRNGKey(5), n0=16, n=300, alpha=1e-3,
                           batch_size=4096)
  stream = jax.random.fold_in(jax.random.fold_in(smoothed.key, Stream.THRESHOLDED), 1)
  lower = thresholded.node_counts(smoothed, node, x, ids, thresholded.counts_key(stream, True))
  for shared in (True, False):
    tests = thresholded.class_tests(smoothed, grid, x, ids, beta, shared)
    for sigma in grid:
      same = np.array_equal(tests[sigma].counts[:, 0], lower)
      assert same == shared, (shared, sigma)
  assert 100 < lower.min() and lower.max() < 200
  # The α split pinned as without sharing: each node bound at β/(2(K − 1)), the class test
  # at α − β.
  calls, class_alphas = recorded_bounds(monkeypatch), []
  certify = sampler.certify
  monkeypatch.setattr(sampler, "certify", lambda *a, **k: class_alphas.append(k["alpha"])
                      or certify(*a, **k))
  cert = thresholded.certify_thresholded(smoothed, [node], grid, x, ids, beta, 0.9, True)
  assert cert.num_samples.tolist() == [300] * 3
  assert class_alphas == [pytest.approx(1e-3 - beta)]
  assert [level for _, _, level in calls["lower"] + calls["upper"]] == [beta / 2] * 2


@pytest.mark.parametrize("tau", [0.8, pytest.param(0.2, marks=pytest.mark.slow)])
def test_the_chain_on_shared_samples_recomputes_from_its_nodes_draws_and_sweeps_alike(linear,
                                                                                     tau):
  # The x_7 chain (K = 3) with shared samples: each node's counts come from
  # fold_in(its stream, ESTIMATE), and each input's class test is CERTIFY at its σ on the
  # stream of the last node on its path (node index max(k, 1)), so the rows recompute from
  # those draws; they differ from the unshared chain's, and the sweep gives the same rows.
  beta, grid = 5e-4, np.float32([0.25, 0.5, 1.0])
  chain = x7_chain(scale=100.0, sigmas=(0.3, 0.2), n=200)
  x = linear.points_at_distance(np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.25, 0.6, 0.35]))
  x[:, 7] = [1.0, 0.6, 0.4, -0.05, -0.3, -1.0, 0.9, -0.6]
  ids = np.arange(50, 58)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(13), n0=16, n=200, alpha=1e-3,
                           batch_size=4096)
  streams = [jax.random.fold_in(jax.random.fold_in(smoothed.key, Stream.THRESHOLDED),
                                len(grid) - 1 - depth) for depth in range(len(chain))]
  counts = [np.asarray(ij.sample_counts(node.fn, x, node.sigma,
                                        jax.random.fold_in(stream, Stream.ESTIMATE), num=node.n,
                                        batch_size=4096, num_classes=2, ids=ids))[:, 0]
            for node, stream in zip(chain, streams)]
  sigma, path, abstains, _ = thresholded_path(counts, chain, grid, beta, tau)
  assert len(set(sigma[~abstains])) >= 2
  level = np.searchsorted(grid, sigma)
  cls = [ij.certify(linear, x[i:i + 1], sigma[i], streams[len(grid) - 1 - max(level[i], 1)],
                    n0=16, n=200, alpha=1e-3 - beta, batch_size=4096, num_classes=2,
                    ids=ids[i:i + 1]) for i in range(len(x))]
  radius = np.array([c.radius[0] for c in cls])
  prediction = np.array([c.prediction[0] for c in cls])
  certified = ~abstains & (prediction != ij.ABSTAIN)
  assert np.sum(certified & (radius < path)) >= 2  # the class test's own radius is reported
  cert = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, beta, tau, True)
  np.testing.assert_array_equal(cert.sigma, sigma)
  np.testing.assert_array_equal(cert.prediction, np.where(certified, prediction, ij.ABSTAIN))
  np.testing.assert_allclose(cert.radius, np.where(certified, np.minimum(path, radius), 0.0),
                             rtol=1e-13, atol=0)
  apart = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, beta, tau, False)
  assert not np.array_equal(apart.radius, cert.radius)
  swept = thresholded.sweep(smoothed, chain, grid, x, ids, beta, (tau,), shared=True)[tau]
  for field in ("prediction", "radius", "sigma", "num_samples"):
    np.testing.assert_array_equal(getattr(swept, field), getattr(cert, field))


# The non-linear problem: only x_0 matters. f says class 0 where |x_0| < 1 (a slab); the node,
# smoothed at 1.0, votes "lower" (σ = 0.25) where x_0 > 0.8, so q(x) = Φ(x_0 − 0.8) and at
# τ = 0.7 the route is σ = 0.25 beyond x_0 = 0.8 + Φ⁻¹(0.7): σ(x) matters, since g_1.0's
# slab ends near 0.94 and g_0.25's at 1.
SLAB, CUT, SHARED_TAU, SHARED_GRID = 1.0, 0.8, 0.7, (0.25, 1.0)


def slab(z):
  inside = (SLAB - jnp.abs(z[:, 0])) * 100.0
  return jnp.stack([inside, -inside], axis=-1)


def exact_g(x0, sigma):
  """The exact smoothed slab classifier along x_0: 0 where P(|x_0 + σε| < 1) > 1/2."""
  p0 = stats.norm.cdf((SLAB - x0) / sigma) - stats.norm.cdf((-SLAB - x0) / sigma)
  return np.where(p0 > 0.5, 0, 1)


def exact_G(x0):
  route_low = stats.norm.cdf(x0 - CUT) >= SHARED_TAU
  return np.where(route_low, exact_g(x0, SHARED_GRID[0]), exact_g(x0, SHARED_GRID[1]))


def false_certificates(x0, prediction, radius) -> int:
  """How many certificates claim a class that the exact G(x') = g_σ(x')(x') breaks somewhere
  in their ball (f and the node read x_0 alone, so the ball's worst points lie along it)."""
  false = 0
  for centre, c, r in zip(x0, prediction, radius):
    if c == ij.ABSTAIN:
      continue
    along = centre + np.linspace(-r, r, 2001)[1:-1] if r > 0 else np.array([centre])
    false += int(np.any(exact_G(along) != c))
  return false


def chain_on_shared_samples(x0, rng, *, n, n0, alpha, beta, filtered):
  """The thresholded chain of one node on shared samples, in numpy: the class test at the
  route σ on the node's own z_j. `filtered`: the variant the proof does not allow, counting
  only the samples on which the node voted for the route taken."""
  z = rng.standard_normal((len(x0), n))
  votes_lower = x0[:, None] + z > CUT
  count = votes_lower.sum(axis=1)
  lower = bounds.clopper_pearson_lower(count, n, beta / 2)
  upper = bounds.clopper_pearson_upper(count, n, beta / 2)
  moves, keeps = lower >= SHARED_TAU, upper < SHARED_TAU
  node_radius = np.where(moves, stats.norm.ppf(lower) - stats.norm.ppf(SHARED_TAU),
                         stats.norm.ppf(SHARED_TAU) - stats.norm.ppf(np.minimum(upper, SHARED_TAU)))
  sigma = np.where(moves, SHARED_GRID[0], SHARED_GRID[1])
  selection = np.abs(x0[:, None] + sigma[:, None] * rng.standard_normal((len(x0), n0))) < SLAB
  guess = np.where(selection.mean(axis=1) > 0.5, 0, 1)
  says = np.abs(x0[:, None] + sigma[:, None] * z) < SLAB  # class 0 on each shared sample
  hits = np.where(guess[:, None] == 0, says, ~says)
  used = np.where(moves[:, None], votes_lower, ~votes_lower) if filtered else np.ones_like(says)
  p_lower = bounds.clopper_pearson_lower((hits & used).sum(axis=1), used.sum(axis=1), alpha - beta)
  certified = (moves | keeps) & (p_lower >= 0.5)
  radius = np.minimum(node_radius, sigma * stats.norm.ppf(np.maximum(p_lower, 0.5)))
  return np.where(certified, guess, ij.ABSTAIN), np.where(certified, radius, 0.0)


def test_shared_samples_never_certify_falsely_where_a_class_test_filtered_by_the_node_does():
  # 400 inputs over x_0 ∈ [−2.5, 2.5], n = 400, α = 1e-3 (β = α/2): the package's chain on
  # shared samples and the numpy chain on shared samples give no false certificate against the
  # exact G; the variant counting only the samples that voted for the route inflates p_A
  # where the node and the slab read the same noise (kept inputs near x_0 = 0.5: 0.89
  # against 0.63) and certifies falsely, many times.
  rng = np.random.default_rng(0)
  x0 = np.sort(rng.uniform(-2.5, 2.5, 400))
  x = np.zeros((len(x0), 8), np.float32)
  x[:, 0] = x0
  alpha, beta, n = 1e-3, 5e-4, 400
  node = Estimator((0.25, 1.0), 1.0, fn=lambda z: jnp.stack([z[:, 0] - CUT, CUT - z[:, 0]], -1)
                   * 100.0, n=n)
  smoothed = SmoothedModel(slab, 2, jax.random.PRNGKey(21), n0=32, n=n, alpha=alpha,
                           batch_size=65536)
  cert = thresholded.certify_thresholded(smoothed, [node], np.float32(SHARED_GRID), x,
                                         np.arange(len(x)), beta, SHARED_TAU, True)
  certified = cert.prediction != ij.ABSTAIN
  assert certified.mean() > 0.6 and set(cert.sigma[certified]) == set(np.float32(SHARED_GRID))
  assert false_certificates(x0, cert.prediction, cert.radius) == 0
  sound = chain_on_shared_samples(x0, rng, n=n, n0=32, alpha=alpha, beta=beta, filtered=False)
  assert false_certificates(x0, *sound) == 0
  filtered = chain_on_shared_samples(x0, rng, n=n, n0=32, alpha=alpha, beta=beta, filtered=True)
  assert false_certificates(x0, *filtered) >= 20


# ---------------------------------------------------------------------------
# cascade: an island that its levels see


ISLAND_RHO = 1.0


def disc(z):
  """Class 0 inside the disc of radius ISLAND_RHO around the origin of the first two
  coordinates, class 1 outside. In 2-d, p_0 under N(0, σ²I) at distance r from the centre is
  the non-central χ²₂ cdf at (ρ/σ)² with non-centrality (r/σ)²: at σ = 0.25 about 1 inside
  (r < 0.5), at σ = 0.8 from 0.54 at the centre down to 0.32 at r = 1 and 0.24 at r = 1.25,
  so the top level answers 1 from r ≈ 0.8 (L ≥ p₀ = 0.55), inside the disc."""
  inside = jnp.linalg.norm(z.reshape(z.shape[0], -1)[:, :2], axis=1) < ISLAND_RHO
  score = jnp.where(inside, 1.0, -1.0)
  return jnp.stack([score, -score], axis=-1)


def test_cascade_sees_the_island_and_certifies_no_intersecting_balls():
  # Points on a ray from the centre. The top level (σ = 0.8) answers 1 from r ≈ 0.8 on, with
  # balls reaching back towards the centre; near the centre it passes x down and σ = 0.25
  # answers 0. g at σ = 0.25 is 0 up to r ≈ 1, so a 0-ball bounded only by its own level
  # (the off-class bound left out, or not taken in the min) reaches into the top level's
  # 1-region, and meets the 1-balls certified there: such variants certify hundreds of
  # intersecting pairs here. The sound cascade caps the 0-balls by the top level's margin of
  # class 1 below p₀, and certifies none.
  r = np.linspace(0.0, 2.5, 64)
  x = np.zeros((len(r), 2), np.float32)
  x[:, 0] = r
  smoothed = SmoothedModel(disc, 2, jax.random.PRNGKey(0),
                           n0=32, n=2000, alpha=0.001, batch_size=8192)
  cert = cascade.certify_cascade(smoothed, x, np.arange(len(r)), (0.25, 0.8), 0.55)
  low = (cert.sigma == np.float32(0.25)) & (cert.prediction == 0)
  top = (cert.sigma == np.float32(0.8)) & (cert.prediction == 1)
  assert low[:5].all() and top[-20:].all()  # the two levels answer the centre and far out
  assert low.sum() >= 8 and top.sum() >= 30 and (low | top).sum() >= 50
  assert certificates.intersecting_pairs(x, cert.prediction, cert.radius) == 0
  # The 0-balls stop short of where the top level answers 1; G is 0 at r < 0.5 (σ = 0.8 has
  # both classes below p₀ there, σ = 0.25 answers 0), and the 1-balls stay outside.
  assert np.all(r[low] + cert.radius[low] < r[top].min())
  assert np.all(cert.radius[top] <= r[top] - 0.5)


# ---------------------------------------------------------------------------
# Tie rules: a bound exactly at the threshold answers, with radius 0


def far_point(linear):
  """One input at distance 10 from the linear f's hyperplane, x_7 = −2: every sample of f
  (class 0) and of both x7_chain nodes (bin 0, "lower") agrees at any σ ≤ 1."""
  x = linear.points_at_distance(np.array([10.0]))
  x[:, 7] = -2.0
  return x


def test_thresholded_moves_where_the_lower_bound_is_exactly_tau(linear):
  # One node (0.5 against 0.25): all n = 64 samples say "lower", so L = CP_lower(64, 64, β/2)
  # exactly; at τ = L the node moves x with radius 0 (module doc), and the class test at
  # σ = 0.25 answers. At the next float above, L < τ ≤ U: the chain abstains.
  beta, grid, x = 5e-4, np.float32([0.25, 0.5]), far_point(linear)
  node = x7_chain(scale=100.0, sigmas=(0.3, 0.2), n=64)[1]
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(2), n0=16, n=64, alpha=1e-3,
                           batch_size=4096)
  tau = float(bounds.clopper_pearson_lower(64, 64, beta / 2))
  assert 0.5 < tau < 1.0
  tied = thresholded.certify_thresholded(smoothed, [node], grid, x, None, beta, tau)
  assert (tied.prediction[0], tied.radius[0], tied.sigma[0]) == (0, 0.0, np.float32(0.25))
  above = thresholded.certify_thresholded(smoothed, [node], grid, x, None, beta,
                                          np.nextafter(tau, 1.0))
  assert (above.prediction[0], above.radius[0]) == (ij.ABSTAIN, 0.0)


def test_cascade_answers_where_the_lower_bound_is_exactly_the_threshold(linear):
  # Every sample agrees at every level: L = CP_lower(n, n, ·) exactly. Top level (α/(2K) for
  # L): at p₀ = L it answers with radius 0; at the next float above it passes x down, and
  # σ = 0.25 answers with a positive radius.
  x = far_point(linear)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(3), n0=16, n=64, alpha=1e-3,
                           batch_size=4096)
  p0 = float(bounds.clopper_pearson_lower(64, 64, 1e-3 / 4))
  tied = cascade.certify_cascade(smoothed, x, np.arange(1), (0.25, 1.0), p0)
  assert (tied.prediction[0], tied.radius[0], tied.sigma[0], tied.num_samples[0]) == (0, 0.0, 1.0,
                                                                                      64)
  above = cascade.certify_cascade(smoothed, x, np.arange(1), (0.25, 1.0), np.nextafter(p0, 1.0))
  assert above.prediction[0] == 0 and above.sigma[0] == 0.25 and above.radius[0] > 0.1
  # The lowest level's threshold is 1/2: with n = 10 and α/K = 2⁻¹⁰, L = (2⁻¹⁰)^(1/10) = 1/2
  # exactly. The top level passes x down (L = 2^(−1.1) < p₀ = 0.6) with class 1's upper bound
  # 1 − (2⁻¹²)^(1/10) = 0.565 below p₀, and σ = 0.25 answers with radius 0.
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(3), n0=10, n=10, alpha=2.0 ** -9,
                           batch_size=4096)
  assert bounds.clopper_pearson_lower(10, 10, 2.0 ** -10) == 0.5
  lowest = cascade.certify_cascade(smoothed, x, np.arange(1), (0.25, 1.0), 0.6)
  assert (lowest.prediction[0], lowest.radius[0], lowest.sigma[0]) == (0, 0.0, np.float32(0.25))


def test_fixed_sigma_answers_where_the_lower_bound_is_exactly_one_half(linear):
  # n = 10 samples, all of class 0, at α = 2⁻¹⁰: p_A's lower bound is (2⁻¹⁰)^(1/10) = 1/2
  # exactly, and CERTIFY answers with radius 0 (the package's one tie rule, sampler.certify).
  from configs import default
  config = default.get_config()
  config.certify.sigma = 0.3
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(4), n0=10, n=10, alpha=2.0 ** -10,
                           batch_size=4096)
  cert = fixed_sigma.prepare(smoothed, config)(far_point(linear), np.arange(1))
  assert (cert.prediction[0], cert.radius[0], cert.num_samples[0]) == (0, 0.0, 10)
  raw = smoothed.certify(far_point(linear), 0.3, np.arange(1))
  assert raw.p_lower[0] == 0.5 and raw.counts[0, 0] == 10


# ---------------------------------------------------------------------------
# float32(σ): every radius is float32(σ) times a float64 factor, never rounded to float32


GRID = (0.3, 0.7)  # neither is a float32: float32(σ) and σ give different radii


@pytest.fixture
def kind_run(linear, tmp_path, monkeypatch):
  """(config, smoothed): every kind's settings on GRID (fixed σ 0.3), the σ-estimator and the
  router's one node a function of x_7 (bin 1, σ = 0.7, where x_7 > 0), n = 500."""
  from configs import default
  from instars_jax.storage.workdir import Workdir
  config = default.get_config()
  config.train.table.grid = GRID
  config.certify.update(n0=32, n=500, batch=4096, sigma=0.3)
  config.certify.search.update(sigma_min=0.1, sigma_max=1.0, starts=2, steps=3,
                               samples_per_step=16)
  estimator = lambda z: jnp.stack([-z[:, 7], z[:, 7]], axis=-1) * 100.0
  settings = {"grid": list(GRID), "sigma": 0.7, "node": 1, "step": 1}
  monkeypatch.setattr(locally_constant.estimator, "load",
                      lambda directory, workdir, step: (estimator, settings))
  monkeypatch.setattr(locally_constant.estimator, "checkpointed_settings",
                      lambda directory: settings)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(0), n0=32, n=500, alpha=1e-3,
                           batch_size=4096, workdir=Workdir(tmp_path),
                           results_path=tmp_path / "results.tsv", image_size=8)
  return config, smoothed


def recorded_class_tests(monkeypatch) -> list:
  """(Certificate, n, α) of every later sampler.certify call."""
  calls, original = [], sampler.certify

  def record(*args, **kwargs):
    cert = original(*args, **kwargs)
    calls.append((cert, kwargs["n"], kwargs["alpha"]))
    return cert
  monkeypatch.setattr(sampler, "certify", record)
  return calls


@pytest.mark.parametrize("name", sorted(set(certificates.kinds()) - {"cascade"}))
def test_every_radius_is_float32_sigma_times_the_float64_factor(name, kind_run, linear,
                                                                monkeypatch):
  # Inputs near f's hyperplane (d = 0.05 … 0.4) and far on the σ = 0.7 side of the selector
  # (x_7 = 3): the class test's radius binds. It must equal float32(σ) Φ⁻¹(L) in float64, L
  # from the class test's counts: a variant rounding the radius to float32 (up about half the
  # time, test_written_radii_never_exceed_the_radius_computed) or using the float64 σ fails.
  config, smoothed = kind_run
  x = linear.points_at_distance(np.linspace(0.05, 0.4, 8))
  x[:, 7] = 3.0
  tests = recorded_class_tests(monkeypatch)
  out = prepared(certificates.get(name), smoothed, config)(x, np.arange(8))
  cls, n, alpha = tests[-1]
  assert out.sigma.dtype == np.float32
  configured = {"fixed_sigma": 0.3, "per_sigma": None, "memory": None}.get(name, 0.7)
  if configured is not None:  # per_sigma's and memory's σ come from the search
    np.testing.assert_array_equal(out.sigma, np.float32(configured))
  certified = out.prediction != ij.ABSTAIN
  assert certified.sum() >= 6
  np.testing.assert_array_equal(out.prediction[certified], cls.prediction[certified])
  lower = bounds.clopper_pearson_lower(cls.counts[certified, out.prediction[certified]], n, alpha)
  sigma = out.sigma[certified].astype(np.float64)
  expected = sigma * stats.norm.ppf(lower)
  np.testing.assert_allclose(out.radius[certified], expected, rtol=1e-14, atol=0)
  np.testing.assert_array_equal(out.radius[~certified], 0.0)
  assert out.radius.dtype == np.float64
  # The check tells these apart: the radius rounded to float32, and (on the grid) σ in float64.
  assert np.mean(np.abs(expected.astype(np.float32) - expected) > 1e-14 * expected) > 0.8
  if configured is not None:
    assert np.all(np.abs(configured * stats.norm.ppf(lower) - expected) > 1e-14 * expected)


def test_cascade_radius_is_float32_sigma_times_the_float64_margin(linear, monkeypatch):
  # At the top level (σ = 0.7) the cascade answers with float32(0.7)(Φ⁻¹(L) − Φ⁻¹(p₀)), L at
  # α/(2K) on that level's counts (recorded), in float64.
  x = linear.points_at_distance(np.linspace(1.0, 1.6, 8))
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(5), n0=32, n=500, alpha=1e-3,
                           batch_size=4096)
  levels, original = [], cascade.level_counts

  def record(*args):
    levels.append(original(*args))
    return levels[-1]
  monkeypatch.setattr(cascade, "level_counts", record)
  cert = cascade.certify_cascade(smoothed, x, np.arange(8), GRID, 0.6)
  guess, counts = levels[0]
  assert np.all(cert.sigma == np.float32(0.7)) and np.all(cert.prediction == guess)
  lower = bounds.clopper_pearson_lower(counts[np.arange(8), guess], 500, 1e-3 / 4)
  expected = float(np.float32(0.7)) * (stats.norm.ppf(lower) - stats.norm.ppf(0.6))
  np.testing.assert_allclose(cert.radius, expected, rtol=1e-14, atol=0)
  assert len(set(counts[:, 0])) >= 4  # several L, so a float32 rounding shows in most
  assert np.mean(np.abs(expected.astype(np.float32) - expected) > 1e-14 * expected) > 0.8
  assert np.all(np.abs(0.7 * (stats.norm.ppf(lower) - stats.norm.ppf(0.6)) - expected)
                > 1e-14 * expected)


# ---------------------------------------------------------------------------
# The cascade with a σ expert per level


def test_cascade_levels_use_their_own_sigma_expert(linear):
  # Expert at σ = 1.0: class 0 where x_0 > 0; at σ = 0.25: class 0 where x_1 > 0; the run's
  # own model says class 1 everywhere here (x_2 = −1). With p_{1.0,0} = Φ(x_0) the top level
  # answers where |x_0| ≥ t = Φ⁻¹(p₀) (0.253 at p₀ = 0.6), the lowest by the sign of x_1: G
  # is 0 for x_0 ≥ t, 1 for x_0 ≤ −t, else 0 where x_1 > 0. Its exact robust radius is the
  # distance to the region of the other class, in (x_0, x_1). A level that used the run's
  # model, or another level's expert, would answer other classes.
  rng = np.random.default_rng(6)
  x = np.zeros((40, 3), np.float32)
  x[:, :2] = rng.uniform(-1.0, 1.0, (40, 2))
  x[:4, :2] = [[1.5, -1.0], [-1.5, 1.0], [0.0, 1.0], [0.0, -1.0]]
  x[:, 2] = -1.0
  axis = lambda i: LinearClassifier(np.eye(3, dtype=np.float32)[i], 0.0)
  smoothed = SmoothedModel(axis(2), 2, jax.random.PRNGKey(7), n0=32, n=2000, alpha=1e-4,
                           batch_size=8192,
                           experts={np.float32(1.0): axis(0), np.float32(0.25): axis(1)})
  cert = cascade.certify_cascade(smoothed, x, np.arange(40), (0.25, 1.0), 0.6)
  np.testing.assert_array_equal(cert.prediction[:4], [0, 1, 0, 1])
  np.testing.assert_array_equal(cert.sigma[:4], np.float32([1.0, 1.0, 0.25, 0.25]))
  t = stats.norm.ppf(0.6)
  x0, x1 = x[:, 0].astype(np.float64), x[:, 1].astype(np.float64)
  truth = np.where(x0 >= t, 0, np.where(x0 <= -t, 1, np.where(x1 > 0, 0, 1)))
  outside = np.maximum(np.abs(x0) - t, 0.0)  # distance in x_0 to the slab |x_0| < t
  radius_of = {0: np.minimum(x0 + t, np.hypot(outside, np.maximum(x1, 0.0))),
               1: np.minimum(t - x0, np.hypot(outside, np.maximum(-x1, 0.0)))}
  exact = np.where(truth == 0, radius_of[0], radius_of[1])
  certified = cert.prediction != ij.ABSTAIN
  assert certified.sum() >= 30 and set(cert.sigma[certified]) == {0.25, 1.0}
  np.testing.assert_array_equal(cert.prediction[certified], truth[certified])
  assert np.all(cert.radius <= exact + 1e-6)


# ---------------------------------------------------------------------------
# thresholded with sequential sampling


def test_thresholded_with_sequential_sampling_keeps_the_fixed_path_and_stops_early(linear,
                                                                                  toy_config):
  # Sequential sampling changes only the class test (the nodes draw their fixed n): the rows
  # are the fixed run's path and σ, capped by CERTIFY with the stopping rule at that σ, and
  # stay within f's exact radius.
  toy_config.certify.update(sigma_mode="instance", certificate="thresholded",
                            sampling="sequential")
  certificates.for_config(toy_config)  # a sound kind that accepts it
  tau, beta, grid = 0.8, 5e-4, np.float32([0.25, 0.5, 1.0])
  chain = x7_chain(scale=100.0, sigmas=(0.3, 0.2), n=400)
  rng = np.random.default_rng(12)
  x = linear.points_at_distance(rng.uniform(0.1, 1.5, 24) * rng.choice([-1, 1], 24))
  x[:, 7] = rng.uniform(-1.5, 1.5, 24)
  ids = np.arange(24)
  settings = dict(n0=32, n=2000, alpha=1e-3, batch_size=8192)
  rule = rules.from_config(toy_config.certify)
  assert isinstance(rule, rules.RadiusRule)
  fixed = thresholded.certify_thresholded(
      SmoothedModel(linear, 2, jax.random.PRNGKey(13), **settings), chain, grid, x, ids, beta, tau)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(13), rule=rule, **settings)
  sequential = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, beta, tau)
  counts = node_lower_counts(smoothed, chain, grid, x, ids)
  sigma, path, abstains, _ = thresholded_path(counts, chain, grid, beta, tau)
  prediction, radius, _ = chain_rows(smoothed, sigma, path, abstains, x, ids, beta)
  np.testing.assert_array_equal(sequential.sigma, fixed.sigma)
  np.testing.assert_array_equal(sequential.sigma, sigma)
  np.testing.assert_array_equal(sequential.prediction, prediction)
  np.testing.assert_allclose(sequential.radius, radius, rtol=1e-13, atol=0)
  both = (fixed.prediction != ij.ABSTAIN) & (sequential.prediction != ij.ABSTAIN)
  assert both.sum() >= 12 and set(sequential.sigma[both]) == {0.25, 0.5, 1.0}
  np.testing.assert_array_equal(sequential.prediction[both], fixed.prediction[both])
  assert np.all(sequential.radius <= linear.distance(x) + 1e-6)
  np.testing.assert_array_equal(fixed.num_samples, 2000)
  assert np.all(sequential.num_samples <= 2000) and np.sum(sequential.num_samples < 2000) >= 12
