"""Insta-RS Train's per-example σ table in the train state: a radius profile over a σ grid.

Each training example i keeps a profile R[i, k], an estimate of the radius CERTIFY would give
its true label y at every σ_k of `train.table.grid`, and trains at the grid σ whose estimate is
largest (`sigma_table[i]`; the smallest σ when none is positive, which is where a wrong
example is easiest to learn). An update scores every visited example at all K grid σ on the
same `samples` noise vectors (common random numbers):

    R_k = σ_k · Φ⁻¹(CP_lower(p̂_k · n, n, α)),   p̂_k = mean_j softmax(f(x + σ_k ε_j))_y,

with the certification's n and α, as the σ search's objective (smoothing/search.py) does: the
Clopper–Pearson bound of a finite n is what makes a moderate σ beat a large one for an
example near the boundary, as it will at certification. CP_lower is tabulated with scipy over
p̂ ∈ [0, 1] and interpolated on the device. p̂ averages softmax probabilities rather than
counting hard votes, so the few samples an update can afford (≤ 25% of an epoch) still rank
the grid σ. None of this is a certificate: it chooses training noise and gives the
σ-estimator its labels (`stages/sigma_estimators.py`).

Deterministic: the noise of example i in the update before epoch e depends only on
(seed, e, i), so a resumed run computes the same table.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import analyze, data, parallel
from instars_jax.smoothing import bounds
from instars_jax.smoothing.streams import Stream, numpy_rng
from instars_jax.train.state import logits_fn

CP_POINTS = 4097


def radius_factor_table(n: int, alpha: float) -> np.ndarray:
  """float32[CP_POINTS]: Φ⁻¹(CP_lower(p · n, n, α)) at p = linspace(0, 1), floored at −10
  (interpolated by `grid_radii`)."""
  return bounds.certified_factors(np.linspace(0.0, 1.0, CP_POINTS), n, alpha)


def grid_radii(p, grid, factors):
  """R_k = σ_k · Φ⁻¹(CP_lower(p_k · n, n, α)) for estimates p [..., K] of p_A at the grid σ,
  with `factors` = radius_factor_table(n, α)."""
  points = jnp.linspace(0.0, 1.0, factors.shape[0])
  return jnp.asarray(grid, jnp.float32) * jnp.interp(p, points, factors)


def true_label_probability(apply_fn, batch, key, grid, samples):
  """float32[b, K]: mean softmax probability of each example's label under noise at each grid
  σ, on the same `samples` noise vectors per example for every σ (noise of example i, sample
  j from (key, index_i, j), as in bounds.instance_noise)."""
  x, labels, ids = batch["image"], batch["label"], batch["index"]
  shape = x.shape[1:]
  eps = jax.vmap(bounds.instance_noise, in_axes=(None, 0, None, None))(
      key, ids, jnp.arange(samples), shape)  # [b, m, ...]
  levels = jnp.asarray(grid, jnp.float32).reshape((-1, 1, 1) + (1,) * len(shape))
  noisy = x[None, :, None] + levels * eps[None]  # [K, b, m, ...]
  probs = jax.nn.softmax(apply_fn(noisy.reshape((-1,) + shape)), axis=-1)
  probs = probs.reshape(noisy.shape[:3] + (-1,))
  picked = jnp.take_along_axis(probs, labels[None, :, None, None], axis=-1)[..., 0]
  return jnp.mean(picked, axis=2).T


@functools.partial(jax.jit, static_argnames=("grid", "samples"), donate_argnames="state")
def profile_step(state, batch, key, factors, *, grid, samples):
  """The profile and training σ of the examples in `batch`, written into the state's table."""
  p = true_label_probability(logits_fn(state), batch, key, grid, samples)
  radii = grid_radii(p, grid, factors)
  best = jnp.where(jnp.max(radii, axis=1) > 0, jnp.argmax(radii, axis=1), 0)
  sigma = jnp.asarray(grid, jnp.float32)[best]
  return state.replace(sigma_table=state.sigma_table.at[batch["index"]].set(sigma),
                       sigma_profile=state.sigma_profile.at[batch["index"]].set(radii))


@functools.partial(jax.jit, static_argnames=("grid", "samples"))
def _profile_radii(apply_fn, batch, key, factors, *, grid, samples):
  return grid_radii(true_label_probability(apply_fn, batch, key, grid, samples), grid, factors)


def profile_of(apply_fn, split, config, visit: "Visit", grid: tuple, done=None,
               after_chunk=None) -> np.ndarray:
  """float32[len(visit.order), len(grid)]: the radius profile that an update computes, of
  the one classifier `apply_fn` (a pytree, e.g. models.bind_variables) at `grid`, for the
  examples visit.order of `split`, on this host (no table is written). `done`: the rows of
  its first examples from an earlier pass, which it goes on from (each example's noise
  depends on its index alone, so the rows are the same); `after_chunk(rows)` is called with
  each chunk's rows."""
  factors = radius_factor_table(config.train.table.n, config.train.table.alpha)
  out = [np.zeros((0, len(grid)), np.float32) if done is None else np.asarray(done)]
  chunk, left = config.train.table.chunk, visit.order[len(out[0]):]
  for batch in data.batches(split, chunk, order=left, settings=config.input):
    real = len(batch["index"])
    batch = {k: parallel.pad_rows(v, chunk) for k, v in batch.items()}
    radii = _profile_radii(apply_fn, batch, visit.key, factors, grid=tuple(grid),
                           samples=visit.samples)
    out.append(np.asarray(radii)[:real])
    if after_chunk is not None:
      after_chunk(out[-1])
  return np.concatenate(out)


