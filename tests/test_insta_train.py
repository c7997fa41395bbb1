"""Insta-RS Train: the per-example σ table in the train state, its update and its persistence."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from instars_jax import checkpoints, data, training
from test_data_models import write_npz
from test_pipeline import Killed, stop_after


def linear_state(num_examples, sigma):
  """A TrainState whose model is the linear classifier sign(x_0): class 0 where x_0 > 0."""
  def apply_fn(variables, x, train=False):
    z = x.reshape(x.shape[0], -1) @ variables["params"]["w"]
    return jnp.stack([z, -z], axis=-1)
  w = np.zeros(4, np.float32)
  w[0] = 1.0
  return training.TrainState.create(apply_fn=apply_fn, params={"w": w}, tx=optax.sgd(0.1),
                                    batch_stats={},
                                    sigma_table=jnp.full((num_examples,), sigma, jnp.float32))


def update_once(state, x, labels, eta=0.2, samples=32, sigma_min=0.05, sigma_max=2.0):
  factors = training.search.radius_factors(samples, 100_000, 0.001, 0.5)
  batch = {"image": jnp.asarray(x), "label": jnp.asarray(labels, jnp.int32),
           "index": jnp.arange(len(x), dtype=jnp.int32)}
  return training.update_sigma_table_step(state, batch, jax.random.PRNGKey(0), factors, eta,
                                          sigma_min, sigma_max, samples=samples, chunk=8,
                                          num_classes=2)


def test_easy_examples_grow_their_sigma_and_hard_ones_shrink():
  x = np.zeros((5, 4), np.float32)
  x[:, 0] = [3.0, 1.5, 0.02, -0.5, 3.0]  # far, far, on the boundary, wrong side, far
  labels = [0, 0, 0, 0, 0]
  state = update_once(linear_state(5, 0.25), x, labels)
  table = np.asarray(state.sigma_table)
  assert table.shape == (5,)
  np.testing.assert_allclose(table[[0, 1, 4]], 0.25 * 1.2)  # easy: up
  np.testing.assert_allclose(table[[2, 3]], 0.25 * 0.8)  # hard and misclassified: down
  # Bounds: repeated updates stay inside [sigma_min, sigma_max].
  for _ in range(30):
    state = update_once(state, x, labels, sigma_min=0.1, sigma_max=1.0)
  table = np.asarray(state.sigma_table)
  assert table.min() >= 0.1 and table.max() <= 1.0
  np.testing.assert_allclose(table[[0, 4]], 1.0)  # far points reach the cap
  np.testing.assert_allclose(table[3], 0.1)  # the misclassified point sits at the floor


def test_an_example_settles_where_its_radius_is_best():
  # At distance 0.5, R(σ) for the true label rises with σ while p_A stays near 1 and falls
  # once misclassifications appear: repeated updates settle in between, not at a bound.
  x = np.zeros((1, 4), np.float32)
  x[0, 0] = 0.5
  state = linear_state(1, 0.05)
  for _ in range(40):
    state = update_once(state, x, [0], eta=0.1, samples=64)
  assert 0.2 < float(state.sigma_table[0]) < 0.6


@pytest.fixture
def insta_config(tmp_path):
  config = default.get_config()
  config.dataset = f"npz:{write_npz(tmp_path / 'toy.npz', n_train=96, n_test=16)}"
  config.train.epochs = 3
  config.train.batch_size = 32
  config.train.learning_rate = 0.05
  config.train.insta = True
  config.train.stage1_epochs = 1
  config.train.table.update(samples=4, chunk=64, batch=128, sigma_min=0.1, sigma_max=1.0)
  return config


def read_metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_stages_switch_at_e1_and_the_table_round_trips(insta_config, tmp_path):
  state = training.train_and_evaluate(insta_config, tmp_path / "run")
  rows = read_metrics(tmp_path / "run")
  assert [r["stage"] for r in rows] == [1, 2, 2]
  assert rows[0]["sigma_q00"] == rows[0]["sigma_q100"] == pytest.approx(0.25)
  assert rows[0]["table_update_seconds"] == 0.0 and rows[1]["table_update_seconds"] > 0
  assert rows[1]["sigma_q50"] != pytest.approx(0.25)  # stage 2 moved the table
  table = np.asarray(state.sigma_table)
  assert table.shape == (96,) and table.min() >= 0.1 and table.max() <= 1.0
  restored = checkpoints.load_train_state(tmp_path / "run")
  np.testing.assert_array_equal(np.asarray(restored.sigma_table), table)
  assert (tmp_path / "run" / "sigma_table.png").stat().st_size > 1000
  assert (tmp_path / "run" / "sigma_by_class.png").stat().st_size > 1000


def test_killed_in_stage_2_resumes_to_the_same_table(insta_config, tmp_path, monkeypatch):
  straight = training.train_and_evaluate(insta_config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed during the second table update
    stop_after(training, "update_sigma_table_step", 2 + 1, m)
    with pytest.raises(Killed):
      training.train_and_evaluate(insta_config, tmp_path / "resumed")
  resumed = training.train_and_evaluate(insta_config, tmp_path / "resumed")
  np.testing.assert_array_equal(np.asarray(resumed.sigma_table), np.asarray(straight.sigma_table))
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


def test_cohen_training_keeps_the_table_constant(insta_config, tmp_path):
  insta_config.train.insta = False
  state = training.train_and_evaluate(insta_config, tmp_path / "run")
  np.testing.assert_array_equal(np.asarray(state.sigma_table), 0.25)
  assert [r["stage"] for r in read_metrics(tmp_path / "run")] == [1, 1, 1]


def test_a_fractional_update_visits_a_rotating_slice(insta_config, tmp_path):
  slices = [training.table_update_indices(96, 0.25, u, seed=0) for u in range(4)]
  assert all(len(s) == 24 for s in slices)
  np.testing.assert_array_equal(np.sort(np.concatenate(slices)), np.arange(96))
  np.testing.assert_array_equal(training.table_update_indices(96, 1.0, 3, seed=0), np.arange(96))
  insta_config.train.epochs = 2
  insta_config.train.table.fraction = 0.25
  state = training.train_and_evaluate(insta_config, tmp_path / "run")
  moved = np.flatnonzero(np.asarray(state.sigma_table) != np.float32(0.25))
  assert set(moved) <= set(slices[0]) and len(moved) > 0


@pytest.mark.parametrize("key, value, message", [
    ("stage1_epochs", 5, "train.stage1_epochs must lie in"),
    ("table.eta", 1.5, "train.table.eta"),
    ("table.samples", 0, "train.table.samples"),
    ("table.sigma_min", 0.5, "sigma_min <= train.sigma <= train.table.sigma_max"),
    ("table.update_every", 0, "train.table.update_every"),
    ("table.chunk", 0, "train.table.chunk"),
    ("table.fraction", 0.0, "train.table.fraction"),
])
def test_bad_knobs_are_rejected(insta_config, tmp_path, key, value, message):
  section = insta_config.train
  *parents, leaf = key.split(".")
  for p in parents:
    section = section[p]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(insta_config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
