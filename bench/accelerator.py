"""The GPU figures in one prepared script (`make bench-accelerator`): ≤ 8 minutes on one H100 or
H200, compilation included. A device lease is short and rare, so the parts run in priority
order, each writing its JSON line (stdout, and --out) as soon as it finishes; a part whose
estimated cost no longer fits in --budget is not started, and its line says so.

    python bench/accelerator.py --out accelerator.jsonl     # one GPU
    python bench/accelerator.py --tiny                      # a CPU dry run: same code, tiny sizes
    make bench-accelerator

1. profile: one `sample_counts` call of CIFAR ResNet-110 in bfloat16, BatchNorm folded and
   unfolded, under `jax.profiler.trace`; the ten most expensive kernels with their share of the
   kernel time (trace_summary.py). The traces stay under --dir.
2. ablation: seconds per image at N = 100,000 for folded against unfolded and bfloat16 against
   float32 (`ablation_jax`); the noise's share, the same call with its noise pre-drawn
   (`ablation_noise`, common.predrawn_noise); and Cohen et al.'s loop under torch.compile on
   the same device with BatchNorm folded too (torch.fx's conv-BN fusion in eval mode,
   `ablation_torch`), with our speed-up over it at each dtype.
3. recipes: MACER at σ = 0.25, 0.5, 1.0 and SmoothAdv at σ = 0.25, 0.5 on Fashion-MNIST with
   the recipe table's protocol (bench/losses_table.py: 8 epochs, 500 images, n = 10,000), all
   five side by side; stopped (SIGTERM: they resume) when the budget ends.
4. cohen_cifar10: if time is left, Cohen et al.'s CIFAR-10 ResNet-110 at σ = 0.25
   (configs/cifar10.py, CIFAR-10-JPEG, --cohen-epochs epochs), certified on 500 test images at
   N = 100,000 and compared with their published file; train.py and certify.py resume, so
   carrying --dir into the next lease continues it.
Random weights for 1 and 2 (the time does not depend on them); σ = 0.25.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import instars_jax as ij
from common import device_info, initialised_model, predrawn_noise
from instars_jax.smoothing import sampler
from trace_summary import top_kernels

ROOT = Path(__file__).resolve().parents[1]
# The project's shared files: inside the checkout on a device machine, beside it here.
SHARED = next((p for p in (ROOT / "shared", ROOT.parent / "shared") if p.exists()),
              ROOT.parent / "shared")
RECIPES = {"macer": (0.25, 0.5, 1.0), "smoothadv": (0.25, 0.5)}

# Sizes and the seconds each part is expected to take at them (compilation included), from
# the H200 run of 2026-12-04 (ResNet-110 bf16: 0.61 s per image at N = 100,000, 8 s compile).
SIZES = {
    "gpu": dict(model="resnet110", n=100_000, profile_n=10_000, batch=20_000, instances=10,
                torch_images=2, torch_batch=10_000, torch_compile=True, recipes=RECIPES,
                recipe_flags=("--config.data_dir=/usr/share/datasets/fashion-mnist",),
                cohen_epochs=90, cohen_flags=(), cost=dict(profile=60, ablation_jax=110, ablation_noise=30,
                                          ablation_torch=80, recipes=120, cohen_cifar10=60)),
    "tiny": dict(model="resnet20", n=64, profile_n=64, batch=32, instances=2, torch_images=1,
                 torch_batch=32, torch_compile=False,
                 recipes={loss: sigmas[:1] for loss, sigmas in RECIPES.items()},
                 recipe_flags=("--config.train.epochs=1", "--config.train.stage1_epochs=0",
                               "--config.train.batch_size=32",
                               "--config.certify.n0=8", "--config.certify.n=32",
                               "--config.certify.skip=1", "--config.certify.max=2",
                               "--config.certify.batch=32", "--config.certify.instances=2"),
                 cohen_epochs=1,
                 cohen_flags=("--config.model.name=resnet20", "--config.train.batch_size=16",
                              "--config.train.eval_examples=8", "--config.certify.n0=8",
                              "--config.certify.n=32", "--config.certify.skip=1",
                              "--config.certify.max=2", "--config.certify.batch=32",
                              "--config.certify.instances=2"),
                 cost=dict(profile=1, ablation_jax=1, ablation_noise=1, ablation_torch=1,
                           recipes=1, cohen_cifar10=1)),
}


class Report:
  """Each part's JSON line, written when the part ends: its result, or why it did not run
  (skipped: its estimated cost would pass the budget) or did not finish (error)."""

  def __init__(self, out, budget):
    self.out, self.budget, self.began = out, budget, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.began

  def left(self) -> float:
    return self.budget - self.elapsed()

  def part(self, name, cost, measure):
    """measure(), if `cost` seconds still fit in the budget."""
    if cost > self.left():
      return self.write(name, skipped=f"needs about {cost} s, {self.left():.0f} s left")
    try:
      result = measure()
    except Exception as e:  # noqa: BLE001: the later parts still get the device
      return self.write(name, error=f"{type(e).__name__}: {e}")
    self.write(name, result=result)
    return result

  def write(self, name, **fields):
    line = json.dumps({"part": name, **device_info(), "elapsed_s": round(self.elapsed(), 1),
                       **fields})
    print(line, flush=True)
    if self.out:
      with open(self.out, "a") as f:
        f.write(line + "\n")


def timed(fn) -> float:
  began = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - began


def counts_call(name, dtype, folded, s, n):
  """() -> sample_counts of s["instances"] images at n samples each; compiled on first use."""
  apply_fn, shape, classes = initialised_model(name, dtype, folded)
  x = np.random.default_rng(0).uniform(size=(s["instances"],) + shape).astype(np.float32)
  return lambda: ij.sample_counts(apply_fn, x, 0.25, jax.random.PRNGKey(1), num=n,
                                  batch_size=s["batch"], num_classes=classes)


def jax_rate(name, dtype, folded, s) -> dict:
  """Seconds per image at n = s["n"] after a first call at one pass per image (which
  compiles: the sample count is traced, so both calls share the program)."""
  compile_s = timed(counts_call(name, dtype, folded, s, s["batch"] // s["instances"]))
  seconds = timed(counts_call(name, dtype, folded, s, s["n"])) / s["instances"]
  return {"model": name, "dtype": dtype, "folded": folded, "n": s["n"], "batch": s["batch"],
          "instances_per_call": s["instances"], "seconds_per_image": seconds,
          "noisy_images_per_s": s["n"] / seconds, "first_call_seconds": compile_s}


def profile(s, trace_dir: Path) -> dict:
  """Part 1: both graphs' top kernels in one sample_counts call at profile_n samples."""
  out = {}
  for folded in (False, True):
    call = counts_call(s["model"], "bfloat16", folded, s, s["profile_n"])
    timed(call)  # compiles
    log_dir = trace_dir / ("folded" if folded else "unfolded")
    with jax.profiler.trace(str(log_dir)):
      wall = timed(call)
    out["folded" if folded else "unfolded"] = {"wall_seconds": wall, **top_kernels(log_dir)}
  return {"model": s["model"], "dtype": "bfloat16", "n": s["profile_n"], "batch": s["batch"],
          "instances_per_call": s["instances"], **out}


