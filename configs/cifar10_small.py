"""ResNet-20 on the JPEG re-encoded CIFAR-10 in ../shared: CIFAR-sized and feasible on CPU."""

from configs import default


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = default.get_config(outside)
  config.dataset = "cifar10_jpeg"
  config.model.name = "resnet20"
  config.train.epochs = 15
  config.train.batch_size = 128
  config.train.learning_rate = 0.1
  config.train.weight_decay = 1e-4
  config.train.augment = "crop_flip"
  config.train.eval_examples = 1000
  config.certify.n = 10_000
  config.train.table.n = 10_000
  # 100 test images, 10 of each class: the archive's test split is stored class by class, so
  # every 100th of all of it (a bound on the index, Cohen's max, would keep the first classes).
  config.certify.skip = 100
  config.certify.max = -1
  return config
