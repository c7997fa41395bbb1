"""bench/accelerator.py's CPU path at tiny sizes, and the multiply-adds its TFLOP/s rest on."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


@pytest.mark.parametrize("name, published", [("resnet20", 40.8e6), ("resnet110", 253e6),
                                             ("resnet50", 4.1e9)])
def test_multiply_adds_match_the_published_counts(name, published):
  assert common.multiply_adds(name) == pytest.approx(published, rel=0.01)


def test_the_script_runs_at_tiny_sizes_and_prints_its_figures(capsys):
  pytest.importorskip("torch")
  import accelerator
  accelerator.main(["--tiny"])
  report = json.loads(capsys.readouterr().out)
  for dtype in ("float32", "bfloat16"):
    assert report["certify"][dtype]["seconds_per_image"] > 0
    assert report["certify"][dtype]["tflops"] > 0
    assert report["speedup_over_torch"][dtype] > 0
  assert report["imagenet"]["seconds_per_image_at_100000"] > 0
  assert report["best_settings"]["lenet"]["batch"] == 32
