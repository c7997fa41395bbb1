"""instars_jax: certified robustness by (instance-wise) randomized smoothing, in JAX."""

from instars_jax.model_state import load_train_state, logits_fn
from instars_jax.search import search_sigma
from instars_jax.smoothing import (ABSTAIN, Certificate, certify, clopper_pearson_lower,
                                   predict, sample_counts)

__version__ = "0.1.0"

__all__ = ["ABSTAIN", "Certificate", "certify", "clopper_pearson_lower", "load_train_state", "logits_fn",
           "predict", "sample_counts", "search_sigma", "__version__"]