def ablation_jax(s) -> dict:
  rows = {dtype: {("folded" if f else "unfolded"): jax_rate(s["model"], dtype, f, s)
                  for f in (True, False)} for dtype in ("bfloat16", "float32")}
  ratio = lambda a, b: b["seconds_per_image"] / a["seconds_per_image"]
  return {"rows": rows,
          "folded_over_unfolded": {d: ratio(r["folded"], r["unfolded"]) for d, r in rows.items()},
          "bfloat16_over_float32": ratio(rows["bfloat16"]["folded"], rows["float32"]["folded"])}


def ablation_noise(s) -> dict:
  """The folded bfloat16 call with its noise drawn and pre-drawn (one recompile each)."""
  drawn = jax_rate(s["model"], "bfloat16", True, s)
  shape = initialised_model(s["model"])[1]
  chunk = sampler.samples_per_pass(s["batch"], s["instances"], s["n"])
  with predrawn_noise(s["instances"], chunk, shape):
    predrawn = jax_rate(s["model"], "bfloat16", True, s)
  return {"drawn": drawn, "predrawn": predrawn,
          "noise_share": 1 - predrawn["seconds_per_image"] / drawn["seconds_per_image"]}


def torch_rate(name, dtype, n, images, batch, compile_model) -> dict:
  """Cohen et al.'s loop on the same device (one image's noisy copies per forward pass),
  channels_last, cudnn.benchmark, BatchNorm folded into the convolutions (torch.fx, eval)."""
  import torch
  from torch.fx.experimental import optimization
  from torch_models import MODELS
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  model = optimization.fuse(MODELS[name]().eval()).to(device).to(
      memory_format=torch.channels_last)
  if compile_model:
    torch._dynamo.reset()
    model = torch.compile(model)
  shape = initialised_model(name)[1]
  image = torch.rand((1, shape[-1], *shape[:2]), device=device).contiguous(
      memory_format=torch.channels_last)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def certify_one(num):
    counts = torch.zeros(1000, dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
      for start in range(0, num, batch):
        copies = image.repeat((min(batch, num - start), 1, 1, 1))
        predictions = model(copies + 0.25 * torch.randn_like(copies)).argmax(1)
        counts += torch.bincount(predictions, minlength=1000)
    return counts.cpu()

  began = time.perf_counter()
  certify_one(2 * batch)  # compiles (torch.compile), picks cudnn's algorithms, warms up
  sync()
  warm_up = time.perf_counter() - began
  began = time.perf_counter()
  for _ in range(images):
    certify_one(n)
  seconds = (time.perf_counter() - began) / images
  return {"model": name, "dtype": dtype, "n": n, "images": images, "batch": batch,
          "torch_compile": compile_model, "batch_norm_folded": True,
          "seconds_per_image": seconds, "warm_up_seconds": warm_up,
          "noisy_images_per_s": n / seconds, "torch": torch.__version__}


def ablation_torch(s, ours) -> dict:
  rows = {dtype: torch_rate(s["model"], dtype, s["n"], s["torch_images"], s["torch_batch"],
                            s["torch_compile"]) for dtype in ("bfloat16", "float32")}
  speedup = {d: rows[d]["seconds_per_image"] / ours["rows"][d]["folded"]["seconds_per_image"]
             for d in rows if ours}
  return {"rows": rows, "our_folded_speedup": speedup}


def tiny_dataset(path: Path, shape: tuple) -> str:
  """The dry run's stand-in for a dataset: random uint8 images of `shape`, 10 classes."""
  rng = np.random.default_rng(0)
  np.savez(path, **{f"{xy}_{split}": (rng.integers(0, 256, (n,) + shape, np.uint8) if xy == "x"
                                      else np.arange(n) % 10)
                    for split, n in (("train", 64), ("test", 8)) for xy in "xy"})
  return f"--config.dataset=npz:{path}"


def run_until(commands, seconds, log_dir: Path) -> list:
  """Runs `commands` side by side from ROOT; SIGTERM to those still running after `seconds`
  (train.py checkpoints, certify.py keeps its rows, losses_table.py stops its children).
  Returns each command's exit status (negative: the signal that ended it)."""
  log_dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_PYTHON_CLIENT_PREALLOCATE="false")
  processes = []
  for i, command in enumerate(commands):
    log = open(log_dir / f"{i}.log", "w")
    processes.append((subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env=env), log))
  deadline = time.time() + seconds
  for process, log in processes:
    try:
      process.wait(max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGTERM)
      process.wait()
    log.close()
  return [process.returncode for process, _ in processes]


