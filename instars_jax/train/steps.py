"""The training and evaluation steps of the base classifier (flax's imagenet example's
train_step / eval_step): Gaussian augmentation, each example at its σ-table entry.

Training is data parallel: each global batch is sharded over a 1-D `data` mesh of all devices
(parallel.Sharder) and jit inserts the gradient and BatchNorm-statistics reductions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data, parallel
from instars_jax.smoothing.streams import ExampleStream, Stream
from instars_jax.train import losses
from instars_jax.train.state import TrainState, example_keys, gaussian_noise, logits_fn

GAUSSIAN = losses.Loss(losses.DEFAULT_LOSS, ())


@functools.partial(jax.jit, static_argnames=("grid", "explore", "loss"), donate_argnames="state")
def train_step(state: TrainState, batch, epoch_key, grid: tuple | None = None,
               explore: float = 1.0, loss: losses.Loss = GAUSSIAN, epoch=0):
  """One SGD step on `loss` (losses/: Gaussian augmentation by default) over the batch (uint8
  or [0, 1] images, augmented by the input pipeline), each example at its table σ; with
  `grid`, a share `explore` of the examples (drawn from each one's own key) at a random grid
  σ instead. The loss's inputs of every example go through one forward pass."""
  keys = example_keys(epoch_key, batch["index"])
  sigma = training_sigmas(state.sigma_table[batch["index"]], keys, grid, explore)
  return loss_step(state, unit_range(batch["image"]), batch["label"], sigma, keys, loss, epoch)


def loss_step(state, images, labels, sigma, keys, loss: losses.Loss, epoch):
  """One SGD step of `state` on `loss` over examples (images, labels, their σ and keys): the
  loss's inputs of every example in one forward pass; the state and the step's metrics."""
  inputs = loss.inputs(images, labels, sigma, keys, predict=logits_fn(state), epoch=epoch)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     inputs.reshape((-1,) + inputs.shape[2:]), train=True,
                                     mutable=["batch_stats"])
    logits = logits.reshape(inputs.shape[:2] + logits.shape[1:])
    per_example, metrics = loss.objective(logits, labels, sigma, epoch=epoch)
    return per_example.mean(), (metrics, updates)

  (value, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", {}))
  return state, {"loss": value, **metrics}


def training_sigmas(table_sigma, keys, grid: tuple | None, explore: float):
  """σ per example: its table σ; with `grid`, for a share `explore` of the examples (drawn
  from each one's key) a grid σ drawn uniformly from that key instead."""
  if grid is None:
    return table_sigma
  pick = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, ExampleStream.GRID_SIGMA),
                                               (), 0, len(grid)))
  drawn = jnp.asarray(grid, jnp.float32)[pick(keys)]
  if explore >= 1.0:
    return drawn
  chosen = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, ExampleStream.EXPLORE))
                    < explore)(keys)
  return jnp.where(chosen, drawn, table_sigma)


def unit_range(images):
  """Pixels in [0, 1] as float32: uint8 batches (the input pipeline's) are scaled on device."""
  return images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images


@jax.jit
def eval_step(state: TrainState, batch, key, sigma):
  """Sums over the batch of clean and noisy (at σ) correctness; padding has weight 0."""
  apply = logits_fn(state)
  noisy = gaussian_noise(example_keys(key, batch["index"]), batch["image"],
                         jnp.full(batch["label"].shape, sigma))
  clean_hits = jnp.argmax(apply(batch["image"]), -1) == batch["label"]
  noisy_hits = jnp.argmax(apply(noisy), -1) == batch["label"]
  w = batch["weight"]
  return {"clean": jnp.sum(clean_hits * w), "noisy": jnp.sum(noisy_hits * w), "count": jnp.sum(w)}


def evaluate(state, split, sharder, config, sigma) -> dict:
  """Clean and noisy test accuracy on the first `train.eval_examples` test examples."""
  limit = min(len(split), config.train.eval_examples or len(split))
  subset = data.Split(split.images, split.labels[:limit])
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.EVAL_NOISE)
  totals = {"clean": 0.0, "noisy": 0.0, "count": 0.0}
  for batch in data.batches(subset, config.train.batch_size, host_id=jax.process_index(),
                            host_count=jax.process_count(), settings=config.input):
    real = len(batch["label"])
    batch = {k: parallel.pad_rows(v, sharder.local_devices) for k, v in batch.items()}
    batch["weight"] = (np.arange(len(batch["label"])) < real).astype(np.float32)
    out = eval_step(state, sharder.batch(batch), key, sigma)
    for k in totals:
      totals[k] += float(out[k])
  return {"test_clean_accuracy": totals["clean"] / totals["count"],
          "test_noisy_accuracy": totals["noisy"] / totals["count"]}
