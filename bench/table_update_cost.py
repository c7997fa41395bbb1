"""Cost of one Insta-RS Train σ-table update (grid profile) against one training epoch.

    python bench/table_update_cost.py [--model lenet] [--num-train 60000] [--batch 128]
                                      [--chunk 256] [--samples 2] [--fraction 0.2]

Times a train step per image and a profile step per visited example on the same state and
reports update ÷ epoch = fraction × (profile seconds per example) ÷ (train seconds per image).
"""

import argparse

import jax
import numpy as np

from configs import default
from instars_jax.storage.workdir import TrainingFacts
from instars_jax.train import sigma_table, steps
from instars_jax.train.state import create_train_state
from common import INPUTS, device_info, emit, median_seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="lenet")
  parser.add_argument("--num-train", type=int, default=60_000)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--chunk", type=int, default=256)
  parser.add_argument("--samples", type=int, default=2)
  parser.add_argument("--fraction", type=float, default=0.2)
  args = parser.parse_args()

  shape, num_classes, stats = INPUTS[args.model]
  config = default.get_config()
  config.model.name = args.model
  grid = tuple(config.train.table.grid)
  state = create_train_state(config, TrainingFacts(shape, num_classes, stats, args.num_train, 10,
                                             "synthetic"))
  rng = np.random.default_rng(0)

  def batch_of(size):
    return {"image": rng.uniform(size=(size,) + shape).astype(np.float32),
            "label": rng.integers(0, num_classes, size).astype(np.int32),
            "index": np.arange(size, dtype=np.int32)}

  train_batch, profile_batch = batch_of(args.batch), batch_of(args.chunk)
  factors = sigma_table.radius_factor_table(config.certify.n, config.certify.alpha)
  states = [state]

  def train():
    states[0], metrics = steps.train_step(states[0], train_batch, jax.random.PRNGKey(0))
    return metrics["loss"]

  def profile():
    states[0] = sigma_table.profile_step(states[0], profile_batch, jax.random.PRNGKey(1), factors,
                                         grid=grid, samples=args.samples)
    return states[0].sigma_table

  train_per_image = median_seconds(train) / args.batch
  profile_per_example = median_seconds(profile) / args.chunk
  epoch = train_per_image * args.num_train
  update = profile_per_example * args.fraction * args.num_train
  emit({"benchmark": "table_update_cost", **device_info(), "model": args.model,
        "grid": grid, "samples": args.samples, "fraction": args.fraction,
        "epoch_seconds": round(epoch, 2), "update_seconds": round(update, 2),
        "update_share_of_epoch": round(update / epoch, 3),
        "forwards_per_visited_example": len(grid) * args.samples})


if __name__ == "__main__":
  main()