def recipes(s, work: Path, seconds: float, data_flags) -> dict:
  """Part 3: one losses_table.py per loss (its σ side by side), no command started after
  `seconds` − 60 and the rest stopped at `seconds` − 20."""
  commands = [[sys.executable, "bench/losses_table.py", "--runs", str(work / loss),
               "--losses", loss, "--sigmas", ",".join(map(str, sigmas)), "--insta", "",
               "--parallel", str(len(sigmas)), "--deadline", str(max(0, seconds - 60)),
               "--stop-at", str(max(1, seconds - 20)), "--", *data_flags, *s["recipe_flags"]]
              for loss, sigmas in s["recipes"].items()]
  statuses = run_until(commands, seconds, work / "logs")
  out = {}
  for (loss, sigmas), status in zip(s["recipes"].items(), statuses):
    summary = work / loss / "summary.json"
    out[loss] = {"sigmas": sigmas, "exit": status,
                 **(json.loads(summary.read_text()) if summary.exists() else {})}
  return out


def cohen_cifar10(s, work: Path, seconds: float, cifar: Path, fixtures: Path,
                  data_flags) -> dict:
  """Part 4: train (resuming), then certify (resuming) within `seconds`; the comparison with
  Cohen et al.'s file once all 500 rows are there."""
  flags = ["--config=configs/cifar10.py", f"--workdir={work}", "--config.dataset=cifar10_jpeg",
           f"--config.data_dir={cifar}", "--config.model.dtype=bfloat16",
           "--config.train.insta=False", "--config.train.sigma=0.25",
           "--config.train.estimator.epochs=0", f"--config.train.epochs={s['cohen_epochs']}",
           *data_flags, *s["cohen_flags"]]
  began = time.time()
  (trained,) = run_until([[sys.executable, "train.py", *flags]], seconds, work / "logs_train")
  out = {"epochs": s["cohen_epochs"], "train_exit": trained}
  if trained == 0:
    (certified,) = run_until([[sys.executable, "certify.py", *flags,
                               "--config.certify.sigma=0.25"]],
                             seconds - (time.time() - began), work / "logs_certify")
    out["certify_exit"] = certified
  ours = work / "certify" / "sigma_0.25.tsv"
  theirs = fixtures / "certify/cifar10/resnet110/noise_0.25/test/sigma_0.25"
  if ours.exists():
    out["rows_certified"] = sum(1 for line in ours.read_text().splitlines()
                                if line and line[0].isdigit())
    table = subprocess.run(
        [sys.executable, "-m", "instars_jax.analyze", str(ours), str(theirs), "--radii",
         "0,0.25,0.5,0.75,1"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out["table"] = table.stdout or table.stderr
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="CPU sizes: the same code paths")
  parser.add_argument("--out", help="append each part's JSON line to this file")
  parser.add_argument("--budget", type=float, default=480.0,
                      help="seconds: no part starts whose estimated cost passes them")
  parser.add_argument("--dir", default=None,
                      help="traces and runs (default: a new temporary directory)")
  parser.add_argument("--cifar", default=str(SHARED / "data" / "cifar10-jpeg-q75.tar.xz"))
  parser.add_argument("--cohen-fixtures", default=str(SHARED / "fixtures" / "cohen2019"))
  args = parser.parse_args(argv)
  s = SIZES["tiny" if args.tiny else "gpu"]
  work = Path(args.dir or tempfile.mkdtemp(prefix="accelerator_")).resolve()
  work.mkdir(parents=True, exist_ok=True)
  report, cost = Report(args.out, args.budget), s["cost"]

  report.part("profile", cost["profile"], lambda: profile(s, work / "traces"))
  ours = report.part("ablation_jax", cost["ablation_jax"], lambda: ablation_jax(s))
  report.part("ablation_noise", cost["ablation_noise"], lambda: ablation_noise(s))
  report.part("ablation_torch", cost["ablation_torch"], lambda: ablation_torch(s, ours))
  fashion = [tiny_dataset(work / "fashion.npz", (28, 28))] if args.tiny else []
  report.part("recipes", cost["recipes"], lambda: recipes(
      s, work / "recipes", report.left() - cost["cohen_cifar10"], fashion))
  cifar = [tiny_dataset(work / "cifar.npz", (32, 32, 3))] if args.tiny else []
  report.part("cohen_cifar10", cost["cohen_cifar10"], lambda: cohen_cifar10(
      s, work / "cohen_cifar10", report.left(), Path(args.cifar), Path(args.cohen_fixtures),
      cifar))


if __name__ == "__main__":
  main()
