"""Cohen et al.'s ImageNet recipe: ResNet-50, 90 epochs, SGD lr 0.1 x0.1 every 30 epochs,
momentum 0.9, weight decay 1e-4, batch 256, RandomResizedCrop(224) + horizontal flip for
training and resize 256 + centre crop 224 for evaluation; certify every 100th validation
image, N0=100, N=100,000, alpha=0.001. Needs TFDS imagenet2012 prepared from its manual
download, or an ImageFolder tree (--config.dataset=folder:PATH with train/ and val/)."""

from configs import default


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = default.cohen_recipe(default.get_config(outside))
  config.dataset = "imagenet2012"
  config.model.name = "resnet50"
  config.train.batch_size = 256
  config.image_size = 224
  config.train.augment = "random_resized_crop"
  config.input.workers = 8  # decoding 256 JPEGs a step needs several cores per host
  config.train.eval_examples = 5000
  config.certify.skip = 100
  config.certify.batch = 2_048  # the fastest of bench/accelerator.py's sweep on one H200
  config.certify.instances = 4
  return config
