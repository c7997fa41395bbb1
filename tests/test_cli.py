"""train.py and certify.py as a user runs them, in subprocesses: a run end to end, two writers
on one workdir, one line and exit status 2 for every kind of bad input, 143 after SIGTERM."""

import json
import shutil
import signal
import subprocess
import time

from pathlib import Path

import pytest

from helpers import ROOT, run_cli, start_cli, write_npz, write_tree
from instars_jax import certificates
from instars_jax.storage.workdir import Workdir

CONFIG = f"--config={ROOT / 'configs' / 'fashion_mnist.py'}"


def toy_flags(tmp_path, workdir):
  npz = write_npz(tmp_path / "toy.npz", n_train=64, n_test=16)
  return [CONFIG, f"--workdir={workdir}", f"--config.dataset=npz:{npz}",
          "--config.train.batch_size=32",
          "--config.train.stage1_epochs=0", "--config.train.estimator.epochs=1",
          "--config.train.estimator.label_samples=2", "--config.certify.n=100",
          "--config.certify.skip=1", "--config.certify.instances=8"]


def one_line_error(done, expected: str) -> None:
  """Exit status 2 and a single line on stderr that contains `expected`, no traceback."""
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
  assert expected in done.stderr, done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One toy run that train.py trained (with its σ-estimator): stopped once by a SIGTERM once
  it had written a mid-epoch checkpoint, then resumed by the same command. Returns its flags,
  its workdir and what the stopped train.py ended with."""
  root = tmp_path_factory.mktemp("cli")
  common = toy_flags(root, root / "run") + ["--config.train.epochs=3",
                                           "--config.train.checkpoint_every_steps=1"]
  trainer = start_cli("train.py", *common, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  saved = root / "run" / "checkpoints"
  deadline = time.monotonic() + 240
  while trainer.poll() is None and time.monotonic() < deadline:
    if saved.exists() and any(p.name.isdigit() for p in saved.iterdir()):
      trainer.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  _, stopped = trainer.communicate(timeout=120)
  done = run_cli("train.py", *common)
  assert done.returncode == 0, done.stderr[-2000:]
  return common, root / "run", (trainer.returncode, stopped)


def test_sigterm_stops_train_py_at_a_checkpointed_step_with_status_143(trained):
  _, workdir, (code, stderr) = trained
  assert code == 128 + signal.SIGTERM, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("stopped at step ") and "rerun the same command to resume" in last
  step = int(last.split()[3])
  assert 1 <= step < 6  # three epochs of two steps: the stop came before the end
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["epoch"] for row in metrics] == [0, 1, 2]  # the rerun finished the run
  resumed = [row.get("resumed_at_batch") for row in metrics]
  assert resumed[step // 2] == (step % 2 or None)  # mid-epoch: the rerun skipped what was done


@pytest.mark.slow
def test_train_then_certify_and_one_writer_per_results_file(trained):
  common, workdir, _ = trained
  assert (workdir / "estimator" / "estimator.json").exists()
  # Two certify.py on one results file at once: one writes it, the other stops at the lock.
  pair = [start_cli("certify.py", *common, "--config.certify.n=500", stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE) for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in pair]
  codes = [p.returncode for p in pair]
  assert sorted(codes) == [0, 2], [err[-2000:] for _, err in outputs]
  written, refused = outputs[codes.index(0)][0], outputs[codes.index(2)][1]
  assert "| r = 0.25 |" in written and "| fixed_sigma |" in written
  assert refused.count("\n") == 1 and "is in use by pid" in refused
  # The sound instance-wise certificate, with the estimator train.py trained, headlines
  # instance mode.
  done = run_cli("certify.py", *common, "--config.certify.sigma_mode=instance")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| locally_constant |" in done.stdout and "UNSOUND" not in done.stdout


def test_certify_py_reads_the_run_from_its_workdir_alone(trained):
  # No --config: the run's saved settings (its dataset, grid and estimator, certify.n = 100
  # from its training command) certify it; the command line may change certify.* only.
  _, workdir, _ = trained
  done = run_cli("certify.py", f"--workdir={workdir}", "--config.certify.sigma_mode=instance",
                 "--config.certify.max=8", "--config.certify.name=eight")  # its own file
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| locally_constant |" in done.stdout
  meta = json.loads((workdir / "certify" / "eight.json").read_text())
  assert meta["n"] == 100 and meta["max"] == 8
  assert meta["checkpoint"] == 6 and meta["estimator"]["step"] >= 1


@pytest.mark.slow
def test_certify_py_takes_an_outside_kind_s_section_after_configs_default(trained):
  # The kind's section is named after configs/default.py, which then gives only the flags'
  # types: the run's settings still come from its workdir.
  _, workdir, _ = trained
  package = workdir.parent / "outside" / "my_pkg"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  source = (Path(certificates.__file__).parent / "fixed_sigma.py").read_text()
  (package / "fixed_deep.py").write_text(
      source + '\nFAMILY = "instars_jax.certificates"\nDEFAULTS = {"depth": 1}\n')
  done = run_cli("certify.py", f"--workdir={workdir}",
                 "--config=configs/default.py:my_pkg.fixed_deep",
                 "--config.certify.sigma_mode=instance", "--config.certify.max=2",
                 "--config.certify.certificate=my_pkg.fixed_deep",
                 "--config.certify.fixed_deep.depth=3", "--config.certify.name=deep",
                 path=[workdir.parent / "outside"])
  assert done.returncode == 0, done.stderr[-2000:]
  meta = json.loads((workdir / "certify" / "deep.json").read_text())
  assert meta["certificate"] == "fixed_deep" and meta["n"] == 100 and meta["max"] == 2


# Cases whose failure comes from one mechanism each (config keys, a command line against the
# saved run, a library ValueError, a damaged run, a busy workdir): `make test` runs these; the
# rest, the same mechanisms on other inputs and flag parsing, run in the slow tier.
QUICK = ("unknown config key 'epoch'", "--config.train.sigma is a setting of the trained run",
         "certify.alpha must lie in (0, 1)", "is corrupt or incomplete", "the training run in")


def bad_input_cases(common, workdir, tmp_path) -> dict:
  """{expected line: (script, flags...)} for every kind of bad input."""
  stale = tmp_path / "stale"
  (stale / "checkpoints").mkdir(parents=True)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["train"]["table"]["grid"]
  (stale / "config.json").write_text(json.dumps(saved))
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged, ignore=shutil.ignore_patterns("certify", "*.lock"))
  for chunk in (damaged / "checkpoints").glob("*/default/ocdbt.process_0/d/*"):
    chunk.write_bytes(b"\0" * 100)
  write_tree(tmp_path / "tree", suffix=".jpg")
  bad_image = tmp_path / "tree" / "train" / "emu" / "0001.jpg"
  bad_image.write_bytes(b"not a jpeg at all")
  return {
      "unknown config key 'epoch'": ("train.py", *common, "--config.train.epoch=2"),
      "invalid literal for int() with base 10: 'two'": ("train.py", *common,
                                                        "--config.train.epochs=two"),
      "unexpected arguments: extra": ("certify.py", *common, "extra"),
      "--config is required": ("train.py", f"--workdir={tmp_path / 'none'}"),
      "--config.train.sigma is a setting of the trained run": (
          "certify.py", f"--workdir={workdir}", "--config.train.sigma=0.5"),
      "seed=1 (the run: 0)": ("certify.py", *common, "--config.seed=1"),
      "Flag --workdir must have a value other than None": ("train.py", CONFIG),
      "certify.alpha must lie in (0, 1)": ("certify.py", *common, "--config.certify.alpha=1.5"),
      "no router node in": ("certify.py", *common, "--config.certify.sigma_mode=instance",
                            "--config.certify.certificate=router"),
      "certify.cascade.threshold must lie in (1/2, 1); got 0.4": (
          "certify.py", *common, "--config.certify.sigma_mode=instance",
          "--config.certify.certificate=cascade", "--config.certify.cascade.threshold=0.4"),
      "no training run in": ("certify.py", f"--workdir={tmp_path / 'none'}"),
      "no checkpoint in": ("certify.py", f"--workdir={stale}"),
      "is corrupt or incomplete": ("certify.py", f"--workdir={damaged}"),
      f"corrupt image {bad_image}": ("train.py", "--config=configs/default.py",
                                     f"--workdir={tmp_path / 'images'}",
                                     f"--config.dataset=folder:{tmp_path / 'tree'}",
                                     "--config.train.epochs=1", "--config.train.batch_size=4",
                                     "--config.input.workers=1",
                                     "--config.train.eval_examples=4"),
      "the training run in": ("train.py", *common),
      "train.holdout=1.0 must lie in [0, 1)": ("train.py", *common,
                                               f"--workdir={tmp_path / 'holdout'}",
                                               "--config.train.holdout=1.0"),
      "train.table.grid=(0.5, 1.0) (the run: (0.25, 0.5, 1.0))": (
          "certify.py", *common, "--config.train.table.grid=(0.5,1.0)"),
      "certify.experts names 1 workdirs; train.table.grid=(0.25, 0.5, 1.0)": (
          "certify.py", *common, f"--config.certify.experts={workdir}"),
  }


@pytest.mark.parametrize("quick", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_bad_input_ends_with_one_line_and_exit_status_2(trained, tmp_path, quick):
  """The cases in parallel, each in its own process: flags, config keys and values, missing,
  stale or damaged runs, a second train.py on a busy workdir, a corrupt training image, a
  held-out share of all the training set, σ experts that do not fit the grid."""
  common, workdir, _ = trained
  cases = {expected: args for expected, args in bad_input_cases(common, workdir, tmp_path).items()
           if (expected in QUICK) == quick}
  with Workdir(workdir).training_lock():  # stands for a train.py that is running
    started = {expected: start_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for expected, args in cases.items()}
    finished = {expected: p.communicate(timeout=300) + (p.returncode,)
                for expected, p in started.items()}
  for expected, (out, err, code) in finished.items():
    one_line_error(subprocess.CompletedProcess((), code, out, err), expected)
  assert len(cases) == (len(QUICK) if quick else 13)
  assert not any((tmp_path / name / "certify").exists() for name in ("stale", "damaged"))
