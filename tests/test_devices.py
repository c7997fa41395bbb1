"""Results are bit-identical on 1, 2, 3 and 8 (fake CPU) devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(script: Path, devices: int, *args) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("script", ["device_probe.py"])
def test_results_identical_across_device_counts(script):
  outputs = {n: run_on_devices(Path(__file__).parent / script, n) for n in (1, 2, 3, 8)}
  for n, out in outputs.items():
    assert out.pop("devices") == n
  reference = outputs[1]
  assert sum(map(sum, reference["counts"])) == 11 * 500
  for n in (2, 3, 8):
    assert outputs[n] == reference, f"results on {n} devices differ from 1 device"


def test_training_and_certification_agree_on_1_and_8_devices(tmp_path):
  """Data-parallel training (gradients averaged over the global batch) gives the parameters
  of one device to float tolerance; the σ table and the certification rows are identical."""
  one = run_on_devices(Path(__file__).parent / "train_probe.py", 1, tmp_path / "one")
  eight = run_on_devices(Path(__file__).parent / "train_probe.py", 8, tmp_path / "eight")
  assert (one["devices"], eight["devices"]) == (1, 8)
  for a, b in zip(one["params"], eight["params"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one["sigma_table"], eight["sigma_table"], rtol=1e-6)
  assert one["rows"]["idx"] == eight["rows"]["idx"]
  assert one["rows"]["predict"] == eight["rows"]["predict"]
  np.testing.assert_allclose(one["rows"]["radius"], eight["rows"]["radius"], rtol=1e-4)
