"""Cohen et al.'s CIFAR-10 recipe: ResNet-110, 90 epochs, SGD lr 0.1 x0.1 every 30 epochs,
momentum 0.9, weight decay 1e-4, batch 400; certify every 20th test image, N0=100, N=100,000,
alpha=0.001. Needs the TFDS cifar10 dataset (or --config.dataset=cifar10_jpeg)."""

from configs import default


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = default.cohen_recipe(default.get_config(outside))
  config.dataset = "cifar10"
  config.model.name = "resnet110"
  config.train.batch_size = 400
  config.train.augment = "crop_flip"
  config.train.eval_examples = 2000
  config.certify.skip = 20
  config.certify.batch = 20_000  # the fastest of bench/accelerator.py's sweep on one H200
  config.certify.instances = 10
  return config
