"""Fashion-MNIST with a LeNet: the CPU-sized default that `make demo` runs."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.model.name = "lenet"
  config.train.epochs = 8
  config.train.batch_size = 128
  config.train.learning_rate = 0.05
  config.train.weight_decay = 5e-4
  config.train.sigma = 0.25
  config.certify.sigma = 0.25
  config.certify.n = 4_000
  config.certify.skip = 20
  config.certify.batch = 1000
  config.certify.instances = 20
  return config
