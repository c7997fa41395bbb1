"""The sequential engine: continuous batching of instances that stop at different sample
counts, in one compiled loop per device.

Each instance draws estimation samples until its stopping rule (rules.py) fires at one of
the rule's looks, and the device never waits for the slowest instance: a finished instance's
slot in the batch takes the next instance of the queue. Noise for instance i, sample j is
fixed-n CERTIFY's (bounds.instance_noise with the estimation key), so the first t samples
are the same in both, and stopping depends only on the counts at looks: results do not
depend on batch size, grouping or device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import parallel
from instars_jax.smoothing.bounds import instance_noise

# Instances in flight per device: one per SAMPLES_PER_SLOT images of the batch, so that the
# instances just started (the first look's samples) can fill it.
SAMPLES_PER_SLOT = 50


def sample_on_device(x, sigma, ids, guess, key, looks, tables, *, apply_fn, slots, batch_size,
                     num_classes, rule):
  """Counts for the queue of instances on one device: (counts int32[Q, C], trials int32[Q],
  look int32[Q], level int32[Q]) at each instance's stop.

  `slots` instances are in flight. Each step's batch of `batch_size` noisy images is filled
  slot by slot with the samples each in-flight instance still needs to reach its next look
  (so nothing is drawn past a look, and in the tail the last instances get the whole batch);
  an instance that stops at a look hands its slot to the next instance of the queue."""
  queue, shape = x.shape[0], x.shape[1:]
  n_max = looks[-1]
  slots = min(slots, queue)
  positions = jnp.arange(batch_size)

  def step(state):
    slot, next_in_queue, counts, trials, look, level = state
    active = slot < queue
    q = jnp.minimum(slot, queue - 1)
    start, boundary = trials[q], looks[look[q]]
    need = jnp.where(active, boundary - start, 0)
    ends = jnp.cumsum(need)
    begins = ends - need
    owner = jnp.minimum(jnp.searchsorted(ends, positions, side="right"), slots - 1)
    valid = positions < ends[-1]
    instance = q[owner]
    sample = start[owner] + positions - begins[owner]
    eps = jax.vmap(lambda i, j: instance_noise(key, i, j[None], shape)[0])(ids[instance], sample)
    noisy = x[instance] + sigma[instance].reshape((-1,) + (1,) * len(shape)) * eps
    predictions = jnp.argmax(apply_fn(noisy), -1)
    hits = jax.ops.segment_sum(jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32)
                               * valid[:, None], owner, num_segments=slots)
    new_counts = counts[q] + hits
    new_trials = start + jnp.clip(batch_size - begins, 0, need)
    successes = jnp.take_along_axis(new_counts, guess[q][:, None], axis=1)[:, 0]
    at_look = active & (new_trials == boundary)
    rule_stop, rule_level = rule.stop(tables, look[q], successes, new_trials, n_max, sigma[q],
                                      level[q])
    stop = at_look & (rule_stop | (new_trials >= n_max))
    new_look = look[q] + (at_look & ~stop)
    new_level = jnp.where(at_look, rule_level, level[q])
    write = jnp.where(active, q, queue)  # idle slots write nowhere
    counts = counts.at[write].set(new_counts, mode="drop")
    trials = trials.at[write].set(new_trials, mode="drop")
    look = look.at[write].set(new_look, mode="drop")
    level = level.at[write].set(new_level, mode="drop")
    refill = next_in_queue + jnp.cumsum(stop) - 1
    slot = jnp.where(stop, jnp.where(refill < queue, refill, queue), slot)
    return slot, next_in_queue + jnp.sum(stop), counts, trials, look, level

  zeros = jnp.zeros((queue,), jnp.int32)
  initial = (jnp.arange(slots, dtype=jnp.int32), jnp.int32(slots),
             jnp.zeros((queue, num_classes), jnp.int32), zeros, zeros, zeros)
  _, _, counts, trials, look, level = jax.lax.while_loop(lambda s: jnp.any(s[0] < queue), step,
                                                         initial)
  return counts, trials, look, level


def sample(apply_fn, x, sigma, ids, guess, key, *, n_max, alpha, batch_size, num_classes, rule):
  """(counts int[B, C], trials int[B], look int[B], level int[B]) of sequential sampling on
  validated host arrays: each device takes a contiguous share of the instances as its queue
  and keeps batch_size // SAMPLES_PER_SLOT of them in flight."""
  looks = rule.looks(int(n_max), float(alpha)).astype(np.int32)
  results = parallel.map_instances(
      sample_on_device, (x, sigma, ids, guess), (key, looks, rule.tables(int(n_max), float(alpha))),
      apply_fn=apply_fn, slots=max(1, batch_size // SAMPLES_PER_SLOT), batch_size=batch_size,
      num_classes=num_classes, rule=rule)
  return tuple(np.asarray(a) for a in results)
