"""Trains a base classifier for randomized smoothing.

    python train.py --config=configs/fashion_mnist.py --workdir=runs/fmnist [--config.key=value ...]

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

from instars_jax import cli
from instars_jax.train import loop

if __name__ == "__main__":
  cli.main(loop.train_and_evaluate)