def update_due(config, epoch: int) -> bool:
  """Whether the σ table is updated before training `epoch` (stage 2, every k-th epoch; never
  in the epochs after train.epochs, which fine-tune at the estimator's σ)."""
  t = config.train
  return (t.insta and t.stage1_epochs <= epoch < t.epochs
          and (epoch - t.stage1_epochs) % t.table.update_every == 0)


def update_indices(num_examples: int, fraction: float, update_number: int,
                   seed: int) -> np.ndarray:
  """The training examples one table update visits: all of them (fraction 1), or the
  update_number-th slice of a fixed permutation, so that every example is visited once in
  every ceil(1 / fraction) updates."""
  if fraction >= 1.0:
    return np.arange(num_examples)
  size = math.ceil(fraction * num_examples)
  permutation = numpy_rng(seed, Stream.TABLE_UPDATE).permutation(num_examples)
  return np.take(permutation, np.arange(update_number * size, (update_number + 1) * size),
                 mode="wrap")


def update_key(seed: int, epoch: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), Stream.TABLE_UPDATE),
                            epoch)


class Visit(NamedTuple):
  """One profile pass: the training examples it visits (in order), the key of their noise,
  and the noise vectors per example."""
  order: np.ndarray
  key: jax.Array
  samples: int


def update(state, split, sharder, config, visit: Visit, after_chunk=None):
  """One pass of `profile_step` over the examples `visit.order` of the training split, in
  chunks of `train.table.chunk` (all devices); `after_chunk(state, indices)` is called after
  each chunk with the split indices it profiled."""
  table = config.train.table
  key, order, samples = visit.key, visit.order, visit.samples
  per_host = table.chunk // jax.process_count()
  grid = tuple(float(s) for s in table.grid)
  factors = radius_factor_table(config.train.table.n, config.train.table.alpha)
  for start, batch in zip(range(0, len(order), table.chunk),
                          data.batches(split, table.chunk, host_id=jax.process_index(),
                                       host_count=jax.process_count(), order=order,
                                       settings=config.input)):
    # The last chunk is padded with copies of its first example: same index, same values.
    batch = {k: parallel.pad_rows(v, per_host) for k, v in batch.items()}
    state = profile_step(state, sharder.batch(batch), key, factors, grid=grid, samples=samples)
    if after_chunk is not None:
      after_chunk(state, order[start: start + table.chunk])
  return state


def update_before_epoch(state, split, sharder, config, epoch):
  """The stage-2 update due before `epoch`: the `table.fraction` of the split due then."""
  table = config.train.table
  number = (epoch - config.train.stage1_epochs) // table.update_every
  order = update_indices(len(split), table.fraction, number, config.seed)
  return update(state, split, sharder, config,
                Visit(order, update_key(config.seed, epoch), table.samples))


def validate(config, devices: int) -> list:
  """(ok, message) checks of `train.table`."""
  t, table = config.train, config.train.table
  grid = np.asarray(table.grid, np.float64)
  return [
      (grid.ndim == 1 and len(grid) >= 2 and np.all(grid > 0) and np.all(np.diff(grid) > 0),
       f"train.table.grid must be at least two increasing σ > 0; got {tuple(table.grid)}"),
      (0 <= t.stage1_epochs <= t.epochs,
       f"train.stage1_epochs must lie in [0, train.epochs={t.epochs}]; got {t.stage1_epochs}"),
      (table.samples >= 1, f"train.table.samples must be >= 1; got {table.samples}"),
      (table.update_every >= 1, f"train.table.update_every must be >= 1; got {table.update_every}"),
      (table.chunk >= 1 and table.chunk % devices == 0,
       f"train.table.chunk must be a positive multiple of the device count {devices}; "
       f"got {table.chunk}"),
      (0 < table.fraction <= 1, f"train.table.fraction must lie in (0, 1]; got {table.fraction}"),
      (0 <= table.explore <= 1, f"train.table.explore must lie in [0, 1]; got {table.explore}"),
  ]


def quantiles(sigma_table) -> dict:
  values = np.asarray(sigma_table)
  qs = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
  return {f"sigma_q{int(q * 100):02d}": float(v) for q, v in zip(qs, np.quantile(values, qs))} | \
      {"sigma_mean": float(values.mean())}


def grid_shares(sigma_table, grid) -> dict:
  """The share of training examples at each grid σ."""
  values = np.asarray(sigma_table)
  return {f"sigma_share_{s:g}": float(np.mean(np.isclose(values, s))) for s in grid}


def plot(sigma_table, labels, workdir) -> None:
  """Histograms of the σ table, overall and by class, as PNGs in workdir."""
  values = np.asarray(sigma_table)
  fig, ax = analyze.new_figure()
  ax.hist(values, bins=50)
  ax.set_xlabel("σ of a training example")
  ax.set_ylabel("examples")
  analyze.save_figure(fig, ax, workdir / "sigma_table.png")

  classes = np.unique(labels)
  fig, ax = analyze.new_figure(max(6.0, 0.6 * len(classes)))
  ax.boxplot([values[labels == c] for c in classes], tick_labels=[str(c) for c in classes])
  ax.set_xlabel("class")
  ax.set_ylabel("σ of a training example")
  analyze.save_figure(fig, ax, workdir / "sigma_by_class.png")
