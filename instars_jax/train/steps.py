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

GAUSSIAN = losses.Loss("gaussian", ())


@functools.partial(jax.jit, static_argnames=("grid", "explore", "loss"), donate_argnames="state")
def train_step(state: TrainState, batch, epoch_key, grid: tuple | None = None,
               explore: float = 1.0, loss: losses.Loss = GAUSSIAN, epoch=0):
  """One training step on `loss` (losses/: Gaussian augmentation by default) over the batch
  (uint8 or [0, 1] images, augmented by the input pipeline), each example at its table σ; with
  `grid`, a share `explore` of the examples (drawn from each one's own key) at a random grid
  σ instead (loss_step: one SGD update, or m with the references' batching)."""
  keys = example_keys(epoch_key, batch["index"])
  sigma = training_sigmas(state.sigma_table[batch["index"]], keys, grid, explore)
  return loss_step(state, unit_range(batch["image"]), batch["label"], sigma, keys, loss, epoch)


def loss_step(state, images, labels, sigma, keys, loss: losses.Loss, epoch):
  """SGD on `loss` over examples (images, labels, their σ and keys); the state and the mean of
  the metrics of its updates. With loss.updates_per_step = m > 1 (batching "split", the
  references'), m updates in turn, update c on the examples c, c + m, c + 2m, ... (B/m of
  them, each with its m inputs): their code takes consecutive rows of a shuffled batch, and
  strided ones keep each update's examples spread over the devices. Else one update on all."""
  m = loss.updates_per_step
  if m == 1:
    return sgd_step(state, images, labels, sigma, keys, loss, epoch)

  def strided(a):  # [m, B/m, ...]: row c holds examples c, c + m, ...
    return jnp.swapaxes(a.reshape((-1, m) + a.shape[1:]), 0, 1)

  # Unrolled on the CPU, whose backend ran the rolled scan's convolutions 7.5x slower
  # (docs/performance.md); rolled elsewhere, where it compiles m times faster.
  state, metrics = jax.lax.scan(lambda s, part: sgd_step(s, *part, loss, epoch), state,
                                tuple(strided(a) for a in (images, labels, sigma, keys)),
                                unroll=jax.default_backend() == "cpu")
  return state, jax.tree_util.tree_map(lambda v: v.mean(axis=0), metrics)


def sgd_step(state, images, labels, sigma, keys, loss: losses.Loss, epoch):
  """One SGD update of `state` on `loss` over the examples: their inputs from the current
  model (SmoothAdv's attack: no gradient to the weights), then the loss's forward pass."""
  inputs = loss.inputs(images, labels, sigma, keys, predict=logits_fn(state), epoch=epoch)

  def loss_fn(params):
    logits, batch_stats = forward(state, params, inputs, loss.separate_passes)
    per_example, metrics = loss.objective(logits, labels, sigma, epoch=epoch)
    return per_example.mean(), (metrics, batch_stats)

  (value, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, {"loss": value, **metrics}


def forward(state, params, inputs, separate: bool):
  """The training-mode logits [m, B, C] of `inputs` [m, B, ...] and the BatchNorm statistics
  after them: one pass over all m·B inputs, or with `separate` (on a model with BatchNorm) one
  pass per input of each example in turn, each normalised by its own batch statistics."""
  apply = functools.partial(state.apply_fn, train=True, mutable=["batch_stats"])
  if not (separate and state.batch_stats):
    logits, updates = apply({"params": params, "batch_stats": state.batch_stats},
                            inputs.reshape((-1,) + inputs.shape[2:]))
    return logits.reshape(inputs.shape[:2] + logits.shape[1:]), updates.get("batch_stats", {})
  stats, passes = state.batch_stats, []
  for group in inputs:
    logits, updates = apply({"params": params, "batch_stats": stats}, group)
    stats = updates["batch_stats"]
    passes.append(logits)
  return jnp.stack(passes), stats


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
  """Clean and noisy test accuracy on `train.eval_examples` test examples spread evenly over
  the split (every (len // eval_examples)-th): a split stored class by class, as
  cifar10_jpeg's is, gives every class its share, where its first examples would be one class."""
  limit = min(len(split), config.train.eval_examples or len(split))
  chosen = np.arange(limit) * (len(split) // limit)
  subset = split.subset(chosen)
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
