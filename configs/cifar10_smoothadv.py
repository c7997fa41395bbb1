"""configs/cifar10_gpu.py (ResNet-20, one GPU, Insta-RS Train) with SmoothAdv (Salman et al.
2019) at a published CIFAR-10 setting for ResNet-20 at σ = 0.5: PGD ε = 1.0, 10 steps, m = 8,
ε warmed up over 10 epochs, in the references' batching (each batch of 256 makes 8 SGD steps
of 32 examples). --config.train.insta=False --config.train.sigma=S gives the fixed-σ model."""

from configs import cifar10_gpu


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  config = cifar10_gpu.get_config(outside)
  config.train.loss = "smoothadv"
  config.train.smoothadv.update(num_noise_vec=8, epsilon=1.0, num_steps=10, warmup=10)
  return config
