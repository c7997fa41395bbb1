"""train.py / certify.py end to end, resumption after a kill, and clear errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
import instars_jax as ij
from instars_jax import certificates, certification, data
from instars_jax.run import checkpoints, results
from instars_jax.run.workdir import CONFIG_FILE, INTERIM_DIR
from instars_jax.smoothing.streams import Stream
from instars_jax.train import loop, steps
from test_data_models import write_npz

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
  """Stands for the process dying at that point: whatever is on disk stays."""


@pytest.fixture
def toy_config(tmp_path):
  config = default.get_config()
  config.dataset = f"npz:{write_npz(tmp_path / 'toy.npz', n_train=96, n_test=24)}"
  config.model.name = "lenet"
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.learning_rate = 0.05
  config.certify.n0 = 16
  config.certify.n = 200
  config.certify.batch = 64
  config.certify.instances = 4
  config.certify.skip = 2
  return config


def stop_after(module, name, calls, monkeypatch):
  """Makes module.name raise Killed on its call number `calls` (1-based)."""
  original, count = getattr(module, name), [0]
  def wrapper(*args, **kwargs):
    count[0] += 1
    if count[0] == calls:
      raise Killed
    return original(*args, **kwargs)
  monkeypatch.setattr(module, name, wrapper)


def rows_without_time(path):
  table = results.read_results(path)
  return {k: v.tolist() for k, v in table.items() if k != "time"}


def metrics_without_timing(workdir):
  rows = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  timing = ("images_per_s", "seconds", "input_wait_share")
  return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_killed_training_and_certification_resume_to_the_same_results(toy_config, tmp_path,
                                                                      monkeypatch):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  loop.train_and_evaluate(toy_config, straight)
  certification.certify_test_set(toy_config, straight)

  with monkeypatch.context() as m:  # killed in the middle of epoch 2
    stop_after(steps, "train_step", 3 + 2, m)
    with pytest.raises(Killed):
      loop.train_and_evaluate(toy_config, resumed)
  assert checkpoints.manager(resumed).latest_step() == 1
  loop.train_and_evaluate(toy_config, resumed)
  with monkeypatch.context() as m:  # killed after the first batch of rows was written
    stop_after(results.ResultsWriter, "write", 2, m)
    with pytest.raises(Killed):
      certification.certify_test_set(toy_config, resumed)
  partial = results.read_results(certification.output_path(toy_config, resumed))
  assert 0 < len(partial["idx"]) < 12
  certification.certify_test_set(toy_config, resumed)

  tsv = lambda d: certification.output_path(toy_config, d)
  assert rows_without_time(tsv(resumed)) == rows_without_time(tsv(straight))
  assert len(results.read_results(tsv(straight))["idx"]) == 12  # every 2nd of 24 test images
  assert metrics_without_timing(resumed) == metrics_without_timing(straight)
  a, b = ij.load_train_state(straight), ij.load_train_state(resumed)
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  assert int(a.step) == 2 * 3 and a.sigma_table.shape == (96,)


def test_certification_refuses_other_settings_and_missing_checkpoints(toy_config, tmp_path):
  with pytest.raises(FileNotFoundError, match="no training run"):
    certification.certify_test_set(toy_config, tmp_path / "empty")
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  path = certification.certify_test_set(toy_config, tmp_path / "run")
  before = path.read_text()
  toy_config.certify.n = 300
  with pytest.raises(ValueError, match=r"made with other settings \(n\)"):
    certification.certify_test_set(toy_config, tmp_path / "run")
  assert path.read_text() == before
  meta = results.read_metadata(path)
  assert meta["certificate"] == "fixed_sigma" and meta["n"] == 200
  events = event_tags(tmp_path / "run" / "tensorboard" / "certify" / "sigma_0.25")
  assert events["acr"] == [0] and "certified_accuracy/r_0.5" in events


def test_instance_sigma_mode(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  toy_config.certify.sigma_mode = "instance"
  toy_config.certify.certificate = "per_sigma"
  toy_config.certify.search.update(sigma_min=0.1, sigma_max=1.0, starts=2, steps=3,
                                   samples_per_step=16)
  path = certification.certify_test_set(toy_config, tmp_path / "run")
  assert path.name == "instance_0.1-1.tsv"
  table = results.read_results(path)
  assert np.all((table["sigma"] >= 0.1) & (table["sigma"] <= 1.0))
  meta = results.read_metadata(path)
  assert meta["certificate"] == "per_sigma" and meta["sigma_mode"] == "instance"
  assert "not a certificate of the input-dependent classifier" in meta["certificate_meaning"]
  assert meta["search_samples_per_instance"] == 2 * 3 * 16
  assert meta["search"]["samples_per_step"] == 16
  # The bound comes from CERTIFY's own fresh samples at the chosen σ: certifying again at
  # those σ with the run's key reproduces every row.
  state = ij.load_train_state(tmp_path / "run")
  dataset = data.load_dataset(toy_config.dataset)
  batch = dataset.test.take(table["idx"])
  key = jax.random.fold_in(jax.random.PRNGKey(toy_config.seed), Stream.CERTIFY)
  again = ij.certify(ij.logits_fn(state), batch["image"], table["sigma"], key,
                            n0=16, n=200, alpha=0.001, batch_size=64, num_classes=3,
                            ids=batch["index"])
  np.testing.assert_array_equal(again.prediction, table["predict"])
  np.testing.assert_allclose(again.radius, table["radius"], rtol=1e-5, atol=1e-6)
  toy_config.certify.search.steps = 2
  with pytest.raises(ValueError, match="steps must be an integer >= 3"):
    certification.certify_test_set(toy_config, tmp_path / "run")


def test_sequential_sampling_through_certify_py(toy_config, tmp_path, monkeypatch):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  toy_config.certify.update(n=2000, skip=1, name="fixed")
  fixed = results.read_results(certification.certify_test_set(toy_config, tmp_path / "run"))
  assert np.all(fixed["samples"] == 2000)
  toy_config.certify.update(sampling="sequential", radii=(0.1, 0.2), name="decision", instances=1)
  with monkeypatch.context() as m:  # killed after the first block of rows was written
    stop_after(results.ResultsWriter, "write", 2, m)
    with pytest.raises(Killed):
      certification.certify_test_set(toy_config, tmp_path / "run")
  path = certification.certify_test_set(toy_config, tmp_path / "run")
  decision = results.read_results(path)
  np.testing.assert_array_equal(decision["idx"], fixed["idx"])
  assert set(decision["radius"]) <= {0.0, 0.1, 0.2}
  assert np.all(decision["samples"] <= 2000) and decision["samples"].sum() < 0.5 * 24 * 2000
  meta = results.read_metadata(path)
  assert meta["sampling"] == "sequential"
  assert meta["sequential"] == {"mode": "decision", "radii": [0.1, 0.2],
                                "test": "mixture_likelihood_ratio", "tolerance_alpha": 0.05,
                                "n_max": 2000}
  # Resumed rows equal a straight run's.
  toy_config.certify.name = "decision_straight"
  straight = certification.certify_test_set(toy_config, tmp_path / "run")
  assert rows_without_time(straight) == rows_without_time(path)
  # SIGTERM while a block is certified: its rows are written, then the run stops cleanly.
  toy_config.certify.name = "sigterm"
  original = results.ResultsWriter.write
  def write_then_sigterm(self, rows):
    os.kill(os.getpid(), signal.SIGTERM)
    original(self, rows)
  with monkeypatch.context() as m:
    m.setattr(results.ResultsWriter, "write", write_then_sigterm)
    with pytest.raises(checkpoints.Interrupted, match="stopped after 2 of 24 images"):
      certification.certify_test_set(toy_config, tmp_path / "run")
  certification.certify_test_set(toy_config, tmp_path / "run")
  assert rows_without_time(tmp_path / "run" / "certify" / "sigterm.tsv") == rows_without_time(path)
  # Instance σ: search, then sequential CERTIFY at the searched σ (radius mode).
  toy_config.certify.update(radii=(), sigma_mode="instance", certificate="per_sigma", name="")
  toy_config.certify.search.update(sigma_min=0.1, sigma_max=1.0, starts=2, steps=3,
                                   samples_per_step=16)
  path = certification.certify_test_set(toy_config, tmp_path / "run")
  table = results.read_results(path)
  assert len(table["idx"]) == 24 and np.all(table["samples"] <= 2000)
  assert results.read_metadata(path)["sequential"] == {
      "mode": "radius", "tolerance": 0.05, "bound": "clopper_pearson_alpha_by_samples",
      "looks": "geometric_and_saturation", "tolerance_alpha": 0.05, "n_max": 2000}


def test_sound_instance_certificates_through_certify_py(toy_config, tmp_path, monkeypatch):
  toy_config.train.epochs = 1
  toy_config.estimator.update(epochs=1, label_samples=4)
  toy_config.certify.sigma_mode = "instance"
  toy_config.certify.search.update(sigma_min=0.1, sigma_max=1.0, starts=2, steps=3,
                                   samples_per_step=16)
  toy_config.certify.certificate = "memory"
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir in (straight, resumed):
    loop.train_and_evaluate(toy_config, workdir)
  path = certification.certify_test_set(toy_config, straight)
  assert path.name == "instance_0.1-1_memory.tsv"
  assert list(path.with_suffix(".memory").glob("part_*.npz"))
  with monkeypatch.context() as m:  # killed after the memory of batch 2 was saved
    stop_after(results.ResultsWriter, "write", 2, m)
    with pytest.raises(Killed):
      certification.certify_test_set(toy_config, resumed)
  certification.certify_test_set(toy_config, resumed)
  assert rows_without_time(certification.output_path(toy_config, resumed)) == \
      rows_without_time(path)
  table = results.read_results(path)
  assert certificates.intersecting_pairs(
      data.load_dataset(toy_config.dataset).test.take(table["idx"])["image"], table["predict"],
      table["radius"]) == 0
  assert results.read_metadata(path)["certificate"] == "memory"

  toy_config.certify.certificate = "locally_constant"  # the default; needs the estimator
  toy_config.certify.estimator.n = 64
  path = certification.certify_test_set(toy_config, straight)
  assert path.name == "locally_constant.tsv"
  table = results.read_results(path)
  assert set(table["sigma"]) <= {np.float32(g) for g in (0.25, 0.5, 1.0)}
  meta = results.read_metadata(path)
  assert meta["certificate"] == "locally_constant" and meta["sound"]
  assert meta["estimator"]["n"] == 64 and meta["estimator"]["sigma"] == 1.0
  assert meta["alpha_split"] == {"alpha_class": 0.0005, "beta_estimator": 0.0005, "total": 0.001}
  assert (straight / "estimator" / "estimator.json").exists()
  with pytest.raises(FileNotFoundError, match="no σ-estimator"):
    toy_config.estimator.epochs = 0
    loop.train_and_evaluate(toy_config, tmp_path / "no_estimator")
    certification.certify_test_set(toy_config, tmp_path / "no_estimator")
  toy_config.certify.certificate = "typo"
  with pytest.raises(ValueError, match="certify.certificate must be one of"):
    certification.certify_test_set(toy_config, straight)


def test_hosts_split_the_test_set_and_merge_one_tsv(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  single = certification.certify_test_set(toy_config, tmp_path / "run")
  expected = rows_without_time(single)
  toy_config.certify.name = "two_hosts"
  for host in (1, 0):  # host 0 merges, after every host has written its part
    merged = certification.certify_test_set(toy_config, tmp_path / "run", host=host, hosts=2)
  parts = sorted(merged.parent.glob("two_hosts.host*of2.tsv"))
  assert [len(results.read_results(p)["idx"]) for p in parts] == [6, 6]
  assert rows_without_time(merged) == expected
  assert results.read_metadata(merged)["certificate"] == "fixed_sigma"


def event_tags(directory) -> dict:
  """{tag: [steps]} of the TensorBoard event files in `directory` (TFRecord framing, Event
  protos from tensorboardX)."""
  from tensorboardX.proto import event_pb2
  tags = {}
  for path in sorted(Path(directory).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset: offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def test_sigterm_in_stage_2_checkpoints_the_step_and_resumes_bit_identically(toy_config, tmp_path,
                                                                           monkeypatch):
  toy_config.train.update(insta=True, stage1_epochs=1, epochs=3, checkpoint_every_steps=2)
  straight = loop.train_and_evaluate(toy_config, tmp_path / "straight")
  # TensorBoard events: every epoch's metrics and the σ-table histogram.
  events = event_tags(tmp_path / "straight" / "tensorboard" / "train")
  assert events["train_loss"] == events["sigma_table"] == [1, 2, 3]
  original, calls = steps.train_step, [0]

  def step_then_sigterm(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 5:  # epoch 2 (stage 2), batch 2: the signal arrives during the step
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(steps, "train_step", step_then_sigterm)
    with pytest.raises(checkpoints.Interrupted, match=r"stopped at step 5 \(epoch 2, batch 2 of 3\)"):
      loop.train_and_evaluate(toy_config, tmp_path / "resumed")
  interim = checkpoints.manager(tmp_path / "resumed" / INTERIM_DIR)
  assert interim.latest_step() == 5  # nothing lost: the step the signal interrupted is saved
  assert checkpoints.manager(tmp_path / "resumed").latest_step() == 1
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
  resumed = loop.train_and_evaluate(toy_config, tmp_path / "resumed")
  for a, b in zip(jax.tree_util.tree_leaves(straight.params), jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(straight.sigma_table, resumed.sigma_table)
  np.testing.assert_array_equal(straight.sigma_profile, resumed.sigma_profile)
  assert int(resumed.step) == 9


def test_a_full_disk_gives_one_error_and_keeps_what_was_written(toy_config, tmp_path,
                                                                 monkeypatch):
  full = OSError(errno.ENOSPC, "No space left on device")
  original_save = ocp.CheckpointManager.save

  def save_until_full(self, step, *args, **kwargs):
    if step == 2:
      raise full
    return original_save(self, step, *args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "save", save_until_full)
    with pytest.raises(ValueError, match=r"cannot write checkpoint 2 to .*: No space left on "
                                         r"device \(errno 28\); what was written before is intact"):
      loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert checkpoints.manager(tmp_path / "run").latest_step() == 1
  ij.load_train_state(tmp_path / "run")  # the checkpoint before restores
  loop.train_and_evaluate(toy_config, tmp_path / "run")  # and the rerun finishes

  fsyncs, original_fsync = [0], os.fsync
  def fsync_until_full(fd):
    fsyncs[0] += 1
    if fsyncs[0] == 2:
      raise full
    return original_fsync(fd)
  with monkeypatch.context() as m:
    m.setattr(results.os, "fsync", fsync_until_full)
    with pytest.raises(ValueError, match=r"cannot write .*sigma_0.25.tsv: No space left"):
      certification.certify_test_set(toy_config, tmp_path / "run")
  assert len(results.read_results(certification.output_path(toy_config, tmp_path / "run"))["idx"]) >= 4
  path = certification.certify_test_set(toy_config, tmp_path / "run")
  assert sorted(results.read_results(path)["idx"]) == list(range(0, 24, 2))


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
  assert checkpoints.manager(tmp_path / "chance").latest_step() == 1
  toy_config.train.divergence.chance_steps = 0  # switched off: the same run trains to the end
  loop.train_and_evaluate(toy_config, tmp_path / "off")
  assert checkpoints.manager(tmp_path / "off").latest_step() == 3


def test_training_refuses_a_workdir_with_another_config(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  toy_config.train.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config \(train\.learning_rate\)"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")


def test_a_run_saved_before_later_keys_existed_still_resumes(toy_config, tmp_path):
  toy_config.train.epochs = 1
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  saved_path = tmp_path / "run" / CONFIG_FILE
  saved = json.loads(saved_path.read_text())
  for key in ("image_size", "corrupt_images"):
    del saved[key]
  del saved["train"]["checkpoint_every_steps"], saved["train"]["divergence"]
  saved_path.write_text(json.dumps(saved))
  toy_config.train.epochs = 2
  with pytest.raises(ValueError, match=r"different config \(train\.epochs\)"):
    loop.train_and_evaluate(toy_config, tmp_path / "run")
  saved["train"]["epochs"] = 2
  saved_path.write_text(json.dumps(saved))
  loop.train_and_evaluate(toy_config, tmp_path / "run")
  assert checkpoints.manager(tmp_path / "run").latest_step() == 2


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


@pytest.mark.parametrize("key, value, message", [
    ("sigma", -0.5, "certify.sigma"), ("n", 0, "certify.n must"), ("n0", 0, "certify.n0"),
    ("alpha", 1.5, "certify.alpha"), ("skip", 0, "certify.skip"),
    ("sampling", "adaptive", "certify.sampling must be one of"),
])
def test_bad_certify_config(toy_config, tmp_path, key, value, message):
  toy_config.certify[key] = value
  with pytest.raises(ValueError, match=message):
    certification.certify_test_set(toy_config, tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(tolerance=1.5), "certify.tolerance must lie in"),
    (dict(radii=(0.5, 0.25)), "certify.radii must be sorted"),
    (dict(n=10, n0=100), "certify.n must be >= n0 with sequential"),
])
def test_bad_sequential_config(toy_config, tmp_path, changes, message):
  toy_config.certify.update(sampling="sequential", **changes)
  with pytest.raises(ValueError, match=message):
    certification.certify_test_set(toy_config, tmp_path)


def run_cli(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=300)


def test_end_to_end_command_line(tmp_path):
  """The one slow test: train.py then certify.py in subprocesses, as a user runs them."""
  npz = write_npz(tmp_path / "toy.npz", n_train=64, n_test=16)
  common = [f"--config={ROOT / 'configs' / 'fashion_mnist.py'}", f"--workdir={tmp_path / 'run'}",
            f"--config.dataset=npz:{npz}", "--config.train.epochs=1", "--config.train.batch_size=32",
            "--config.certify.n=100", "--config.certify.skip=1", "--config.certify.instances=8",
            "--config.train.stage1_epochs=0"]
  done = run_cli(ROOT / "train.py", *common, cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "run" / "config.json").exists()
  assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["epoch"] == 0
  # Two certify.py on one results file at once: one writes it, the other stops at the lock.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  pair = [subprocess.Popen([sys.executable, str(ROOT / "certify.py"), *common,
                            "--config.certify.n=2000"], cwd=tmp_path, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in pair]
  codes = sorted(p.returncode for p in pair)
  assert codes == [0, 2], [o[1][-2000:] for o in outputs]
  done_out, _ = outputs[[p.returncode for p in pair].index(0)]
  _, refused = outputs[[p.returncode for p in pair].index(2)]
  assert "| r = 0.25 |" in done_out and "| fixed_sigma |" in done_out
  assert refused.count("\n") == 1 and "is in use by pid" in refused
  table = results.read_results(tmp_path / "run" / "certify" / "sigma_0.25.tsv")
  assert sorted(table["idx"]) == list(range(16)) and set(table["sigma"]) == {0.25}

  bad = run_cli(ROOT / "train.py", *common, "--config.train.epoch=2", cwd=tmp_path)
  assert bad.returncode == 2 and "unknown config key 'epoch'" in bad.stderr
  assert "Traceback" not in bad.stderr
  missing = run_cli(ROOT / "certify.py", *common[:1], f"--workdir={tmp_path / 'none'}", cwd=tmp_path)
  assert missing.returncode == 2 and "no training run" in missing.stderr

  # The sound instance-wise certificate, with the estimator train.py trained (fashion_mnist.py
  # has estimator.epochs = 2), headlines instance mode.
  done = run_cli(ROOT / "certify.py", *common, "--config.certify.sigma_mode=instance", cwd=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| locally_constant |" in done.stdout and "UNSOUND" not in done.stdout
  # A run written before the σ table had a grid profile: one line, exit 2, nothing written.
  old = tmp_path / "old"
  (old / "checkpoints").mkdir(parents=True)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  del saved["train"]["table"]["grid"]
  (old / "config.json").write_text(json.dumps(saved))
  stale = run_cli(ROOT / "certify.py", *common[:1], f"--workdir={old}", cwd=tmp_path)
  assert stale.returncode == 2 and "older instars_jax" in stale.stderr
  assert "Traceback" not in stale.stderr and not (old / "certify").exists()
  # A damaged checkpoint: one line naming it, exit 2, not tensorstore's kilobytes.
  damaged = tmp_path / "damaged"
  shutil.copytree(tmp_path / "run", damaged, ignore=shutil.ignore_patterns("certify"))
  for chunk in (damaged / "checkpoints").glob("*/default/ocdbt.process_0/d/*"):
    chunk.write_bytes(b"\0" * 100)
  broken = run_cli(ROOT / "certify.py", *common[:1], f"--workdir={damaged}", cwd=tmp_path)
  assert broken.returncode == 2 and broken.stderr.count("\n") == 1
  assert "is corrupt or incomplete" in broken.stderr and not (damaged / "certify").exists()
