"""instars_jax: certified robustness by (instance-wise) randomized smoothing, in JAX."""

from instars_jax.smoothing import (ABSTAIN, Certificate, certify, clopper_pearson_lower,
                                   predict, sample_counts)

__version__ = "0.1.0"

__all__ = ["ABSTAIN", "Certificate", "certify", "clopper_pearson_lower", "predict",
           "sample_counts", "__version__"]
