"""Training-step throughput (noise, forward, backward, SGD update) against the bare forward +
backward pass of the same model and batch. Prints JSON.

    python bench/train_throughput.py [--models lenet,resnet20] [--batch 128]
"""

import argparse

import jax
import numpy as np
import optax

from configs import default
from instars_jax.run.workdir import RunInfo
from instars_jax.train import steps
from instars_jax.train.state import create_train_state
from common import INPUTS, device_info, emit, median_seconds


def measure(name: str, batch_size: int) -> dict:
  shape, num_classes, stats = INPUTS[name]
  config = default.get_config()
  config.model.name = name
  config.train.batch_size = batch_size
  state = create_train_state(config, RunInfo(shape, num_classes, stats, 10 * batch_size, 10,
                                             "synthetic"))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(batch_size,) + shape).astype(np.float32),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
           "index": np.arange(batch_size, dtype=np.int32)}

  def loss(params, images, labels):
    logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                               train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  bare = jax.jit(jax.grad(loss))
  bare_s = median_seconds(lambda: bare(state.params, batch["image"], batch["label"]))
  states = [state]

  def step():
    states[0], metrics = steps.train_step(states[0], batch, jax.random.PRNGKey(0))
    return metrics["loss"]
  step_s = median_seconds(step)
  return {"model": name, "batch": batch_size,
          "bare_forward_backward_images_per_s": round(batch_size / bare_s, 1),
          "train_step_images_per_s": round(batch_size / step_s, 1),
          "ratio": round(bare_s / step_s, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="lenet,resnet20")
  parser.add_argument("--batch", type=int, default=128)
  args = parser.parse_args()
  emit({"benchmark": "train_throughput", **device_info(),
        "results": [measure(m, args.batch) for m in args.models.split(",")]})


if __name__ == "__main__":
  main()
