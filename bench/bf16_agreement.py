"""bfloat16 against float32 for certification: speed of sample_counts and agreement of the
counts, the same parameters under both compute dtypes. Prints JSON. Meant for accelerators;
on CPU bfloat16 is emulated and its speed says nothing.

    python bench/bf16_agreement.py [--workdir runs/demo] [--images 32] [--num 2000]
"""

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import instars_jax as ij
from instars_jax import data, models
from common import INPUTS, device_info, emit, median_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", help="a trained run (its test images and parameters); "
                                        "default: a randomly initialised LeNet on uniform noise")
  parser.add_argument("--images", type=int, default=32)
  parser.add_argument("--num", type=int, default=2000)
  parser.add_argument("--batch", type=int, default=1000)
  args = parser.parse_args()

  if args.workdir:
    state = ij.load_train_state(args.workdir)
    config = json.loads((Path(args.workdir) / "config.json").read_text())
    run = json.loads((Path(args.workdir) / "run.json").read_text())
    name, num_classes, stats = config["model"]["name"], run["num_classes"], run["stats"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x = data.load_dataset(config["dataset"], data_dir=config["data_dir"]).test.take(
        np.arange(args.images))["image"]
  else:
    name = "lenet"
    shape, num_classes, stats = INPUTS[name]
    variables = models.create_model(name, num_classes, "float32", stats).init(
        jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
    x = np.random.default_rng(0).uniform(size=(args.images,) + shape).astype(np.float32)

  counts, rates = {}, {}
  for dtype in ("float32", "bfloat16"):
    model = models.create_model(name, num_classes, dtype, stats)
    apply_fn = functools.partial(model.apply, variables, train=False)
    run_counts = lambda: ij.sample_counts(apply_fn, x, 0.25, jax.random.PRNGKey(1), num=args.num,
                                          batch_size=args.batch, num_classes=num_classes)
    rates[dtype] = args.images * args.num / median_seconds(run_counts, repeats=3)
    counts[dtype] = np.asarray(run_counts())
  f32, bf16 = counts["float32"], counts["bfloat16"]
  emit({"benchmark": "bf16_agreement", **device_info(), "model": name,
        "source": args.workdir or "random init", "images": args.images, "num": args.num,
        "float32_images_per_s": round(rates["float32"], 1),
        "bfloat16_images_per_s": round(rates["bfloat16"], 1),
        "top_class_agreement": float(np.mean(f32.argmax(1) == bf16.argmax(1))),
        "mean_abs_top_count_difference_over_num": float(
            np.mean(np.abs(f32.max(1) - bf16[np.arange(len(f32)), f32.argmax(1)])) / args.num)})


if __name__ == "__main__":
  main()
