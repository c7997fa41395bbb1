"""Results do not depend on the device or host count: the sampler and the search on 1 and 2
(fake CPU) devices, and (slow tier) a training run on 1 device and on 4 across 2 processes
joined by jax.distributed, where a SIGTERM to one host stops both at the same step.

The one-device side runs in the test's own process; the other side is one pair of
subprocesses.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import device_probe
import train_probe
from helpers import ROOT, write_npz
from instars_jax import parallel
from instars_jax.storage import checkpoints

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  return train_probe.run(tmp_path_factory.mktemp("one"))


def assert_same_run(one: dict, other: dict) -> None:
  """Parameters equal to float tolerance; σ table and certification rows identical."""
  for a, b in zip(one["params"], other["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one["sigma_table"], other["sigma_table"], rtol=1e-6)
  assert len(set(one["sigma_table"])) > 1  # the table moved: the update ran on every device
  assert one["rows"]["idx"] == other["rows"]["idx"]
  assert one["rows"]["predict"] == other["rows"]["predict"]
  np.testing.assert_allclose(one["rows"]["radius"], other["rows"]["radius"], rtol=1e-4)


def start_two_processes(script, *args, devices: int = 2, env=(), stderr=None) -> list:
  """Two processes of tests/<script> (or an absolute path) joined by jax.distributed on this
  machine (gloo), each with `devices` fake CPU devices, more `env`, stdout piped and stderr
  piped or, with `stderr` (a list), written to stderr[k]."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_NUM_PROCESSES="2",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **dict(env))
  command = [sys.executable, str(HERE / script), *map(str, args)]
  return [subprocess.Popen(command, cwd=ROOT, env=dict(env, JAX_PROCESS_ID=str(k)), text=True,
                           stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE if stderr is None else stderr[k])
          for k in (0, 1)]


@contextlib.contextmanager
def killed_at_exit(processes: list):
  """`processes`, each killed (SIGKILL: SIGTERM is JAX's preemption notice) if still running
  when the block ends, as it ends early when an assertion fails."""
  try:
    yield processes
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()


def test_two_devices_give_one_device_s_counts_certificates_and_search():
  """The sampler, CERTIFY (fixed and sequential) and the σ search on two fake CPU devices in
  one process give the numbers of one device (11 instances: one padded). The slow tier's
  two-host test checks this again across jax.distributed, with training."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  done = subprocess.run([sys.executable, str(HERE / "device_probe.py")], env=env, text=True,
                        capture_output=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  two, one = json.loads(done.stdout.strip().splitlines()[-1]), device_probe.results()
  assert (one.pop("devices"), two.pop("devices")) == (1, 2)
  assert sum(map(sum, one["counts"])) == 11 * 500
  assert two == one


@pytest.mark.slow
def test_two_hosts_of_two_devices_give_one_device_s_results_and_stop_together(
    one_device_run, tmp_path):
  """A real multi-controller run: two processes on this machine (gloo collectives), each with
  two devices. On its own two devices, the sampler, CERTIFY (fixed and sequential) and the σ
  search give the one-device numbers (11 instances: one padded). Across the four, data-
  parallel training (each host its shard of every batch, one orbax checkpoint directory) and
  certification (one merged TSV) give the one-device run. A stage's stop check asked of one
  process stops both. Then, in a long run, SIGTERM to
  process 1 only: at JAX's preemption sync point both save the same step and stop."""
  write_npz(tmp_path / "toy.npz", n_train=64, n_test=16)
  processes = start_two_processes("multihost_probe.py", tmp_path)
  lines = (json.loads(line) for line in processes[0].stdout if line.startswith("{"))
  try:
    local, two = next(lines)["sampler"], next(lines)
  except StopIteration:
    raise AssertionError(processes[0].communicate()[1][-3000:]) from None
  one = device_probe.results()
  assert (one.pop("devices"), local.pop("devices")) == (1, 2)
  assert sum(map(sum, one["counts"])) == 11 * 500
  assert local == one
  assert two["devices"] == 4
  assert_same_run(one_device_run, two)
  assert next(lines) == {"stage_stop": "stopped"}  # process 1's stop reached process 0
  assert sorted(p.name for p in (tmp_path / "run" / "certify").glob("*.tsv")) == [
      "sigma_0.25.host0of2.tsv", "sigma_0.25.host1of2.tsv", "sigma_0.25.tsv"]
  metrics = tmp_path / "long" / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120) for p in processes]
  stops = [re.search(r"stopped at step (\d+)", out) for out, _ in outputs]
  assert all(stops), ([p.returncode for p in processes], [err[-1500:] for _, err in outputs])
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step
  assert checkpoints.manager(tmp_path / "long").latest_step() == step


