"""Training-step throughput (noise, the loss's inputs, forward, backward, SGD update) of every
training loss against the bare passes the loss needs: a forward + backward pass over the m
inputs of each example (its noise copies), and for SmoothAdv one more forward + backward per
PGD step. Also the step's cost per noise copy and per PGD step. Prints JSON.

    python bench/train_throughput.py [--models lenet,resnet20] [--batch 128]
        [--losses gaussian,consistency,stability,macer,smoothadv]
"""

import argparse

import jax
import numpy as np
import optax

from configs import default
from instars_jax.storage.workdir import TrainingFacts
from instars_jax.train import losses, steps
from instars_jax.train.state import create_train_state
from common import INPUTS, device_info, emit, median_seconds


def measure(name: str, batch_size: int, loss_name: str) -> dict:
  shape, num_classes, stats = INPUTS[name]
  config = default.get_config()
  config.model.name = name
  config.train.batch_size = batch_size
  config.train.loss = loss_name
  loss = losses.from_config(config.train, config.train.sigma)
  settings = dict(loss.settings)
  state = create_train_state(config, TrainingFacts(shape, num_classes, stats, 10 * batch_size, 10,
                                             "synthetic"))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(batch_size,) + shape).astype(np.float32),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
           "index": np.arange(batch_size, dtype=np.int32)}
  copies = 2 if loss_name == "stability" else settings.get("num_noise_vec", 1)
  passes = 1 + settings.get("num_steps", 0)  # SmoothAdv: one more pass per PGD step
  images = np.repeat(batch["image"], copies, axis=0)
  labels = np.repeat(batch["label"], copies, axis=0)

  def cross_entropy(params, x, y):
    logits, _ = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                               train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  bare = jax.jit(jax.grad(cross_entropy))
  bare_s = passes * median_seconds(lambda: bare(state.params, images, labels))
  states = [state]

  def step():
    states[0], metrics = steps.train_step(states[0], batch, jax.random.PRNGKey(0), loss=loss)
    return metrics["loss"]
  step_s = median_seconds(step)
  return {"model": name, "loss": loss_name, "batch": batch_size, "copies": copies,
          "pgd_steps": passes - 1, "step_seconds": step_s,
          "seconds_per_copy_per_pass": step_s / copies / passes,
          "bare_passes_images_per_s": round(batch_size / bare_s, 1),
          "train_step_images_per_s": round(batch_size / step_s, 1),
          "ratio": round(bare_s / step_s, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="lenet,resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--losses", default=",".join(losses.names()))
  args = parser.parse_args()
  emit({"benchmark": "train_throughput", **device_info(),
        "results": [measure(m, args.batch, loss) for m in args.models.split(",")
                    for loss in args.losses.split(",")]})


if __name__ == "__main__":
  main()
