"""Certifies the test split with the latest checkpoint of a training run.

    python certify.py --config=configs/fashion_mnist.py --workdir=runs/fmnist [--config.certify.n=...]

Writes --workdir/certify/<name>.tsv (Cohen's format plus a sigma column) and a .json sidecar;
rerunning the same command resumes after the last written row.
"""

from instars_jax import cli

if __name__ == "__main__":
  cli.main("instars_jax.certification:certify_test_set")
