"""instars_jax: certified robustness by (instance-wise) randomized smoothing, in JAX.

  smoothing/      the statistics and the sampler: bounds, noise streams, CERTIFY and PREDICT,
                  sequential stopping rules and their engine, the σ search
  certificates/   the certificate kinds, one module each, found by name from the config
  train/          the train state with its σ table, the steps, one loop over stages, the
                  σ-estimator, periodic actions
  data/           dataset sources by name or prefix, the grain input pipeline, augmentation
  run/            a run's directory (Workdir), checkpoints, results files, locks, events
  certification.py, analyze.py, models.py, parallel.py, import_torch.py, convert.py, cli.py
"""

from instars_jax.smoothing.bounds import clopper_pearson_lower
from instars_jax.smoothing.sampler import (ABSTAIN, Certificate, certify, predict,
                                           sample_counts)
from instars_jax.smoothing.search import search_sigma
from instars_jax.smoothing.sequential.rules import DecisionRule, RadiusRule
from instars_jax.train.state import load_train_state, logits_fn

__version__ = "0.1.0"

__all__ = ["ABSTAIN", "Certificate", "DecisionRule", "RadiusRule", "certify",
           "clopper_pearson_lower", "load_train_state", "logits_fn", "predict", "sample_counts",
           "search_sigma", "__version__"]
