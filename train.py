"""Trains a base classifier for randomized smoothing.

    python train.py --config=configs/fashion_mnist.py --workdir=runs/fmnist [--config.key=value ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from instars_jax import cli

if __name__ == "__main__":
  cli.main("instars_jax.train.loop:train_and_evaluate")
