"""configs/cifar10_gpu.py (ResNet-20, one GPU, Insta-RS Train) with MACER (Zhai et al. 2020) at
its published CIFAR-10 setting for ResNet-20 at σ = 0.5: m = 16, λ = 4, γ = 8, β = 16, the
robustness term from the first epoch. --config.train.insta=False --config.train.sigma=S gives
the fixed-σ model."""

from configs import cifar10_gpu


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = cifar10_gpu.get_config(outside)
  config.train.loss = "macer"
  config.train.macer.update(num_noise_vec=16, lbd=4.0, gamma=8.0, beta=16.0, deferred_epochs=0)
  return config
