"""Counts, certificates (fixed and sequential) and the σ search of a fixed problem as a dict,
for comparison across device counts: `results()` in the test's process (one device), and as
a script in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N, where it
prints the same dict as JSON."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import instars_jax as ij


def results() -> dict:
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(12, 16)).astype(np.float32)
  w2 = rng.normal(size=(16, 4)).astype(np.float32)
  model = lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
  x = rng.uniform(size=(11, 12)).astype(np.float32)
  sigma = np.linspace(0.1, 1.0, 11).astype(np.float32)
  key = jax.random.PRNGKey(0)
  counts = ij.sample_counts(model, x, sigma, key, num=500, batch_size=96, num_classes=4)
  cert = ij.certify(model, x, sigma, key, n0=64, n=2000, alpha=0.001, batch_size=256,
                    num_classes=4)
  sequential = ij.certify(model, x, sigma, key, n0=64, n=3000, alpha=0.001, batch_size=100,
                          num_classes=4, rule=ij.RadiusRule(0.05))
  sigma_chosen = ij.search_sigma(model, x, key, sigma_min=0.1, sigma_max=2.0, starts=3, steps=4,
                                 samples_per_step=32, n=2000, alpha=0.001, batch_size=128,
                                 num_classes=4)
  return {
      "search": sigma_chosen.tolist(),
      "devices": jax.local_device_count(),
      "counts": np.asarray(counts).tolist(),
      "prediction": cert.prediction.tolist(),
      "radius": cert.radius.tolist(),
      "sequential": [sequential.prediction.tolist(), sequential.radius.tolist(),
                     sequential.num_samples.tolist(), np.asarray(sequential.counts).tolist()],
  }


if __name__ == "__main__":
  print(json.dumps(results()))
