"""train.py's loop: the stages and their switch, resuming bit-identically after a kill or a
SIGTERM, the estimator and fine-tuning stages, the divergence watch, the training lock,
damaged checkpoints, TensorBoard values, and bad settings."""

import errno
import json
import shutil
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import instars_jax as ij
from helpers import (Killed, as_experts, event_values, make_toy_config, metrics_without_timing,
                     read_metrics, sigterm_during_step, stop_after, write_npz)
from configs import default
from instars_jax import data
from instars_jax.storage import checkpoints
from instars_jax.storage.parts import Parts
from instars_jax.storage.workdir import CONFIG_FILE, TrainingFacts, Workdir
from instars_jax.parallel import Sharder
from instars_jax.selection import estimator
from instars_jax.train import actions, loop, sigma_table, stages, steps
from instars_jax.train.stages import finetune, sigma_estimators
from instars_jax.train import state as state_lib

GRID = (0.25, 0.5, 1.0)


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


def same_params(a, b) -> None:
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)



def test_the_per_epoch_test_accuracy_reads_every_class_of_a_split_stored_class_by_class():
  # A model that always says class 0, on 3 classes stored 10 by 10 (as cifar10_jpeg's test
  # split is): 6 examples spread evenly hold 2 of class 0 (1/3); the first 6 would all be.
  config = default.get_config()
  config.train.update(eval_examples=6, batch_size=4)
  state = state_lib.create_train_state(
      config, TrainingFacts((28, 28, 1), 3, "fashion_mnist", 30, 1, "toy"))
  head = state.params["Dense_1"]
  params = {**state.params, "Dense_1": {"kernel": jnp.zeros_like(head["kernel"]),
                                       "bias": jnp.array([1.0, 0.0, 0.0])}}
  state = state.replace(params=params)
  split = data.Split(np.zeros((30, 28, 28), np.uint8), np.repeat(np.arange(3), 10))
  accuracy = steps.evaluate(state, split, Sharder(), config, 0.5)
  assert accuracy == {"test_clean_accuracy": pytest.approx(1 / 3),
                      "test_noisy_accuracy": pytest.approx(1 / 3)}

