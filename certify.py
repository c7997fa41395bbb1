"""Certifies the test split with the checkpoints of a training run.

    python certify.py --workdir=runs/fmnist [--config.certify.n=... --config.certify.sigma_mode=instance]

The run's settings (model, grid, estimator, held-out split and seed) are read from --workdir;
the command line may set only what certification decides (certify.*, data_dir, cache_dir,
input.*, distributed). Writes --workdir/certify/<name>.tsv (Cohen's format plus a sigma
column) and a .json sidecar naming every checkpoint that certified; rerunning the same
command resumes after the last written row.
"""

from instars_jax import cli

if __name__ == "__main__":
  cli.main("instars_jax.certification:certify", reads_run=True)
