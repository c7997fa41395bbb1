"""Results do not depend on the device or host count: the sampler and the search on 1 and 3
(fake CPU) devices, a training run on 1 and 4 devices and across 2 processes joined by
jax.distributed, and a SIGTERM to one host stopping both at the same step.

The one-device side runs in the test's own process; each other side is one subprocess.
"""

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
from instars_jax.run import checkpoints, workdir

HERE = Path(__file__).parent


def run_on_devices(script: str, devices: int, *args) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_sampler_and_search_are_identical_on_1_and_3_devices():
  # 11 instances over 3 devices: the last device's share is padded.
  three = run_on_devices("device_probe.py", 3)
  one = device_probe.results()
  assert (one.pop("devices"), three.pop("devices")) == (1, 3)
  assert sum(map(sum, one["counts"])) == 11 * 500
  assert three == one


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


@pytest.mark.xdist_group("one_device_run")
def test_training_and_certification_agree_on_1_and_4_devices(one_device_run, tmp_path):
  """Data-parallel training (gradients averaged over the global batch) gives the parameters
  of one device to float tolerance; the σ table and the certification rows are identical."""
  four = run_on_devices("train_probe.py", 4, tmp_path / "four")
  assert (one_device_run["devices"], four["devices"]) == (1, 4)
  assert_same_run(one_device_run, four)


def start_two_processes(script: str, *args) -> list:
  """Two processes of tests/<script> joined by jax.distributed on this machine (gloo)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_NUM_PROCESSES="2",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, str(HERE / script), *map(str, args)]
  return [subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(k)), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in (0, 1)]


@pytest.mark.xdist_group("one_device_run")
def test_two_processes_joined_by_jax_distributed_match_one(one_device_run, tmp_path):
  """A real multi-controller run: two processes on this machine (gloo collectives), each with
  its own data shard, one orbax checkpoint directory and one merged certification TSV."""
  (tmp_path / "two").mkdir()
  write_npz(tmp_path / "two" / "toy.npz", n_train=64, n_test=16)
  processes = start_two_processes("multihost_probe.py", tmp_path / "two")
  outputs = [p.communicate(timeout=300) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  two = json.loads(outputs[0][0].strip().splitlines()[-1])
  assert two["devices"] == 2
  assert_same_run(one_device_run, two)
  assert sorted(p.name for p in (tmp_path / "two" / "run" / "certify").glob("*.tsv")) == [
      "sigma_0.25.host0of2.tsv", "sigma_0.25.host1of2.tsv", "sigma_0.25.tsv"]


def test_sigterm_to_one_host_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption sync point: SIGTERM to process 1 only; both processes save the same
  step and stop."""
  write_npz(tmp_path / "toy.npz", n_train=64, n_test=16)
  processes = start_two_processes("preempt_probe.py", tmp_path)
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
    time.sleep(0.5)
  processes[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=120) for p in processes]
  stops = [re.search(r"stopped at step (\d+)", out) for out, _ in outputs]
  assert all(stops), ([p.returncode for p in processes], [err[-1500:] for _, err in outputs])
  step = int(stops[0].group(1))
  assert int(stops[1].group(1)) == step
  assert checkpoints.manager(tmp_path / "run" / workdir.INTERIM_DIR).latest_step() == step
