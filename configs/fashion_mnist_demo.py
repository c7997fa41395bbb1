"""`make demo`: configs/fashion_mnist.py cut to fit 12 minutes on the slowest 2-core CPU seen
(Zen 2; about 4.9× the time of a recent Intel Xeon).

2 epochs instead of 8 (1 Gaussian at a random grid σ, 1 with the σ table) on 20,000 of the
60,000 training examples, one estimator epoch from 4-sample labels, 1,000 test images
evaluated after each epoch, and 100 test images certified at n = 1,000 (radii up to 2.4 σ
at α = 0.001)."""

from configs import fashion_mnist


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = fashion_mnist.get_config(outside)
  config.train.epochs = 2
  config.train.stage1_epochs = 1
  config.train.examples = 20_000
  config.train.eval_examples = 1_000
  config.train.estimator.epochs = 1
  config.train.estimator.label_samples = 4
  config.certify.n = 1_000
  config.train.table.n = 1_000
  config.certify.skip = 100
  return config
