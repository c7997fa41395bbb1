"""The training-recipe comparison of docs/results.md in one command: every training loss at every
σ of the grid (Cohen et al.'s fixed-σ models), and Insta-RS Train on the Gaussian and the
consistency loss with each of its certificates, trained and certified through train.py and
certify.py, many processes at a time; then the table (instars_jax.analyze).

    python bench/losses_table.py --runs runs/losses [--parallel 16] [--deadline 600]
        [--losses gaussian,consistency,...] [--insta gaussian,consistency] [-- extra flags]

Per workdir the trainings run in order, then its certifications run side by side. A command
that would start after --deadline seconds is skipped and named in the summary, and at
--stop-at seconds the running ones are stopped by SIGTERM (a device lease is short); rerunning
the same command resumes (train.py and certify.py both do).
Recipe: configs/fashion_mnist.py (8 epochs) for every row; 500 test images (every 20th),
n = 10,000, α = 0.001. Each loss trains at its published MNIST settings at the row's σ (its
module's preset, train.<loss>.preset=mnist: consistency's λ = 10 at σ = 0.25, MACER's λ = 6 at
σ = 1.0, ...) and the references' batching (losses/__init__.py), with the published schedules
scaled to 8 of their 90 epochs: MACER's deferral 30 → 3 epochs, SmoothAdv's ε warm-up 10 → 1.
"""

import argparse
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from instars_jax import certification  # noqa: E402

GRID = (0.25, 0.5, 1.0)
LOSSES = ("gaussian", "consistency", "stability", "macer", "smoothadv")
CERTIFY = ["--config.certify.n=10000", "--config.certify.skip=20"]


def loss_flags(loss: str) -> list:
  flags = [f"--config.train.loss={loss}"]
  flags += [f"--config.train.{loss}.preset=mnist"] * (loss != "gaussian")  # it has no settings
  flags += ["--config.train.macer.deferred_epochs=3"] * (loss == "macer")
  flags += ["--config.train.smoothadv.warmup=1"] * (loss == "smoothadv")
  return flags


def jobs(args) -> list:
  """(workdir, training commands, certification commands) of every row."""
  def train(workdir, *flags):
    return [sys.executable, "train.py", f"--config={args.config}", f"--workdir={workdir}",
            *flags, *args.extra]

  def certify(workdir, *flags):  # the run's settings from its workdir (σ: its train.sigma)
    owned = [f for f in args.extra if certification.owns(f.split("=")[0][len("--config."):])]
    return [sys.executable, "certify.py", f"--workdir={workdir}", *CERTIFY, *flags, *owned]

  out = []
  for loss in args.losses:
    for sigma in args.sigmas:
      workdir = Path(args.runs) / f"{loss}_{sigma}"
      flags = ["--config.train.insta=False", f"--config.train.sigma={sigma}",
               "--config.train.estimator.epochs=0", *loss_flags(loss)]
      out.append((workdir, [train(workdir, *flags)], [certify(workdir)]))
  instance = ["--config.certify.sigma_mode=instance"]
  for loss in args.insta:
    workdir = Path(args.runs) / f"insta_{loss}"
    flags = loss_flags(loss)
    out.append((workdir,
                [train(workdir, *flags),
                 train(workdir, *flags, "--config.train.estimator.router=True")],
                [certify(workdir, "--config.certify.sigma_mode=grid")]  # sigma_<σ>.tsv each
                + [certify(workdir, *instance, f"--config.certify.certificate={kind}")
                   for kind in ("locally_constant", "cascade", "per_sigma", "router")]))
  return out


class Runner:
  """Runs commands from ROOT, each logged to runs/logs/; none starts after `deadline` seconds,
  and `stop()` sends SIGTERM to those running (train.py checkpoints, certify.py keeps its
  rows: a rerun resumes them)."""

  def __init__(self, runs: Path, deadline: float):
    self.logs, self.deadline, self.began = runs / "logs", deadline, time.time()
    self.logs.mkdir(parents=True, exist_ok=True)
    self.record, self.running, self.lock = [], set(), threading.Lock()

  def __call__(self, cmd) -> bool:
    workdir = next(a for a in cmd if a.startswith("--workdir="))
    name = f"{Path(workdir).name}_{Path(cmd[1]).stem}_{len(self.record)}"
    with self.lock:
      if time.time() - self.began > self.deadline:
        self.record.append({"command": " ".join(cmd[1:]), "status": "skipped (deadline)"})
        return False
      started = time.time()
      log = open(self.logs / f"{name}.log", "w")
      process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      self.running.add(process)
    status = process.wait()
    log.close()
    with self.lock:
      self.running.discard(process)
      self.record.append({"command": " ".join(cmd[1:]), "status": status,
                          "seconds": round(time.time() - started, 1)})
    print(f"[{time.time() - self.began:6.0f} s] {status} {name}", flush=True)
    return status == 0

  def stop(self):
    with self.lock:
      self.deadline = -1.0
      for process in self.running:
        process.send_signal(signal.SIGTERM)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="runs/losses")
  parser.add_argument("--config", default="configs/fashion_mnist.py")
  parser.add_argument("--parallel", type=int, default=2)
  parser.add_argument("--deadline", type=float, default=float("inf"),
                      help="seconds after which no command starts")
  parser.add_argument("--stop-at", type=float, default=None,
                      help="seconds after which the running commands get SIGTERM")
  parser.add_argument("--losses", type=lambda s: s.split(",") if s else [], default=list(LOSSES))
  parser.add_argument("--sigmas", type=lambda s: [float(v) for v in s.split(",")],
                      default=list(GRID))
  parser.add_argument("--insta", type=lambda s: s.split(",") if s else [],
                      default=["gaussian", "consistency"])
  parser.add_argument("extra", nargs="*", help="flags added to every train.py, and those "
                      "certification owns (certify.*, input.*, data_dir, ...) to certify.py")
  args = parser.parse_args()
  runs = Path(args.runs)
  run = Runner(runs, args.deadline)
  watchdog = threading.Timer(args.stop_at if args.stop_at is not None else float("inf"), run.stop)
  watchdog.daemon = True
  if args.stop_at is not None:
    watchdog.start()
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str((runs / ".jax_cache").resolve()))
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # many processes, one GPU

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    def train_then_certify(trainings, certifications):
      if all(run(cmd) for cmd in trainings):
        return [pool.submit(run, cmd) for cmd in certifications]
      return []
    trained = [pool.submit(train_then_certify, t, c) for _, t, c in jobs(args)]
    concurrent.futures.wait([f for t in trained for f in t.result()])

  files = sorted(str(p) for p in runs.glob("*/certify/*.tsv"))
  oracle = {loss: sorted(str(p) for p in (runs / f"insta_{loss}" / "certify").glob("sigma_*.tsv"))
            for loss in args.insta}
  tables = {}
  runs_oracle = [(f"oracle_{k}", ["--oracle", *v]) for k, v in oracle.items() if v]
  for name, extra in [("all", [])] + runs_oracle:
    tables[name] = subprocess.run(
        [sys.executable, "-m", "instars_jax.analyze", *files, *extra, "--radii",
         "0,0.25,0.5,0.75,1,1.5,2"], cwd=ROOT, capture_output=True, text=True).stdout
  (runs / "summary.json").write_text(json.dumps({"commands": run.record, "tables": tables},
                                                indent=1))
  for name, table in tables.items():
    print(f"== {name}\n{table}")


if __name__ == "__main__":
  main()
