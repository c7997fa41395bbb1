"""Insta-RS Train: the per-example σ table in the train state, its update and its persistence."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from configs import default
from instars_jax import data
from instars_jax.run import checkpoints
from instars_jax.smoothing import bounds
from instars_jax.train import estimator, loop, sigma_table, steps
from instars_jax.train import state as state_lib
from test_data_models import write_npz
from test_pipeline import Killed, stop_after


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
  labels, keep = estimator.soft_labels(truth, temperature=0.1)
  np.testing.assert_array_equal(keep, [True, True, True, False, True])
  np.testing.assert_array_equal(np.argmax(labels[keep], 1), np.argmax(truth[keep], 1))
  np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-6)
  expected = np.exp(np.maximum(truth[1], 0) / 0.1)
  np.testing.assert_allclose(labels[1], expected / expected.sum(), rtol=1e-5)
  soft, _ = estimator.soft_labels(truth, temperature=10.0)
  assert soft[1].max() < labels[1].max()
  # Rare top bins weigh more: 1 / frequency, mean 1.
  weights = estimator.bin_weights(labels[keep])
  np.testing.assert_allclose(weights.mean(), 1.0, rtol=1e-6)
  top = np.argmax(np.array([[0.9, 0.1, 0], [0, 0.2, 0.8], [0, 0, 1], [0.1, 0, 0.9]]), 1)
  weights = estimator.bin_weights(np.eye(3)[top])
  # bin 0 holds 1 example, bin 2 holds 3: each bin weighs the same in total
  np.testing.assert_allclose(weights, [2, 2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
  # On the trained state: labels from a profile pass of the linear base model.
  state = profile_once(linear_state(5), points(distances), [0] * 5)
  labels_state, keep_state = estimator.soft_labels(np.asarray(state.sigma_profile), 0.1)
  np.testing.assert_array_equal(keep_state, keep)
  np.testing.assert_array_equal(np.argmax(labels_state[keep], 1)[:3], np.argmax(truth[keep], 1)[:3])


@pytest.fixture
def insta_config(tmp_path):
  config = default.get_config()
  config.dataset = f"npz:{write_npz(tmp_path / 'toy.npz', n_train=96, n_test=16)}"
  config.train.epochs = 3
  config.train.batch_size = 32
  config.train.learning_rate = 0.05
  config.train.insta = True
  config.train.stage1_epochs = 1
  config.train.table.update(samples=4, chunk=64)
  return config


def read_metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_stages_switch_at_e1_and_the_table_round_trips(insta_config, tmp_path):
  state = loop.train_and_evaluate(insta_config, tmp_path / "run")
  rows = read_metrics(tmp_path / "run")
  assert [r["stage"] for r in rows] == [1, 2, 2]
  assert rows[0]["sigma_q00"] == rows[0]["sigma_q100"] == pytest.approx(0.25)
  assert rows[0]["table_update_seconds"] == 0.0 and rows[1]["table_update_seconds"] > 0
  table = np.asarray(state.sigma_table)
  assert table.shape == (96,) and set(np.unique(table)) <= set(np.float32(GRID))
  assert rows[1]["sigma_share_1"] > 0  # easy toy data: stage 2 moves examples up the grid
  assert sum(rows[1][f"sigma_share_{s:g}"] for s in GRID) == pytest.approx(1.0)
  assert np.asarray(state.sigma_profile).shape == (96, 3)
  restored = state_lib.load_train_state(tmp_path / "run")
  np.testing.assert_array_equal(np.asarray(restored.sigma_table), table)
  np.testing.assert_array_equal(np.asarray(restored.sigma_profile), np.asarray(state.sigma_profile))
  assert (tmp_path / "run" / "sigma_table.png").stat().st_size > 1000
  assert (tmp_path / "run" / "sigma_by_class.png").stat().st_size > 1000


def test_killed_in_stage_2_resumes_to_the_same_table(insta_config, tmp_path, monkeypatch):
  straight = loop.train_and_evaluate(insta_config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed during the second table update
    stop_after(sigma_table, "profile_step", 2 + 1, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  resumed = loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  np.testing.assert_array_equal(np.asarray(resumed.sigma_table), np.asarray(straight.sigma_table))
  np.testing.assert_array_equal(np.asarray(resumed.sigma_profile),
                                np.asarray(straight.sigma_profile))
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


def test_cohen_training_keeps_the_table_constant(insta_config, tmp_path):
  insta_config.train.insta = False
  insta_config.train.epochs = 2
  state = loop.train_and_evaluate(insta_config, tmp_path / "run")
  np.testing.assert_array_equal(np.asarray(state.sigma_table), 0.25)
  assert [r["stage"] for r in read_metrics(tmp_path / "run")] == [1, 1]
  # Grid noise belongs to Insta-RS's stage 1: Cohen training stays at train.sigma.
  insta_config.train.stage1_noise = "grid"
  grid = loop.train_and_evaluate(insta_config, tmp_path / "grid")
  for a, b in zip(jax.tree_util.tree_leaves(grid.params), jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  insta_config.train.insta = True
  insta_config.train.stage1_epochs = 2
  mixed = loop.train_and_evaluate(insta_config, tmp_path / "insta_grid")
  assert not np.array_equal(jax.tree_util.tree_leaves(mixed.params)[0],
                            jax.tree_util.tree_leaves(state.params)[0])


def test_explore_trains_a_share_of_stage_2_examples_at_a_random_grid_sigma(insta_config, tmp_path):
  keys = state_lib.example_keys(jax.random.PRNGKey(0), jnp.arange(4000))
  table = jnp.full((4000,), 0.3, jnp.float32)  # off the grid: shows which examples moved
  np.testing.assert_array_equal(steps.training_sigmas(table, keys, GRID, 0.0), np.float32(0.3))
  drawn = np.asarray(steps.training_sigmas(table, keys, GRID, 1.0))
  assert set(np.unique(drawn)) == set(np.float32(GRID))
  half = np.asarray(steps.training_sigmas(table, keys, GRID, 0.5))
  moved = half != np.float32(0.3)
  assert abs(moved.mean() - 0.5) < 0.03
  np.testing.assert_array_equal(half[moved], drawn[moved])  # the same draw, from the same key
  insta_config.train.table.explore = 0.5
  explored = loop.train_and_evaluate(insta_config, tmp_path / "explore")
  insta_config.train.table.explore = 0.0
  plain = loop.train_and_evaluate(insta_config, tmp_path / "plain")
  rows = read_metrics(tmp_path / "explore")
  assert rows[0]["train_loss"] == read_metrics(tmp_path / "plain")[0]["train_loss"]  # stage 1
  assert rows[1]["train_loss"] != read_metrics(tmp_path / "plain")[1]["train_loss"]
  assert not np.array_equal(jax.tree_util.tree_leaves(explored.params)[0],
                            jax.tree_util.tree_leaves(plain.params)[0])


def test_a_fractional_update_visits_a_rotating_slice(insta_config, tmp_path):
  slices = [sigma_table.update_indices(96, 0.25, u, seed=0) for u in range(4)]
  assert all(len(s) == 24 for s in slices)
  np.testing.assert_array_equal(np.sort(np.concatenate(slices)), np.arange(96))
  np.testing.assert_array_equal(sigma_table.update_indices(96, 1.0, 3, seed=0), np.arange(96))
  insta_config.train.epochs = 2
  insta_config.train.table.fraction = 0.25
  state = loop.train_and_evaluate(insta_config, tmp_path / "run")
  visited = np.flatnonzero(np.any(np.asarray(state.sigma_profile) != 0, axis=1))
  np.testing.assert_array_equal(np.sort(visited), np.sort(slices[0]))


@pytest.mark.parametrize("key, value, message", [
    ("stage1_epochs", 5, "train.stage1_epochs must lie in"),
    ("table.grid", (0.5, 0.25), "train.table.grid must be at least two increasing"),
    ("table.grid", (0.5,), "train.table.grid must be at least two increasing"),
    ("table.samples", 0, "train.table.samples"),
    ("stage1_noise", "uniform", "train.stage1_noise"),
    ("table.update_every", 0, "train.table.update_every"),
    ("table.chunk", 0, "train.table.chunk"),
    ("table.fraction", 0.0, "train.table.fraction"),
    ("table.explore", 1.5, "train.table.explore must lie in"),
])
def test_bad_knobs_are_rejected(insta_config, tmp_path, key, value, message):
  section = insta_config.train
  *parents, leaf = key.split(".")
  for p in parents:
    section = section[p]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(insta_config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_estimator_stage_resumes_after_a_kill_to_the_same_estimator(insta_config, tmp_path,
                                                                    monkeypatch):
  insta_config.estimator.update(epochs=2, label_samples=4)
  loop.train_and_evaluate(insta_config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed in the estimator's second epoch
    stop_after(estimator, "train_step", 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  assert (tmp_path / "resumed" / "estimator" / "labels.npz").exists()
  loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  (f, straight), (g, resumed) = (estimator.load(tmp_path / d) for d in ("straight", "resumed"))
  assert straight == resumed and straight["sigma"] == 1.0  # σ_e: the top of the grid
  x = np.random.default_rng(0).uniform(size=(4, 28, 28)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(g(x)))
  # Other estimator settings on a finished run: refused, not silently mixed.
  insta_config.estimator.temperature = 0.5
  with pytest.raises(ValueError, match="estimator trained with other settings"):
    loop.train_and_evaluate(insta_config, tmp_path / "straight")


def test_finetuning_at_the_estimator_sigma_trains_each_example_there_and_resumes(
    insta_config, tmp_path, monkeypatch):
  insta_config.estimator.update(epochs=1, label_samples=4, finetune_epochs=2)
  first = insta_config.train.epochs
  straight = loop.train_and_evaluate(insta_config, tmp_path / "straight")
  assigned = estimator.assigned_sigmas(tmp_path / "straight",
                                       data.load_dataset(insta_config.dataset).train, insta_config)
  np.testing.assert_array_equal(np.asarray(straight.sigma_table), assigned)
  assert set(np.unique(assigned)) <= {0.25, 0.5, 1.0}
  assert checkpoints.manager(tmp_path / "straight").latest_step() == first + 2
  rows = read_metrics(tmp_path / "straight")
  assert [r["stage"] for r in rows[-2:]] == ["finetune"] * 2 and len(rows) == first + 2

  with monkeypatch.context() as m:  # killed in the second fine-tuning epoch
    stop_after(steps, "train_step", first * 3 + 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  manager = checkpoints.manager(tmp_path / "resumed")
  assert manager.latest_step() == first + 1
  midway = checkpoints.restore_as_saved(manager, first + 1)
  np.testing.assert_array_equal(midway["sigma_table"], assigned)  # the checkpoint holds it
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(midway["params"]), jax.tree_util.tree_leaves(straight.params))]
  assert all(changed)  # the second fine-tuning epoch trained every layer
  resumed = loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.sigma_table, resumed.sigma_table)
  again = loop.train_and_evaluate(insta_config, tmp_path / "straight")  # finished: no-op
  np.testing.assert_array_equal(np.asarray(again.sigma_table), assigned)
