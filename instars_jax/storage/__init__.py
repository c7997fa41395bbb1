"""A run's files: workdir.py (paths, config.json, run.json, checkpoint managers, locks),
checkpoints.py (orbax, stop requests), results.py (Cohen-format TSVs and their metadata),
events.py (TensorBoard), locks.py, files.py (atomic writes)."""
