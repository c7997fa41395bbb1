"""configs/cifar10_gpu.py (ResNet-20, one GPU, Insta-RS Train) with consistency regularization
(Jeong & Shin 2020) at its published CIFAR-10 setting for ResNet-20 at σ = 0.5: m = 2,
λ = 10, η = 0.5. --config.train.insta=False --config.train.sigma=S gives the fixed-σ model."""

from configs import cifar10_gpu


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = cifar10_gpu.get_config(outside)
  config.train.loss = "consistency"
  config.train.consistency.update(num_noise_vec=2, lbd=10.0, eta=0.5)
  return config
