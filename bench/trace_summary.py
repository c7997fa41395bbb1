"""The most expensive kernels of a `jax.profiler` trace: the trace's Chrome-format events
(`plugins/profile/<run>/*.trace.json.gz`, which every trace writes), their durations summed by
name.

On a GPU the kernels are the complete events on the device's stream threads (process
"/device:GPU:k", threads "Stream #…"; the derived "XLA Ops" / "XLA Modules" lines would count
the same time twice). Without device events (the CPU) the XLA executor's host threads stand in,
all but the Python thread, so that a CPU dry run goes through the same summary.

    python bench/trace_summary.py TRACE_DIR [--top 10]
"""

import argparse
import collections
import gzip
import json
from pathlib import Path


def latest_trace(log_dir) -> Path:
  """The trace file of the newest run under `log_dir` (jax.profiler.trace's directory)."""
  files = sorted(Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir}")
  return files[-1]


def kernel_events(trace: dict) -> tuple[str, list]:
  """("device" or "host", the complete events that are kernels) of a Chrome-format trace."""
  events = trace["traceEvents"]
  processes = {e["pid"]: e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
  on_streams = [e for e in complete if processes.get(e["pid"], "").startswith("/device:")
                and threads.get((e["pid"], e["tid"]), "").startswith("Stream")]
  if on_streams:
    return "device", on_streams
  return "host", [e for e in complete if processes.get(e["pid"], "").startswith("/host:")
                  and threads.get((e["pid"], e["tid"])) not in (None, "python")]


def top_kernels(log_dir, top: int = 10) -> dict:
  """The `top` kernels by summed duration: name, seconds, share of all kernels' time, calls,
  and the HLO op a kernel ran for (from the event's args, where the trace names one)."""
  path = latest_trace(log_dir)
  with gzip.open(path, "rt") as f:
    source, events = kernel_events(json.load(f))
  seconds, calls, ops = collections.Counter(), collections.Counter(), {}
  for e in events:
    seconds[e["name"]] += e["dur"] * 1e-6
    calls[e["name"]] += 1
    ops.setdefault(e["name"], e.get("args", {}).get("hlo_op"))
  total = sum(seconds.values())
  return {"trace": str(path), "source": source, "kernel_seconds": total,
          "distinct_kernels": len(seconds),
          "top": [{"name": name, "seconds": s, "share": s / total, "calls": calls[name],
                   "hlo_op": ops[name]} for name, s in seconds.most_common(top)]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("log_dir")
  parser.add_argument("--top", type=int, default=10)
  args = parser.parse_args()
  print(json.dumps(top_kernels(args.log_dir, args.top), indent=1))


if __name__ == "__main__":
  main()
