"""Results are bit-identical on 1, 2, 3 and 8 (fake CPU) devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_on_devices(script: Path, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                        timeout=300)
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
