"""configs/fashion_mnist_sound.py's stages on a toy dataset: the base model (the top expert),
the σ = 0.5 expert in a run of its own, the router node labelled by both, and τ tuned on the
held-out examples into tuned.json, which certification reads; stopped in every stage (SIGTERM
or a kill) and resumed, the run gives the same tuned τ and results file as an uninterrupted
one."""

import json
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest

from configs import cifar10_sound, fashion_mnist_sound
from helpers import Killed, rows_without_time, sigterm_during_step, stop_after, write_npz
from instars_jax import analyze, certification, tune
from instars_jax.certificates import thresholded
from instars_jax.selection import estimator
from instars_jax.storage import checkpoints, results
from instars_jax.storage.parts import Parts
from instars_jax.storage.workdir import Workdir
from instars_jax.train import loop, sigma_table, steps
from instars_jax.train.stages import sigma_estimators, sigma_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import selector_levers  # noqa: E402


def toy_recipe(tmp_path, recipe=fashion_mnist_sound):
  config = recipe.get_config()
  config.dataset = f"npz:{write_npz(tmp_path / 'toy.npz', n_train=96, n_test=16)}"
  config.train.update(epochs=2, stage1_epochs=1, batch_size=32, holdout=0.25, eval_examples=16)
  config.train.table.update(n=100, chunk=32)  # the labels' pass in chunks of 32, 32, 8
  config.train.estimator.update(epochs=1, label_samples=4)
  config.certify.update(n0=16, n=100, batch=64, instances=4, skip=2)
  config.certify.thresholded.sweep = (0.2, 0.6, 0.9)
  return config


def test_an_expert_s_config_switches_off_every_stage_after_the_base_model():
  from instars_jax import plugins
  from instars_jax.train import stages
  for recipe in (fashion_mnist_sound, cifar10_sound):
    config = recipe.get_config()
    config.train.finetune.epochs = 3  # on here, off in the experts
    alone = sigma_experts.expert_config(config, 0.5)
    later = [name for name in stages.modules(config) if name != stages.BASE]
    assert len(later) == 4
    for name in later:
      module = plugins.load(stages.__name__, name)
      try:
        on = bool(module.stages(SimpleNamespace(config=config)))
      except AttributeError:  # it went on to build its stage from the run's context: on
        on = True
      assert on and module.stages(SimpleNamespace(config=alone)) == []


def certified(config, workdir):
  """The sound row certify.py --workdir=DIR writes: the saved config with tuned.json."""
  run = certification.run_config(workdir, {})
  assert run.certify.thresholded.threshold == json.loads(
      Workdir(workdir).tuned_path.read_text())["settings"]["certify.thresholded.threshold"]
  return certification.certify_test_set(run, workdir)


