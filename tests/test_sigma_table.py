"""Insta-RS Train's σ table: the radius profile over the grid against the analytic radius of
a linear classifier, common random numbers, the slice each update visits, and the
estimator's soft labels made from it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from instars_jax.selection import estimator
from instars_jax.smoothing import bounds
from instars_jax.train import sigma_table
from instars_jax.train import state as state_lib
from instars_jax.train.stages import sigma_estimators

GRID = (0.25, 0.5, 1.0)
N, ALPHA = 10_000, 0.001


def linear_state(num_examples, sigma=0.25, scale=1000.0):
  """A TrainState whose model is the linear classifier sign(x_0) (logits ±scale·x_0, so its
  softmax is a hard vote and p_A = Φ(x_0 / σ) for class 0)."""
  def apply_fn(variables, x, train=False):
    z = x.reshape(x.shape[0], -1) @ variables["params"]["w"]
    return jnp.stack([z, -z], axis=-1) * scale
  w = np.zeros(4, np.float32)
  w[0] = 1.0
  return state_lib.TrainState.create(
      apply_fn=apply_fn, params={"w": w}, tx=optax.sgd(0.1), batch_stats={},
      sigma_table=jnp.full((num_examples,), sigma, jnp.float32),
      sigma_profile=jnp.zeros((num_examples, len(GRID)), jnp.float32))


def profile_once(state, x, labels, samples=256, key=0):
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(labels, jnp.int32),
           "index": jnp.arange(len(x), dtype=jnp.int32)}
  return sigma_table.profile_step(state, batch, jax.random.PRNGKey(key),
                                  sigma_table.radius_factor_table(N, ALPHA), grid=GRID,
                                  samples=samples)


def analytic_radius(distance, sigma):
  """R of CERTIFY (n, α) at σ when p_A = Φ(distance / σ) exactly."""
  p = stats.norm.cdf(distance / sigma)
  return sigma * stats.norm.ppf(bounds.clopper_pearson_lower(p * N, N, ALPHA))


def points(distances):
  x = np.zeros((len(distances), 4), np.float32)
  x[:, 0] = distances
  return x


def test_profile_matches_the_analytic_radius_and_picks_the_best_grid_sigma():
  distances = np.array([0.02, -0.02, 3.0, 5.0, -0.5])  # near, near, far, far, wrong side
  state = profile_once(linear_state(5), points(distances), [0] * 5, samples=1024)
  profile, table = np.asarray(state.sigma_profile), np.asarray(state.sigma_table)
  assert profile.shape == (5, 3)
  truth = np.stack([analytic_radius(distances, s) for s in GRID], axis=1)
  # 1,024 samples: p̂ within a few standard errors of Φ(d / σ); compare where R is informative.
  informative = truth > 0.02
  np.testing.assert_allclose(profile[informative], truth[informative], rtol=0.25, atol=0.05)
  np.testing.assert_array_equal(table, [0.25, 0.25, 1.0, 1.0, 0.25])
  assert np.all(profile[[1, 4]] < 0)  # misclassified: no σ certifies it; trains at the smallest
  best = np.asarray(GRID)[np.argmax(truth, axis=1)]
  np.testing.assert_array_equal(table[:4], best[:4])


def test_profile_uses_the_same_noise_at_every_grid_sigma():
  # Common random numbers: for a point on the boundary p̂ is the same at every σ (the sign of
  # ε_0 decides the vote whatever the scale), exactly.
  state = profile_once(linear_state(1), points([0.0]), [0], samples=8)
  profile = np.asarray(state.sigma_profile)[0]
  factors = profile / np.asarray(GRID)
  np.testing.assert_allclose(factors, factors[0], rtol=1e-6)


def test_estimator_soft_labels_follow_the_per_sigma_radii():
  # Per example, the best grid σ is known (the analytic profile above); the soft labels put
  # their mass there, sharper as τ falls, and drop examples no σ certifies.
  distances = np.array([0.05, 3.0, 5.0, -0.5, 0.3])
  truth = np.stack([analytic_radius(distances, s) for s in GRID], axis=1)
  labels, keep = sigma_estimators.soft_labels(truth, temperature=0.1)
  np.testing.assert_array_equal(keep, [True, True, True, False, True])
  np.testing.assert_array_equal(np.argmax(labels[keep], 1), np.argmax(truth[keep], 1))
  np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-6)
  expected = np.exp(np.maximum(truth[1], 0) / 0.1)
  np.testing.assert_allclose(labels[1], expected / expected.sum(), rtol=1e-5)
  soft, _ = sigma_estimators.soft_labels(truth, temperature=10.0)
  assert soft[1].max() < labels[1].max()
  # Rare top bins weigh more: 1 / frequency, mean 1.
  weights = sigma_estimators.bin_weights(labels[keep])
  np.testing.assert_allclose(weights.mean(), 1.0, rtol=1e-6)
  top = np.argmax(np.array([[0.9, 0.1, 0], [0, 0.2, 0.8], [0, 0, 1], [0.1, 0, 0.9]]), 1)
  weights = sigma_estimators.bin_weights(np.eye(3)[top])
  # bin 0 holds 1 example, bin 2 holds 3: each bin weighs the same in total
  np.testing.assert_allclose(weights, [2, 2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
  # On the trained state: labels from a profile pass of the linear base model.
  state = profile_once(linear_state(5), points(distances), [0] * 5)
  labels_state, keep_state = sigma_estimators.soft_labels(np.asarray(state.sigma_profile), 0.1)
  np.testing.assert_array_equal(keep_state, keep)
  np.testing.assert_array_equal(np.argmax(labels_state[keep], 1)[:3], np.argmax(truth[keep], 1)[:3])


def test_a_fractional_update_visits_a_rotating_slice():
  slices = [sigma_table.update_indices(96, 0.25, u, seed=0) for u in range(4)]
  assert all(len(s) == 24 for s in slices)
  np.testing.assert_array_equal(np.sort(np.concatenate(slices)), np.arange(96))
  np.testing.assert_array_equal(sigma_table.update_indices(96, 1.0, 3, seed=0), np.arange(96))
  assert not np.array_equal(slices[0], sigma_table.update_indices(96, 0.25, 0, seed=1))


def test_gain_weights_follow_the_radius_gain_and_balance_the_bins():
  # Hand-set profiles over a 3-σ grid. A router node for σ_3 bins (max(R_1, R_2), R_3); the
  # gain is |R_3 − max(R_1, R_2)|, radii below 0 counting as 0; an example certified nowhere
  # is dropped. With balance_bins too, each bin's examples weigh the same in total.
  import types
  radii = np.array([[0.2, 0.5, 1.5],   # bins (0.5, 1.5): gain 1.0, top bin 1
                    [0.9, 0.1, 0.6],   # (0.9, 0.6): gain 0.3, top bin 0
                    [0.0, 0.3, 0.4],   # (0.3, 0.4): gain 0.1, top bin 1
                    [-1.0, -1.0, -1.0]])  # certified nowhere: dropped
  node = estimator.Estimator(grid=GRID, sigma=1.0, node=2)
  settings = types.SimpleNamespace(temperature=0.1, balance_bins=False, radius_weight=0.0,
                                   gain_weight=True)
  weighted, kept = sigma_estimators.training_labels(radii, node, settings)
  np.testing.assert_array_equal(kept, [0, 1, 2])
  weights = weighted[kept].sum(axis=1)
  np.testing.assert_allclose(weights, np.array([1.0, 0.3, 0.1]) / (1.4 / 3), rtol=1e-5)
  settings.balance_bins = True
  weighted, _ = sigma_estimators.training_labels(radii, node, settings)
  balanced = weighted[kept].sum(axis=1)
  # bin 1 holds examples 0 and 2 (1/frequency 1/2 each), bin 0 example 1 (1): mean-1 factors.
  bins = np.array([0.5, 1.0, 0.5]) / (2 / 3)
  gains = np.array([1.0, 0.3, 0.1]) / (1.4 / 3)
  np.testing.assert_allclose(balanced, bins * gains, rtol=1e-5)
