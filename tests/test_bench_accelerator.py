"""bench/accelerator.py's dry run at tiny sizes (every part writes its JSON line), its budget,
the trace summary its profile rests on, and the multiply-adds of the models."""

import gzip
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402
import trace_summary  # noqa: E402

PARTS = ("profile", "ablation_jax", "ablation_noise", "ablation_torch", "recipes",
         "cohen_cifar10")


@pytest.mark.parametrize("name, published", [
    ("resnet20", 40.8e6), pytest.param("resnet110", 253e6, marks=pytest.mark.slow),
    pytest.param("resnet50", 4.1e9, marks=pytest.mark.slow)])
def test_multiply_adds_match_the_published_counts(name, published):
  assert common.multiply_adds(name) == pytest.approx(published, rel=0.01)


def _write_trace(log_dir: Path, events: list) -> None:
  run = log_dir / "plugins" / "profile" / "2026_01_01"
  run.mkdir(parents=True)
  with gzip.open(run / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_the_trace_summary_sums_device_kernels_by_name(tmp_path):
  """A GPU-shaped trace: kernels on the device's streams count; the derived XLA Ops line, the
  host and instant events do not."""
  meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,
                                       "args": {"name": name}}
  kernel = lambda tid, name, dur: {"ph": "X", "pid": 2, "tid": tid, "ts": 0, "dur": dur,
                                   "name": name, "args": {"hlo_op": name + "_op"}}
  _write_trace(tmp_path, [
      meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
      meta(2, 7, "thread_name", "Stream #7(Compute)"), meta(2, 8, "thread_name", "XLA Ops"),
      meta(1, 3, "thread_name", "python"),
      kernel(7, "conv", 300.0), kernel(7, "conv", 300.0), kernel(7, "fusion", 200.0),
      kernel(7, "threefry", 200.0), kernel(8, "conv", 5000.0),
      {"ph": "X", "pid": 1, "tid": 3, "ts": 0, "dur": 9000.0, "name": "python_call"},
      {"ph": "i", "pid": 2, "tid": 7, "ts": 0, "name": "marker"}])
  summary = trace_summary.top_kernels(tmp_path, top=2)
  assert summary["source"] == "device" and summary["distinct_kernels"] == 3
  assert summary["kernel_seconds"] == pytest.approx(1e-3)
  assert [k["name"] for k in summary["top"]] == ["conv", "fusion"]
  assert summary["top"][0] == {"name": "conv", "seconds": pytest.approx(6e-4),
                               "share": pytest.approx(0.6), "calls": 2, "hlo_op": "conv_op"}


def test_the_trace_summary_reads_a_cpu_trace(tmp_path):
  """A real jax.profiler trace on the CPU: no device streams, so the executor's threads."""
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((128, 128))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    f(x).block_until_ready()
  summary = trace_summary.top_kernels(tmp_path)
  assert summary["source"] == "host" and summary["top"]
  assert sum(k["share"] for k in summary["top"]) <= 1 + 1e-9
  assert all(k["name"] != "PjitFunction(<lambda>)" for k in summary["top"])  # Python's thread


def test_parts_past_the_budget_are_skipped_with_their_line(tmp_path, capsys):
  import accelerator
  report = accelerator.Report(tmp_path / "out.jsonl", budget=10.0)
  assert report.part("first", 1, lambda: {"x": 1}) == {"x": 1}
  assert report.part("broken", 1, lambda: 1 / 0) is None
  assert report.part("long", 60, lambda: pytest.fail("started past the budget")) is None
  lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [line["part"] for line in lines] == ["first", "broken", "long"]
  assert lines[0]["result"] == {"x": 1}
  assert lines[1]["error"].startswith("ZeroDivisionError")
  assert lines[2]["skipped"].startswith("needs about 60 s")
  assert capsys.readouterr().out.count("\n") == 3  # and each on stdout as it ends


@pytest.mark.slow
def test_the_dry_run_writes_every_parts_line(tmp_path):
  """The whole script at tiny sizes on the CPU (ResNet-20, eager torch, two recipe rows, one
  epoch of the CIFAR run): every part ends with a result, none with an error or a skip."""
  pytest.importorskip("torch")
  import accelerator
  out = tmp_path / "out.jsonl"
  accelerator.main(["--tiny", "--out", str(out), "--dir", str(tmp_path / "work"),
                    "--budget", "1200"])
  lines = {line["part"]: line for line in map(json.loads, out.read_text().splitlines())}
  assert tuple(lines) == PARTS
  for part, line in lines.items():
    assert "result" in line, (part, line)
  profile = lines["profile"]["result"]
  for graph in ("folded", "unfolded"):
    assert profile[graph]["top"] and profile[graph]["wall_seconds"] > 0
  ablation = lines["ablation_jax"]["result"]
  assert set(ablation["folded_over_unfolded"]) == {"bfloat16", "float32"}
  assert 0 < lines["ablation_noise"]["result"]["predrawn"]["seconds_per_image"]
  assert set(lines["ablation_torch"]["result"]["our_folded_speedup"]) == {"bfloat16", "float32"}
  recipes = lines["recipes"]["result"]
  for loss in ("macer", "smoothadv"):
    assert recipes[loss]["exit"] == 0
    assert all(c["status"] == 0 for c in recipes[loss]["commands"])
  assert lines["cohen_cifar10"]["result"]["certify_exit"] == 0
  assert lines["cohen_cifar10"]["result"]["rows_certified"] == 2
