"""`make demo`: configs/fashion_mnist.py cut to fit 12 minutes on a 2-core CPU.

Half the epochs (2 Gaussian at a random grid σ, 2 with the σ table), one estimator epoch
from 4-sample labels, and 200 test images certified at n = 2,000."""

from configs import fashion_mnist


def get_config():
  config = fashion_mnist.get_config()
  config.train.epochs = 4
  config.train.stage1_epochs = 2
  config.estimator.epochs = 1
  config.estimator.label_samples = 4
  config.certify.n = 2_000
  config.certify.skip = 50
  return config
