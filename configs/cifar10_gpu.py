"""ResNet-20 on CIFAR-10-JPEG sized for one GPU: the CIFAR rows of docs/results.md.

Insta-RS Train over the grid {0.25, 0.5, 1.0} (18 epochs of Gaussian augmentation at a grid σ
drawn per example and step, then 12 with each example at its best grid σ), then a ResNet-20
σ-estimator for the sound instance-wise certificate. --config.train.insta=False gives Cohen et
al.'s training at train.sigma with the same 30 epochs. bfloat16 compute, float32 parameters.
Certifies every 20th test image (500) at n = 10,000 with 20,000 noisy images per forward pass."""

from configs import cifar10_small


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = cifar10_small.get_config(outside)
  config.model.dtype = "bfloat16"
  config.input.workers = 4
  config.train.epochs = 30
  config.train.batch_size = 256
  config.train.eval_examples = 2000
  config.train.insta = True
  config.train.stage1_epochs = 18
  config.train.stage1_noise = "grid"
  config.train.table.grid = (0.25, 0.5, 1.0)
  config.train.table.samples = 2
  config.train.table.fraction = 0.35
  config.train.estimator.epochs = 4
  config.certify.n = 10_000
  config.train.table.n = 10_000
  config.certify.skip = 20
  config.certify.max = -1
  config.certify.batch = 20_000
  config.certify.instances = 100
  return config
