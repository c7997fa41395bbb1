"""instars_jax: certified robustness by (instance-wise) randomized smoothing, in JAX.

  smoothing/      the statistics and the sampler: bounds, noise streams, CERTIFY and PREDICT,
                  sequential stopping rules and their engine, the σ search
  certificates/   the certificate kinds, one module each, found by name from the config
  selection/      the σ-estimator and router nodes as models, the σ experts, a run's
                  classifier: loaded from a workdir for training and certification alike
  train/          the train state with its σ table, the steps, one loop over stages (the
                  σ-estimators' among them), periodic actions
  data/           dataset sources by name or prefix, the grain input pipeline, augmentation
  storage/        a run's directory (Workdir), checkpoints, results files, locks, events
  certification.py, analyze.py, models.py, parallel.py, import_torch.py, convert.py, cli.py

The public API below is imported on first use, so that the command lines can parse their
flags (and reject bad ones) before JAX and orbax load.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ABSTAIN": "instars_jax.smoothing.sampler", "Certificate": "instars_jax.smoothing.sampler",
    "certify": "instars_jax.smoothing.sampler", "predict": "instars_jax.smoothing.sampler",
    "sample_counts": "instars_jax.smoothing.sampler",
    "clopper_pearson_lower": "instars_jax.smoothing.bounds",
    "search_sigma": "instars_jax.smoothing.search",
    "DecisionRule": "instars_jax.smoothing.sequential.rules",
    "RadiusRule": "instars_jax.smoothing.sequential.rules",
    "load_train_state": "instars_jax.train.state", "logits_fn": "instars_jax.train.state",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
  if name in _PUBLIC:
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'instars_jax' has no attribute {name!r}")


def __dir__():
  return __all__
