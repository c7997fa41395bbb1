"""Results do not depend on the device or host count: the sampler and the search on 1 and 2
(fake CPU) devices, and (slow tier) a training run on 1 device and on 4 across 2 processes
joined by jax.distributed, where a SIGTERM to one host stops both at the same step.

The one-device side runs in the test's own process; the other side is one pair of
subprocesses.
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


def start_two_processes(script: str, *args, devices: int = 2) -> list:
  """Two processes of tests/<script> joined by jax.distributed on this machine (gloo), each
  with `devices` fake CPU devices."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_NUM_PROCESSES="2",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  command = [sys.executable, str(HERE / script), *map(str, args)]
  return [subprocess.Popen(command, env=dict(env, JAX_PROCESS_ID=str(k)), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in (0, 1)]


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
  certification (one merged TSV) give the one-device run. Then, in a long run, SIGTERM to
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