def test_killed_training_resumes_to_the_same_parameters_and_metrics(tmp_path, monkeypatch):
  config = make_toy_config(tmp_path)
  straight = loop.train_and_evaluate(config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed in the middle of epoch 2
    stop_after(steps, "train_step", 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(config, tmp_path / "resumed")
  assert checkpoints.manager(tmp_path / "resumed").latest_step() == 3  # epoch 1's end
  log = tmp_path / "resumed" / "metrics.jsonl"
  assert [row["step"] for row in read_metrics(tmp_path / "resumed")] == [3]  # readable
  before = log.read_text()
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed")
  assert log.read_text().startswith(before)  # appended to, no step twice
  assert [row["step"] for row in read_metrics(tmp_path / "resumed")] == [3, 6]
  assert metrics_without_timing(tmp_path / "resumed") == metrics_without_timing(tmp_path / "straight")
  # TensorBoard at each epoch end's global step, the killed run's and the resumed run's.
  events = event_values(tmp_path / "resumed" / "tensorboard" / "train")
  assert [step for step, _ in events["train_loss"]] == [3, 6]
  same_params(straight, resumed)
  loaded = ij.load_train_state(tmp_path / "resumed")
  same_params(loaded, straight)
  assert int(loaded.step) == 2 * 3 and loaded.sigma_table.shape == (96,)


def test_tensorboard_writes_through_any_writer_with_clu_s_method_names():
  calls = []

  class Recorder:  # CLU's MetricWriter methods that the action calls
    def write_scalars(self, step, scalars):
      calls.append(("scalars", step, dict(scalars)))

    def write_histograms(self, step, arrays, num_buckets=None):
      calls.append(("histograms", step, {k: np.asarray(v).tolist() for k, v in arrays.items()}))

    def flush(self):
      calls.append(("flush",))

    def close(self):
      calls.append(("close",))

  action = actions.TensorBoard(Recorder(), histogram=True)
  state = types.SimpleNamespace(sigma_table=np.float32([0.25, 1.0]))
  action.after_epoch(3, state, {"epoch": 3, "step": 12, "stage": "finetune", "train_loss": 0.5})
  action.close()
  assert calls == [("scalars", 12, {"epoch": 3, "step": 12, "train_loss": 0.5}),  # no strings
                   ("histograms", 12, {"sigma_table": [0.25, 1.0]}), ("flush",), ("close",)]


@pytest.mark.slow
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


@pytest.mark.slow
def test_killed_in_stage_2_resumes_to_the_same_table(insta_config, tmp_path, monkeypatch):
  # Resumed with another certify.n (certification's, which training never reads): the same
  # table and weights. With another train.table.n (the table's own): refused.
  straight = loop.train_and_evaluate(insta_config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed during the second table update
    stop_after(sigma_table, "profile_step", 2 + 1, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  insta_config.train.table.n = 500
  with pytest.raises(ValueError, match=r"different config \(train\.table\.n\)"):
    loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  insta_config.train.table.n = 100_000
  insta_config.certify.n = 37
  resumed = loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  np.testing.assert_array_equal(np.asarray(resumed.sigma_table), np.asarray(straight.sigma_table))
  np.testing.assert_array_equal(np.asarray(resumed.sigma_profile),
                                np.asarray(straight.sigma_profile))
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(straight.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_fractional_update_profiles_only_its_slice(insta_config, tmp_path):
  insta_config.train.epochs = 2
  insta_config.train.table.fraction = 0.25
  state = loop.train_and_evaluate(insta_config, tmp_path / "run")
  visited = np.flatnonzero(np.any(np.asarray(state.sigma_profile) != 0, axis=1))
  np.testing.assert_array_equal(np.sort(visited),
                                np.sort(sigma_table.update_indices(96, 0.25, 0, seed=0)))


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
    ("estimator.node_sigma_factor", 0.0, "train.estimator.node_sigma_factor must be finite and > 0"),
    ("estimator.node_sigma_factor", 2.0, "node_sigma_factor sets the router nodes' σ: it needs"),
])
def test_bad_knobs_are_rejected(insta_config, tmp_path, key, value, message):
  insta_config.train.estimator.epochs = 1
  section = insta_config.train
  *parents, leaf = key.split(".")
  for p in parents:
    section = section[p]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(insta_config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_estimator_stage_resumes_after_a_kill_to_the_same_estimator(insta_config, tmp_path,
                                                                    monkeypatch):
  insta_config.train.estimator.update(epochs=2, label_samples=4)
  insta_config.train.table.chunk = 32  # the base model's labels' pass in three chunks
  loop.train_and_evaluate(insta_config, tmp_path / "straight")
  parts = Parts(tmp_path / "resumed" / "estimator" / "profile_parts")
  with sigterm_during_step(monkeypatch, 2, sigma_estimators.ProfileParts, "keep"):
    with pytest.raises(checkpoints.Interrupted, match="labels' profile pass"):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  assert [len(part["rows"]) for part in parts.load()] == [32, 32]  # stopped after its 2nd chunk
  with monkeypatch.context() as m:  # killed in the estimator's second epoch
    stop_after(sigma_estimators, "train_step", 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  assert not parts.directory.exists()
  with np.load(tmp_path / "resumed" / "estimator" / "profile.npz") as got, \
       np.load(tmp_path / "straight" / "estimator" / "profile.npz") as expected:
    np.testing.assert_array_equal(got["profile"], expected["profile"])
  loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  (f, straight), (g, resumed) = (estimator.load(tmp_path / d / "estimator", tmp_path / d)
                                 for d in ("straight", "resumed"))
  assert straight == resumed and straight["sigma"] == 1.0  # σ_e: the top of the grid
  x = np.random.default_rng(0).uniform(size=(4, 28, 28)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(g(x)))
  # Other estimator settings on a finished run: refused, not silently mixed.
  insta_config.train.estimator.temperature = 0.5
  with pytest.raises(ValueError, match="estimator trained with other settings"):
    loop.train_and_evaluate(insta_config, tmp_path / "straight")


@pytest.mark.slow
def test_experts_label_the_estimator_and_held_out_examples_score_each_epoch(insta_config,
                                                                           tmp_path, monkeypatch):
  insta_config.train.holdout = 0.25
  insta_config.train.estimator.update(epochs=2, label_samples=4)
  workdir = tmp_path / "run"
  loop.train_and_evaluate(insta_config, workdir)
  with np.load(workdir / "estimator" / "profile.npz") as saved:
    base = {"train": saved["profile"], "holdout": saved["holdout"]}
  assert base["holdout"].shape == (24, 3) and np.any(base["holdout"] > 0)
  # Each epoch scores the estimator on the held-out labels; its choices' profile radius lies
  # between none and the oracle's, the default (the largest σ) is the last column's mean.
  scores = {tag: [v for _, v in values] for tag, values in
            event_values(workdir / "tensorboard" / "estimator").items()}
  held = np.maximum(base["holdout"], 0)
  assert len(scores["heldout_agreement"]) == 2 and 0 <= min(scores["heldout_agreement"]) <= 1
  assert scores["heldout_radius_oracle"][0] == pytest.approx(held.max(axis=1).mean(), rel=1e-6)
  assert scores["heldout_radius_default"][0] == pytest.approx(held[:, -1].mean(), rel=1e-6)
  assert 0 <= min(scores["heldout_radius"]) <= max(scores["heldout_radius"]) <= \
      scores["heldout_radius_oracle"][0] + 1e-6
  # Experts that are the base model's own weights at every σ label as the base model does
  # (the same classifier and noise); an expert's labels fill its own σ's column only.
  insta_config.train.estimator.experts = as_experts(insta_config, workdir, tmp_path)
  context = stages.Context.start(insta_config, Workdir(workdir), data.from_config(insta_config),
                                 Sharder(), None)
  labellers = sigma_estimators.labelling_experts(context)
  assert [e["sigma"] for e in labellers] == [0.25, 0.5, 1.0]
  state = ij.load_train_state(workdir)
  profile = sigma_estimators.cached_profile(context, state, labellers)
  for part in ("train", "holdout"):
    np.testing.assert_allclose(profile[part], base[part], atol=1e-5)
  fns = dict(sigma_estimators.experts.load(labellers))
  fns[np.float32(0.5)] = jax.tree_util.Partial(  # always class 0
      lambda x: jnp.zeros((len(x), 3)).at[:, 0].set(5.0))
  swapped = sigma_estimators.profile_from_experts(insta_config, context.dataset.train, fns,
                                                  sigma_estimators.Stream.ESTIMATOR_LABELS)
  np.testing.assert_allclose(swapped[:, [0, 2]], profile["train"][:, [0, 2]], atol=1e-6)
  labels = context.dataset.train.labels
  assert np.all(swapped[labels == 0, 1] > 0) and np.all(swapped[labels != 0, 1] < 0)
  # Experts on another grid are refused when the stages are built, before any training.
  insta_config.train.estimator.experts = ",".join(insta_config.train.estimator.experts.split(",")[:2])
  with pytest.raises(ValueError, match=r"train.estimator.experts names 2 workdirs"):
    loop.train_and_evaluate(insta_config, tmp_path / "other")
  assert Workdir(tmp_path / "other").checkpoints().latest_step() is None


@pytest.mark.slow
def test_router_nodes_resume_bit_identically_after_sigterm_and_kill_by_global_step(
    insta_config, tmp_path, monkeypatch):
  """Each node's checkpoints follow the stage before it in the global step count; SIGTERM in
  node 2 and a kill in node 1 both resume to the uninterrupted nodes."""
  insta_config.train.checkpoint_every_steps = 1
  insta_config.train.estimator.update(epochs=2, label_samples=4, router=True, init="base")
  loop.train_and_evaluate(insta_config, tmp_path / "straight")
  ends = [9]  # the base model: 3 epochs of 3 steps
  for k in (2, 1):
    manager = checkpoints.manager(tmp_path / "straight" / "router" / f"node_{k}")
    done = checkpoints.progress(manager, manager.latest_step())
    assert done["stage"] == f"router node {k}" and done["step"] == done["steps"]
    assert manager.latest_step() == ends[-1] + done["steps"]
    # TensorBoard at the global step of each of the node's 2 epoch ends.
    logged = event_values(tmp_path / "straight" / "tensorboard" / f"router_node_{k}")
    assert [step for step, _ in logged["train_loss"]] == [ends[-1] + done["steps"] // 2,
                                                          manager.latest_step()]
    ends.append(manager.latest_step())
  node_steps = ends[1] - ends[0]
  with sigterm_during_step(monkeypatch, 2, sigma_estimators):  # node 2, its second step
    with pytest.raises(checkpoints.Interrupted, match=r"stopped at step 2 "):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  assert checkpoints.manager(tmp_path / "resumed" / "router" / "node_2").latest_step() == 11
  with monkeypatch.context() as m:  # resumed, then killed in node 1's second step
    stop_after(sigma_estimators, "train_step", node_steps - 2 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  node_1 = checkpoints.manager(tmp_path / "resumed" / "router" / "node_1")
  assert node_1.latest_step() == ends[1] + 1
  loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  x = np.random.default_rng(0).uniform(size=(4, 28, 28)).astype(np.float32)
  for k in (2, 1):
    (f, straight), (g, resumed) = (estimator.load(tmp_path / d / "router" / f"node_{k}",
                                                  tmp_path / d) for d in ("straight", "resumed"))
    assert straight == resumed
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(g(x)))


@pytest.mark.slow
def test_finetuning_at_the_estimator_sigma_trains_each_example_there_and_resumes(
    insta_config, tmp_path, monkeypatch):
  insta_config.train.estimator.update(epochs=1, label_samples=4)
  insta_config.train.finetune.epochs = 2
  first = insta_config.train.epochs
  straight = loop.train_and_evaluate(insta_config, tmp_path / "straight")
  assigned = finetune.assigned_sigmas(tmp_path / "straight",
                                      data.load_dataset(insta_config.dataset).train, insta_config)
  np.testing.assert_array_equal(np.asarray(straight.sigma_table), assigned)
  assert set(np.unique(assigned)) <= {0.25, 0.5, 1.0}
  manager = checkpoints.manager(tmp_path / "straight")
  assert checkpoints.progress(manager, manager.latest_step()) == {"stage": "finetune", "step": 6,
                                                                  "steps": 6}
  rows = read_metrics(tmp_path / "straight")
  assert [r["stage"] for r in rows[-2:]] == ["finetune"] * 2 and len(rows) == first + 2

  with monkeypatch.context() as m:  # killed in the second fine-tuning epoch
    stop_after(steps, "train_step", first * 3 + 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  manager = checkpoints.manager(tmp_path / "resumed")
  assert checkpoints.progress(manager, manager.latest_step())["step"] == 3
  midway = checkpoints.restore(manager, manager.latest_step())
  np.testing.assert_array_equal(midway["sigma_table"], assigned)  # the checkpoint holds it
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(midway["params"]), jax.tree_util.tree_leaves(straight.params))]
  assert all(changed)  # the second fine-tuning epoch trained every layer
  resumed = loop.train_and_evaluate(insta_config, tmp_path / "resumed")
  for a, b in zip(jax.tree_util.tree_leaves(straight.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.sigma_table, resumed.sigma_table)
  changed = insta_config.copy_and_resolve_references()
  changed.train.finetune.learning_rate = 0.02
  with pytest.raises(ValueError, match=r"holds a fine-tuning run with other settings: "
                                       r"train.finetune.learning_rate=0.02 \(the run: 0.01\)"):
    loop.train_and_evaluate(changed, tmp_path / "straight")
  again = loop.train_and_evaluate(insta_config, tmp_path / "straight")  # finished: no-op
  np.testing.assert_array_equal(np.asarray(again.sigma_table), assigned)


@pytest.mark.slow
def test_sigterm_in_stage_2_checkpoints_the_step_and_resumes_bit_identically(toy_config, tmp_path,
                                                                           monkeypatch):
  # With the consistency loss (two noise copies per example, each at its table σ, a share of
  # them exploring the grid; the references' batching: two SGD updates per step): Insta-RS
  # Train composes with a multi-copy loss.
  toy_config.train.update(insta=True, stage1_epochs=1, epochs=3, checkpoint_every_steps=2,
                          loss="consistency")
  toy_config.train.table.explore = 0.5
  straight = loop.train_and_evaluate(toy_config, tmp_path / "straight")
  # TensorBoard events: every epoch's metrics, with the values of metrics.jsonl, and the
  # σ-table histogram.
  events = event_values(tmp_path / "straight" / "tensorboard" / "train")
  rows = read_metrics(tmp_path / "straight")
  for tag in ("train_loss", "train_consistency_kl", "test_noisy_accuracy", "sigma_mean"):
    assert [step for step, _ in events[tag]] == [3, 6, 9]  # the global steps
    np.testing.assert_allclose([v for _, v in events[tag]], [r[tag] for r in rows], rtol=1e-6)
  assert [step for step, _ in events["sigma_table"]] == [3, 6, 9]
  with sigterm_during_step(monkeypatch, 5, steps):  # epoch 2 (stage 2), batch 2
    with pytest.raises(checkpoints.Interrupted, match=r"stopped at step 5 \(epoch 2, batch 2 of 3\)"):
      loop.train_and_evaluate(toy_config, tmp_path / "resumed")
  # Nothing lost: the step the signal interrupted is saved; of the others (every 2 steps and
  # epoch ends) the epoch end is kept.
  assert checkpoints.manager(tmp_path / "resumed").all_steps() == [3, 5]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
  resumed = loop.train_and_evaluate(toy_config, tmp_path / "resumed")
  for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.sigma_table, resumed.sigma_table)
  np.testing.assert_array_equal(straight.sigma_profile, resumed.sigma_profile)
  assert int(resumed.step) == 18  # 9 steps of 2 updates


@pytest.mark.slow
def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(toy_config, tmp_path):
  toy_config.train.learning_rate = 1e4  # NaN within the first epoch
  with pytest.raises(ValueError, match=r"diverged by step 3 \(epoch 1\): train_loss is not finite"):
    loop.train_and_evaluate(toy_config, tmp_path / "nan")
  assert checkpoints.manager(tmp_path / "nan").latest_step() is None
  # Barely learning: the loss stays at ln 3 (chance for 3 classes) after the first epoch.
  toy_config.train.update(learning_rate=1e-7, epochs=3)
  toy_config.train.divergence.update(chance_steps=2, chance_fraction=0.9)
  with pytest.raises(ValueError, match=r"by step 6: mean train_loss .* is at chance level"):
    loop.train_and_evaluate(toy_config, tmp_path / "chance")
  assert checkpoints.manager(tmp_path / "chance").latest_step() == 3
  toy_config.train.divergence.chance_steps = 0  # switched off: the same run trains to the end
  loop.train_and_evaluate(toy_config, tmp_path / "off")
  assert checkpoints.manager(tmp_path / "off").latest_step() == 9


def test_training_refuses_a_workdir_with_another_config(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  toy_config.train.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config \(train\.learning_rate\)"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")


@pytest.mark.slow
def test_a_run_saved_before_later_keys_existed_still_resumes(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  saved_path = tmp_path / "run" / CONFIG_FILE
  saved = json.loads(saved_path.read_text())
  for key in ("image_size", "corrupt_images"):
    del saved[key]
  del saved["train"]["checkpoint_every_steps"], saved["train"]["divergence"]
  # The σ table's n and α lived under certify: an old run's are its certify.n and alpha.
  del saved["train"]["table"]["n"], saved["train"]["table"]["alpha"], saved["train"]["holdout"]
  saved["certify"]["n"] = 300
  saved_path.write_text(json.dumps(saved))
  toy_config.train.epochs = 2
  with pytest.raises(ValueError, match=r"different config \(train\.epochs, train\.table\.n\)"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")
  toy_config.train.table.n = 300
  with pytest.raises(ValueError, match=r"different config \(train\.epochs\)"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")
  saved["train"]["epochs"] = 2
  saved_path.write_text(json.dumps(saved))
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert checkpoints.manager(tmp_path / "run").latest_step() == 6


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "sigma", 0.0, "train.sigma must be finite and > 0"),
    ("train", "epochs", 0, "train.epochs must be >= 1"),
    ("train", "batch_size", 0, "train.batch_size must be a positive multiple"),
    ("train", "schedule", "linear", "train.schedule"),
    ("model", "name", "vgg", "model.name"),
])
def test_bad_training_config(toy_config, tmp_path, section, key, value, message):
  toy_config[section][key] = value
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_full_disk_gives_one_error_and_keeps_the_checkpoints_before(toy_config, tmp_path,
                                                                     monkeypatch):
  full = OSError(errno.ENOSPC, "No space left on device")
  original_save = ocp.CheckpointManager.save

  def save_until_full(self, step, *args, **kwargs):
    if step == 6:
      raise full
    return original_save(self, step, *args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "save", save_until_full)
    with pytest.raises(ValueError, match=r"cannot write checkpoint 6 to .*: No space left on "
                                         r"device \(errno 28\); what was written before is intact"):
      loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert checkpoints.manager(tmp_path / "run").latest_step() == 3
  ij.load_train_state(tmp_path / "run")  # the checkpoint before restores
  loop.train_and_evaluate(toy_config, tmp_path / "run")  # and the rerun finishes


def test_a_second_trainer_on_the_workdir_is_refused_naming_the_first(toy_config, tmp_path):
  workdir = Workdir(tmp_path / "run")
  with workdir.training_lock():  # stands for a train.py that is running
    with pytest.raises(ValueError, match=r"the training run in .* is in use by pid \d+"):
      loop.train_and_evaluate(toy_config, workdir.path)
  assert checkpoints.manager(workdir.path).latest_step() is None
  loop.train_and_evaluate(toy_config, workdir.path)  # once it is gone, training runs


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_and_the_one_before_still_resumes(toy_config, tmp_path,
                                                                       monkeypatch):
  toy_config.train.checkpoint_every_steps = 1
  straight = loop.train_and_evaluate(toy_config, tmp_path / "straight")
  with monkeypatch.context() as m:  # killed in epoch 2, after checkpoint 4
    stop_after(steps, "train_step", 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(toy_config, tmp_path / "run")
  saved = tmp_path / "run" / "checkpoints"
  assert checkpoints.manager(tmp_path / "run").all_steps() == [3, 4]  # the epoch end is kept
  for chunk in (saved / "4").glob("default/ocdbt.process_0/d/*"):
    chunk.write_bytes(b"\0" * 100)
  with pytest.raises(ValueError, match=r"checkpoint 4 in .* is corrupt or incomplete .*: remove "
                                       r".*4 to fall back to the one before it"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")
  shutil.rmtree(saved / "4")
  same_params(loop.train_and_evaluate(toy_config, tmp_path / "run"), straight)


@pytest.mark.slow
def test_a_stop_in_an_epoch_s_last_step_keeps_that_epoch_s_row_and_checkpoint(toy_config,
                                                                              tmp_path,
                                                                              monkeypatch):
  straight = loop.train_and_evaluate(toy_config, tmp_path / "straight")
  with sigterm_during_step(monkeypatch, 3, steps):  # the last of epoch 1's three steps
    with pytest.raises(checkpoints.Interrupted, match=r"stopped at step 3 \(epoch 1, batch 3 of 3\)"):
      loop.train_and_evaluate(toy_config, tmp_path / "resumed")
  assert checkpoints.manager(tmp_path / "resumed").latest_step() == 3
  assert [row["epoch"] for row in read_metrics(tmp_path / "resumed")] == [0]
  same_params(loop.train_and_evaluate(toy_config, tmp_path / "resumed"), straight)
  assert metrics_without_timing(tmp_path / "resumed") == metrics_without_timing(tmp_path / "straight")


@pytest.mark.slow
def test_a_router_tree_trains_one_node_per_grid_sigma_and_certifies(insta_config, tmp_path):
  from instars_jax import certification
  from instars_jax.storage import results
  insta_config.train.epochs = 2
  insta_config.train.holdout = 0.25  # 24 of the 96 training examples, kept for tuning
  insta_config.train.estimator.update(epochs=1, label_samples=4, router=True, init="base",
                                balance_bins=False, entropy=0.1, radius_weight=1.0,
                                node_sigma_factor=1.5)  # each node smoothed at 1.5 σ_k
  base = loop.train_and_evaluate(insta_config, tmp_path / "run")
  for k, sigma in ((2, 1.5), (1, 0.75)):
    fn, saved = estimator.load(tmp_path / "run" / "router" / f"node_{k}", tmp_path / "run")
    assert (saved["node"], saved["sigma"], saved["init"]) == (k, sigma, "base")
    assert fn(np.zeros((2, 28, 28), np.float32)).shape == (2, 2)  # two bins: lower, σ_k
  assert not (tmp_path / "run" / "estimator" / "checkpoints").exists()  # no flat estimator
  # init = base: every layer but the head started from the base model's weights.
  context = stages.Context.start(insta_config, Workdir(tmp_path / "probe"),
                                 data.from_config(insta_config), Sharder(), None)
  stage = stages.for_config(context)[1]
  stage.steps_per_epoch = 1
  started = sigma_estimators.from_base(stage.template(), base)
  np.testing.assert_array_equal(started.params["Conv_0"]["kernel"], base.params["Conv_0"]["kernel"])
  assert started.params["Dense_1"]["kernel"].shape == (128, 2)
  insta_config.certify.update(sigma_mode="instance", certificate="router", n0=16, n=200,
                              batch=64, skip=4)
  path = certification.certify_test_set(insta_config, tmp_path / "run")
  table = results.read_results(path)
  assert path.name == "router.tsv" and set(table["sigma"]) <= {0.25, 0.5, 1.0}
  meta = results.read_metadata(path)
  assert meta["certificate"] == "router" and meta["router"]["beta_per_node"] == 0.00025
  assert [node["sigma"] for node in meta["router"]["nodes"]] == [1.5, 0.75]
  assert Workdir(tmp_path / "run").read_facts().num_train == 72
  # τ tuned on the held-out examples: a τ's numbers are those of certify.py on that split.
  from instars_jax import analyze, tune
  insta_config.certify.update(certificate="thresholded", skip=2)
  insta_config.certify.thresholded.sweep = (0.6, 0.8)
  swept = tune.tune_thresholds(insta_config, tmp_path / "run")
  insta_config.certify.split = "holdout"
  insta_config.certify.thresholded.threshold = 0.8
  path = certification.certify_test_set(insta_config, tmp_path / "run")
  assert path.name == "thresholded_0.8_holdout.tsv"
  assert len(results.read_results(path)["idx"]) == 12
  summary = analyze.summarize(path)
  assert swept[0.8]["acr"] == pytest.approx(summary["acr"], abs=1e-5)  # radii written 6 digits
  assert swept[0.8]["certified_accuracy"] == pytest.approx(summary["certified_accuracy"])
  assert results.read_metadata(path)["split"] == "holdout"
  insta_config.train.holdout = 0.5
  with pytest.raises(ValueError, match=r"train.holdout=0.5 \(the run: 0.25\)"):
    certification.certify_test_set(insta_config, tmp_path / "run")
  insta_config.train.holdout = 0.25
  insta_config.train.table.grid = (0.25, 1.0)  # the trained nodes decide other σ
  with pytest.raises(ValueError, match=r"train.table.grid=\(0.25, 1.0\) "
                                       r"\(the run: \(0.25, 0.5, 1.0\)\)"):
    certification.certify_test_set(insta_config, tmp_path / "run")


def test_a_stage_is_one_new_file_with_its_section_run_in_the_order_it_declares(insta_config, tmp_path, request):
  extra = tmp_path / "more_stages"
  extra.mkdir()
  (extra / "probe.py").write_text("ORDER = 1.5  # after the σ-estimators, before fine-tuning\n"
                                  "DEFAULTS = {'every': 2}  # its config section, probe\n"
                                  "def validate(config):\n  pass\n"
                                  "class Probe:\n  pass\n"
                                  "def stages(context):\n  return [Probe()]\n")
  stages.__path__.append(str(extra))  # the package's folders, as imports see them
  request.addfinalizer(lambda: stages.__path__.remove(str(extra)))
  assert default.get_config().train.probe.to_dict() == {"every": 2}
  insta_config.train.estimator.epochs = 1
  insta_config.train.finetune.epochs = 1
  context = stages.Context.start(insta_config, Workdir(tmp_path / "run"),
                                 data.from_config(insta_config), Sharder(), None)
  assert [type(stage).__name__ for stage in stages.for_config(context)] == [
      "BaseStage", "EstimatorStage", "Probe", "FinetuneStage"]


OUTSIDE_LOSS = '''"""Gaussian augmentation with its loss scaled by a setting of its own."""
from instars_jax.train.losses import gaussian

FAMILY = "instars_jax.train.losses"
DEFAULTS = {"weight": 1.0}
SOFT_TARGETS, SEPARATE_PASSES = True, False


def validate(weight):
  return [] if weight > 0 else [f"weight must be > 0; got {weight}"]


def inputs(images, labels, sigma, keys, *, predict, epoch, weight):
  del weight
  return gaussian.inputs(images, labels, sigma, keys, predict=predict, epoch=epoch)


def objective(logits, labels, sigma, *, epoch, weight):
  loss, metrics = gaussian.objective(logits, labels, sigma, epoch=epoch)
  return weight * loss, metrics
'''
OUTSIDE_STAGE = '''"""A stage after the others that records the note of its own section, and adds no steps."""
FAMILY = "instars_jax.train.stages"
ORDER = 3
DEFAULTS = {"note": "seen"}


def validate(config):
  if not config.train.probe.note:
    raise ValueError("train.probe.note must not be empty")


def stages(context):
  (context.workdir.path / "probe.txt").write_text(context.config.train.probe.note)
  return []
'''


@pytest.mark.slow  # make test loads outside modules by dotted path: test_data, test_certification
def test_an_outside_loss_and_stage_with_their_sections_run_by_dotted_path(tmp_path, monkeypatch):
  # Two modules outside the package, named to the config (configs/x.py:my_pkg.scaled,...),
  # with no other edit: the loss trains (weight 1 exactly as Gaussian augmentation, weight 2
  # otherwise), the stage runs in its ORDER, both sections are validated, saved and checked on
  # resume; certification reads the run with them from its workdir.
  package = tmp_path / "outside" / "my_pkg"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "scaled.py").write_text(OUTSIDE_LOSS)
  (package / "probe.py").write_text(OUTSIDE_STAGE)
  monkeypatch.syspath_prepend(str(tmp_path / "outside"))
  toy = make_toy_config(tmp_path)
  toy.train.epochs = 1

  def config(**loss):
    c = default.get_config("my_pkg.scaled,my_pkg.probe")
    c.update(dataset=toy.dataset)
    c.train.update(epochs=1, batch_size=32, learning_rate=0.05, loss="my_pkg.scaled")
    c.train.scaled.update(loss)
    return c

  assert config().plugins == ("my_pkg.scaled", "my_pkg.probe")
  assert config().train.probe.to_dict() == {"note": "seen"}
  assert config().train.estimator.scaled.to_dict() == {"weight": 1.0}
  gaussian = loop.train_and_evaluate(toy, tmp_path / "gaussian")
  same_params(gaussian, loop.train_and_evaluate(config(), tmp_path / "scaled_1"))
  assert (tmp_path / "scaled_1" / "probe.txt").read_text() == "seen"
  doubled = loop.train_and_evaluate(config(weight=2.0), tmp_path / "scaled_2")
  assert not np.array_equal(jax.tree_util.tree_leaves(doubled.params)[0],
                            jax.tree_util.tree_leaves(gaussian.params)[0])
  saved = json.loads((tmp_path / "scaled_2" / CONFIG_FILE).read_text())
  assert saved["plugins"] == ["my_pkg.scaled", "my_pkg.probe"]
  assert saved["train"]["scaled"] == {"weight": 2.0} and saved["train"]["probe"] == {"note": "seen"}
  with pytest.raises(ValueError, match=r"different config \(train\.scaled\.weight\)"):
    loop.train_and_evaluate(config(weight=3.0), tmp_path / "scaled_2")
  with pytest.raises(ValueError, match=r"train\.scaled\.weight must be > 0; got 0\.0"):
    loop.train_and_evaluate(config(weight=0.0), tmp_path / "bad")
  bad = config()
  bad.train.probe.note = ""
  with pytest.raises(ValueError, match="train.probe.note must not be empty"):
    loop.train_and_evaluate(bad, tmp_path / "bad")
  with_experts = config()  # an expert's run could not switch the outside stage off
  with_experts.train.experts.sigmas = (0.5,)
  with pytest.raises(ValueError, match=r"the stage module my_pkg.probe declares no OFF"):
    loop.validate_config(with_experts, 1)
  unnamed = default.get_config()
  unnamed.train.loss = "my_pkg.scaled"
  with pytest.raises(ValueError, match=r"train.loss=my_pkg.scaled has no section "
                                       r"train.scaled: name the module to the config"):
    loop.validate_config(unnamed, 1)
  # The σ-estimators train with it too, under its section train.estimator.scaled.
  estimated = config()
  estimated.train.estimator.update(epochs=1, label_samples=2, loss="my_pkg.scaled")
  estimated.train.estimator.scaled.weight = 0.5
  loop.train_and_evaluate(estimated, tmp_path / "estimated")
  recorded = json.loads((tmp_path / "estimated" / "estimator" / "estimator.json").read_text())
  assert recorded["loss"] == "my_pkg.scaled" and recorded["loss_settings"] == {"weight": 0.5}
  (package / "table.py").write_text(OUTSIDE_LOSS)  # its section would replace train.table
  with pytest.raises(ValueError, match=r"declares the section train.table, which the config "
                                       r"already has"):
    default.get_config("my_pkg.table")
  from instars_jax import certification
  read = certification.run_config(tmp_path / "scaled_2", {"certify.n": 10})
  assert read.train.scaled.weight == 2.0 and read.train.loss == "my_pkg.scaled"
  # A certificate kind's section, named at certification (certify.py
  # --config=configs/default.py:my_pkg.kind adds it to the run's config).
  (package / "kind.py").write_text('FAMILY = "instars_jax.certificates"\n'
                                   'DEFAULTS = {"depth": 1}\n')
  read = certification.run_config(tmp_path / "scaled_2", {"certify.kind.depth": 2},
                                  outside=("my_pkg.kind",))
  assert read.certify.kind.depth == 2 and read.train.scaled.weight == 2.0
  (package / "stray.py").write_text("DEFAULTS = {}\n")
  with pytest.raises(ValueError, match=r"the plug-in 'my_pkg.stray' must declare FAMILY"):
    default.get_config("my_pkg.stray")


def test_a_run_saved_before_the_stage_sections_moved_resumes_and_certifies(toy_config, tmp_path):
  # An older run's config.json: the σ-estimators' section at the top level with fine-tuning's
  # settings in it, no train.finetune and no plugins, and a section saved empty that has a key
  # today (train.gaussian). It resumes under today's config, and certify reads it.
  from instars_jax import certification
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  path = tmp_path / "run" / CONFIG_FILE
  saved = json.loads(path.read_text())
  older = saved["train"].pop("estimator") | {"finetune_epochs": 0, "finetune_learning_rate": 0.02}
  del saved["train"]["finetune"], saved["plugins"]
  path.write_text(json.dumps(saved | {"estimator": older}))
  defaults = default.get_config()
  defaults.train.gaussian = {"unused": 1}
  read = Workdir(tmp_path / "run").read_config(defaults)
  assert read.train.gaussian.to_dict() == {"unused": 1}
  read = certification.run_config(tmp_path / "run", {})
  assert read.train.finetune.to_dict() == {"epochs": 0, "learning_rate": 0.02}
  assert read.train.estimator.to_dict() == toy_config.train.estimator.to_dict()
  assert "estimator" not in read and read.plugins == ()
  toy_config.train.epochs = 2
  saved["train"]["epochs"] = 2
  path.write_text(json.dumps(saved | {"estimator": older}))
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert checkpoints.manager(tmp_path / "run").latest_step() == 6
