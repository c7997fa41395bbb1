"""`make demo`: configs/fashion_mnist.py cut to fit 12 minutes on the slowest 2-core CPU.

2 epochs instead of 8 (1 Gaussian at a random grid σ, 1 with the σ table), one estimator
epoch from 4-sample labels, 2,000 test images evaluated after each epoch, and 200 test images
certified at n = 2,000."""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.train.epochs = 2
  config.train.stage1_epochs = 1
  config.train.eval_examples = 2_000
  config.estimator.epochs = 1
  config.estimator.label_samples = 4
  config.certify.n = 2_000
  config.certify.skip = 50
  return config