@pytest.mark.slow
def test_the_levers_bench_on_the_recipe_s_run(straight_run, capsys, monkeypatch):
  """bench/selector_levers.py on the run: τ chosen on the held-out examples as the tuning stage
  chose it, and the test row at that τ is certify.py's, from class tests shared across the
  node n variants; the choices and the oracle read off the experts' fixed-σ rows."""
  _, straight, straight_rows = straight_run
  expert = sigma_experts.expert_dir(straight, 0.5)
  tuned = json.loads(Workdir(straight).tuned_path.read_text())
  fixed = []
  for workdir, overrides in ((expert, {}), (straight, {"certify.sigma_mode": "fixed"})):
    config = certification.run_config(workdir, overrides)  # the expert: fixed σ by itself
    fixed.append(str(certification.certify_test_set(config, workdir)))
  capsys.readouterr()
  args = ["--runs", str(straight), "--node-n", "0,300", "--experts", fashion_mnist_sound.EXPERTS,
          "--fixed", ",".join(fixed), "--n", "100", "--skip", "2", "--taus", "0.2,0.6,0.9",
          "--cache-dir", str(straight / "levers"), "--project", "10"]
  selector_levers.main(args + ["--class-tests-only"])  # no selector needed for these
  with monkeypatch.context() as m:  # the next invocation reads the class tests kept on disk
    m.setattr(thresholded, "class_tests", None)
    selector_levers.main(args)
  out = json.loads(capsys.readouterr().out)
  high, same_n, high_10, same_10, _, more_n, _, _ = out["variants"]
  assert same_n["tau"] == tuned["settings"]["certify.thresholded.threshold"]
  assert high["tau"] >= 0.5 and high["default_route"] == "largest σ"
  assert (same_n["node_n"], more_n["node_n"]) == (100, 300)
  written = analyze.summarize(straight_rows)
  assert same_n["test"]["acr"] == pytest.approx(written["acr"], abs=1e-5)
  assert same_n["test"]["certified_accuracy"] == pytest.approx(written["certified_accuracy"])
  assert same_n["price"] == pytest.approx(same_n["choices_acr"] - same_n["test"]["acr"])
  parts = same_n["test"]["price_parts"]
  assert parts["all"]["choices"] == pytest.approx(same_n["choices_acr"])
  assert parts["all"]["sound"] == pytest.approx(same_n["test"]["acr"])
  for field in ("images", "choices", "class_test", "sound"):
    assert parts["all"][field] == pytest.approx(sum(parts[g][field] for g in (
        "moved", "kept", "node abstained", "class test abstained")))
  for group in ("moved", "kept"):  # the nodes' caps only take radius away
    assert parts[group]["class_test"] >= parts[group]["sound"] - 1e-12
  assert parts["moved"]["images"] / parts["all"]["images"] == pytest.approx(same_n["test"]["moved"])
  # 10× the node's n at the share it saw: bounds nearer p̂, so no radius shrinks at any τ
  assert (high_10["projected"], same_10["node_n"], same_n["projected"]) == (True, 1000, False)
  assert same_10["test"]["projected"] and not same_n["test"]["projected"]
  for tau, own in same_n["held_out"].items():
    assert same_10["held_out"][tau]["acr"] >= own["acr"] - 1e-12
  assert any(same_10["held_out"][t]["acr"] > own["acr"] for t, own in same_n["held_out"].items())
  assert out["oracle"]["acr"] >= max(f["acr"] for f in out["fixed"].values())
  selector_levers.main([a for a in args[:-2] if a not in ("--fixed", ",".join(fixed))]
                       + ["--screen"])  # held-out rows only, fixed rows from tests
  screened = json.loads(capsys.readouterr().out)
  chosen = screened["variants"][1]
  assert screened["split"] == "holdout" and chosen["tau"] == same_n["tau"]
  assert chosen["test"]["acr"] == same_n["held_out"][f"{same_n['tau']:g}"]["acr"]
  for part in chosen["test"]["price_parts"].values():  # the fixed rows are the class tests
    assert part["choices"] == pytest.approx(part["class_test"])
  shown = selector_levers.table(out).splitlines()  # header, 2 fixed, 8 variants, oracle, 8 gaps
  assert len(shown) == 2 + 2 + 8 + 1 + 8 + 1 + 2 + 8 * 5  # and the price parts: 8 × 5 groups
  assert shown[2].startswith("| fixed σ = 0.5 | |")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """The toy recipe run uninterrupted: its config, workdir and certify.py's results file."""
  root = tmp_path_factory.mktemp("recipe")
  config = toy_recipe(root)
  straight = root / "straight"
  loop.train_and_evaluate(config, straight)
  return config, straight, certified(config, straight)


