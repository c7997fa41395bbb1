"""configs/cifar10_gpu.py (ResNet-20, one GPU, Insta-RS Train) with stability training (Li et al.
2019) at its published CIFAR-10 setting at σ = 0.25 and 0.5: λ = 2 (λ = 1 at σ = 1.0).
--config.train.insta=False --config.train.sigma=S gives the fixed-σ model."""

from configs import cifar10_gpu


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = cifar10_gpu.get_config(outside)
  config.train.loss = "stability"
  config.train.stability.lbd = 2.0
  return config
