"""Cohen et al.'s CIFAR-10 recipe: ResNet-110, 90 epochs, SGD lr 0.1 x0.1 every 30 epochs,
momentum 0.9, weight decay 1e-4, batch 400; certify every 20th test image, N0=100, N=100,000,
alpha=0.001. Needs the TFDS cifar10 dataset (or --config.dataset=cifar10_jpeg)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.model.name = "resnet110"
  config.train.epochs = 90
  config.train.batch_size = 400
  config.train.learning_rate = 0.1
  config.train.schedule = "step"
  config.train.lr_decay_epochs = (30, 60)
  config.train.weight_decay = 1e-4
  config.train.augment = "crop_flip"
  config.train.eval_examples = 2000
  config.certify.n0 = 100
  config.certify.n = 100_000
  config.certify.alpha = 0.001
  config.certify.skip = 20
  config.certify.batch = 400
  return config