def test_the_recipe_stopped_in_every_stage_resumes_to_the_same_tuned_tau_and_results(
    straight_run, tmp_path, monkeypatch):
  config, straight, straight_rows = straight_run
  expert = sigma_experts.expert_dir(straight, 0.5)
  saved = Workdir(expert).read_config()
  assert (saved.train.insta, saved.train.sigma, saved.train.holdout) == (False, 0.5, 0.25)
  assert (saved.train.estimator.epochs, saved.train.tune.threshold) == (0, False)
  _, node = estimator.load(straight / "router" / "node_1", straight)
  assert node["sigma"] == 1.0 and node["experts"] == fashion_mnist_sound.EXPERTS  # {workdir}
  tuned = json.loads(Workdir(straight).tuned_path.read_text())
  assert tuned["settings"]["certify.thresholded.threshold"] in (0.2, 0.6, 0.9)
  swept = tune.tune_thresholds(config, straight)  # the stage's choice is the sweep's best
  assert tuned["settings"]["certify.thresholded.threshold"] == tune.best_threshold(swept)
  meta = results.read_metadata(straight_rows)
  assert meta["certificate"] == "thresholded" and [e["sigma"] for e in meta["experts"]] == [0.5, 1.0]

  resumed = tmp_path / "resumed"
  with sigterm_during_step(monkeypatch, 2, steps):  # the base model, its second step
    with pytest.raises(checkpoints.Interrupted):
      loop.train_and_evaluate(config, resumed)
  with monkeypatch.context() as m:  # the base model's last 2 steps, then the expert's run,
    stop_after(steps, "train_step", 2 + 3, m)  # killed in its third step (epoch 2)
    with pytest.raises(Killed):
      loop.train_and_evaluate(config, resumed)
  assert checkpoints.manager(sigma_experts.expert_dir(resumed, 0.5)).latest_step() == 2
  parts = resumed / "estimator" / "profile_parts"
  with sigterm_during_step(monkeypatch, 2, sigma_table, "_profile_radii"):  # the labels' pass
    with pytest.raises(checkpoints.Interrupted, match="labels' profile pass"):
      loop.train_and_evaluate(config, resumed)
  assert [len(p["rows"]) for p in Parts(parts).load()] == [32, 32]  # the chunk it was in, kept
  with monkeypatch.context() as m:  # killed in the pass's third chunk from there
    stop_after(sigma_table, "_profile_radii", 3, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(config, resumed)
  assert [(str(p["column"]), len(p["rows"])) for p in Parts(parts).load()] == [
      *[("ESTIMATOR_LABELS_sigma_0.5", n) for n in (32, 32, 8)], ("ESTIMATOR_LABELS_sigma_1", 32)]
  with sigterm_during_step(monkeypatch, 1, sigma_estimators):  # the router node
    with pytest.raises(checkpoints.Interrupted):
      loop.train_and_evaluate(config, resumed)
  with sigterm_during_step(monkeypatch, 1, thresholded, "sweep"):  # tuning: stops before call 2
    with pytest.raises(checkpoints.Interrupted, match="tuning"):
      loop.train_and_evaluate(config, resumed)
  assert not Workdir(resumed).tuned_path.exists()
  tuning = Parts(next((resumed / "certify").glob("tune_thresholded*.parts")))
  with monkeypatch.context() as m:  # tuning, killed in its second call from there
    stop_after(thresholded, "sweep", 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(config, resumed)
  assert [len(p["index"]) for p in tuning.load()] == [4, 4]  # 12 held-out examples, 4 a call
  with monkeypatch.context() as m:  # the third call only: a second one would be killed
    stop_after(thresholded, "sweep", 2, m)
    loop.train_and_evaluate(config, resumed)
  assert Workdir(resumed).tuned_path.read_text() == Workdir(straight).tuned_path.read_text()
  assert not parts.exists() and not tuning.directory.exists()
  with np.load(parts.with_name("profile.npz")) as got, \
       np.load(straight / "estimator" / "profile.npz") as expected:
    for key in ("profile", "holdout"):  # (their settings name each run's own experts)
      np.testing.assert_array_equal(got[key], expected[key])
  with monkeypatch.context() as m:  # a finished run: every stage finds its work done
    stop_after(thresholded, "sweep", 1, m)
    stop_after(steps, "train_step", 1, m)
    loop.train_and_evaluate(config, resumed)
  assert rows_without_time(certified(config, resumed)) == rows_without_time(straight_rows)
  assert np.isin(results.read_results(straight_rows)["sigma"], (0.5, 1.0)).all()


def test_experts_are_refused_at_the_base_model_s_own_sigma(tmp_path):
  config = toy_recipe(tmp_path)
  config.train.experts.sigmas = (0.5, 1.0)
  with pytest.raises(ValueError, match=r"lists σ = 1, the base model's own train.sigma"):
    loop.train_and_evaluate(config, tmp_path / "run")
  config.train.experts.sigmas = (0.5,)
  config.train.holdout = 0.0
  with pytest.raises(ValueError, match="train.tune.threshold tunes the thresholded chain"):
    loop.train_and_evaluate(config, tmp_path / "run")


@pytest.mark.slow
def test_the_cifar10_recipe_trains_three_experts_two_nodes_and_tunes_at_toy_size(tmp_path):
  # configs/cifar10_sound.py's stages with K = 3 (LeNet on the toy data instead of ResNet-20):
  # the σ = 0.25 and 0.5 experts in runs of their own, one node per σ above the lowest, each
  # labelled by all three experts, τ tuned, and certify.py's sound row behind three experts.
  config = toy_recipe(tmp_path, cifar10_sound)
  config.model.name, config.train.augment = "lenet", "none"
  run = tmp_path / "run"
  loop.train_and_evaluate(config, run)
  for sigma in (0.25, 0.5):
    saved = Workdir(sigma_experts.expert_dir(run, sigma)).read_config()
    assert (saved.train.sigma, saved.train.estimator.epochs, tuple(saved.train.experts.sigmas)) == (
        sigma, 0, ())
  for node, sigma in ((1, 0.5), (2, 1.0)):
    _, settings = estimator.load(run / "router" / f"node_{node}", run)
    assert settings["sigma"] == sigma and settings["experts"] == cifar10_sound.EXPERTS
  rows = certified(config, run)
  meta = results.read_metadata(rows)
  assert [e["sigma"] for e in meta["experts"]] == [0.25, 0.5, 1.0]
  assert set(results.read_results(rows)["sigma"]) <= {0.25, 0.5, 1.0}
