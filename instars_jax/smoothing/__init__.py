"""The statistics and the sampler, pure and sharded over devices: bounds.py (Clopper–Pearson,
radii, noise keyed on (key, instance, sample)), streams.py (the noise-stream ids),
sampler.py (Monte Carlo counts, CERTIFY, PREDICT), sequential/ (stopping rules and their
engine), search.py (the multi-start σ search)."""