@pytest.mark.slow
def test_a_lost_host_ends_the_other_with_one_line_naming_it_and_the_step_to_resume_from(
    tmp_path):
  """kill -9 of host 1 of a two-host train.py run (one CPU device each, heartbeat timeout 10 s)
  once it has a checkpoint: host 0 exits with status 75 within the heartbeat timeout (+ 10 s)
  and writes one line after the kill, naming host 1 and the run's last checkpoint step, with
  no fatal-error dump. The same command rerun on both hosts resumes at that step (the epoch's
  metrics row says after which batch) and ends the run."""
  heartbeat = 10
  write_npz(tmp_path / "toy.npz", n_train=256, n_test=8)  # 32 steps of 8
  run = tmp_path / "run"
  args = (f"--config={ROOT / 'configs' / 'default.py'}", f"--workdir={run}",
          f"--config.dataset=npz:{tmp_path / 'toy.npz'}", "--config.distributed=True",
          "--config.train.epochs=1", "--config.train.batch_size=8",
          "--config.train.checkpoint_every_steps=1")
  env = {"JAX_HEARTBEAT_TIMEOUT_SECONDS": str(heartbeat)}
  logs = [tmp_path / f"host{k}.err" for k in (0, 1)]
  with (open(logs[0], "w") as err0, open(logs[1], "w") as err1,
        killed_at_exit(start_two_processes(ROOT / "train.py", *args, devices=1, env=env,
                                           stderr=[err0, err1])) as processes):
    deadline = time.monotonic() + 300
    while checkpoints.latest_step_saved(run) is None and time.monotonic() < deadline:
      assert all(p.poll() is None for p in processes), logs[0].read_text()[-3000:]
      time.sleep(0.02)
    processes[1].send_signal(signal.SIGKILL)
    killed, seen = time.monotonic(), logs[0].stat().st_size
    status = processes[0].wait(timeout=heartbeat + 60)
    seconds = time.monotonic() - killed
    assert processes[1].wait() == -signal.SIGKILL
  text = logs[0].read_text()
  assert status == parallel.LOST_HOST_STATUS == 75, text[-3000:]
  assert seconds < heartbeat + 10, seconds
  assert "Traceback" not in text and "Fatal Python error" not in text, text[-3000:]
  step = checkpoints.latest_step_saved(run)
  assert 0 < step < 32
  assert text[seen:] == (
      f"error: host 1 of 2 was lost (no heartbeat for {heartbeat} s); the run's last checkpoint "
      f"is step {step} in {run}: rerun the same command on every host to resume\n")
  with killed_at_exit(start_two_processes(ROOT / "train.py", *args, devices=1, env=env)) as rerun:
    outputs = [p.communicate(timeout=300) for p in rerun]
  assert [p.returncode for p in rerun] == [0, 0], [err[-2000:] for _, err in outputs]
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [(row["epoch"], row.get("resumed_at_batch")) for row in rows] == [(0, step)]
  assert checkpoints.latest_step_saved(run) == 32


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["1", "0,1"])
def test_a_host_that_fails_alone_ends_the_others_but_a_failure_of_all_ends_each_with_its_own(
    failing, tmp_path):
  """A ValueError on host 1 only, while host 0 waits as if in a collective with it: host 0
  ends within the heartbeat timeout (3 s here, + 10 s) of host 1's exit, with one line naming
  host 1 (status 75), where JAX with recoverability would leave it waiting. The same error on
  both hosts: each exits having printed its own error, and neither names the other."""
  heartbeat = 3
  env = {"JAX_HEARTBEAT_TIMEOUT_SECONDS": str(heartbeat)}
  with killed_at_exit(start_two_processes("failure_probe.py", failing, tmp_path, devices=1,
                                          env=env)) as processes:
    assert processes[1].wait(timeout=120) == 0
    left = time.monotonic()
    status = processes[0].wait(timeout=heartbeat + 60)
    seconds = time.monotonic() - left
    errors = [p.stderr.read() for p in processes]
  last = [err.strip().splitlines()[-1] for err in errors]
  assert last[1] == "error: host 1 failed", errors[1][-2000:]
  assert "Traceback" not in errors[0] + errors[1]
  if failing == "1":
    assert (status, last[0]) == (parallel.LOST_HOST_STATUS, (
        f"error: host 1 of 2 stopped with an error (see its output); the run in {tmp_path} has "
        "no checkpoint yet: rerun the same command on every host to start it again"))
    assert seconds < heartbeat + 10, seconds
  else:
    assert (status, last[0]) == (0, "error: host 0 failed"), errors[0][-2000:]
    assert "host 1 of 2" not in errors[0] and "host 0 of 2" not in errors[1]
