"""The package's architectures in PyTorch, with the layer names of Cohen et al.'s published
checkpoints (`Sequential(NormalizeLayer, model)`; torchvision's ResNet-50 layout), for the
PyTorch baselines and the checkpoint-import tests."""

import torch
from torch import nn

MEANS = {"cifar10": ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]),
         "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


class Normalize(nn.Module):
  """Cohen et al.'s NormalizeLayer: constants, not weights (nothing in the state_dict)."""

  def __init__(self, stats):
    super().__init__()
    self.mean, self.std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEANS[stats])

  def forward(self, x):
    return (x - self.mean.to(x)) / self.std.to(x)


class Block(nn.Module):
  """A residual block with torch's layer names: conv1/bn1 ... convK/bnK, downsample.{0,1}."""

  def __init__(self, inplanes, planes, stride, bottleneck):
    super().__init__()
    out = planes * (4 if bottleneck else 1)
    shapes = ([(inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, out, 1, 1)]
              if bottleneck else [(inplanes, planes, 3, stride), (planes, planes, 3, 1)])
    self.depth = len(shapes)
    for j, (cin, cout, k, s) in enumerate(shapes, 1):
      setattr(self, f"conv{j}", nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False))
      setattr(self, f"bn{j}", nn.BatchNorm2d(cout))
    self.downsample = (nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                     nn.BatchNorm2d(out))
                       if stride != 1 or inplanes != out else None)

  def forward(self, x):
    y = x
    for j in range(1, self.depth + 1):
      y = getattr(self, f"bn{j}")(getattr(self, f"conv{j}")(y))
      y = torch.relu(y) if j < self.depth else y
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
  def __init__(self, stages, widths, bottleneck, num_classes, imagenet):
    super().__init__()
    self.conv1 = (nn.Conv2d(3, widths[0], 7, 2, padding=3, bias=False) if imagenet
                  else nn.Conv2d(3, widths[0], 3, padding=1, bias=False))
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, 2, padding=1) if imagenet else nn.Identity()
    inplanes = widths[0]
    for s, (size, width) in enumerate(zip(stages, widths)):
      blocks = []
      for i in range(size):
        blocks.append(Block(inplanes, width, 2 if s > 0 and i == 0 else 1, bottleneck))
        inplanes = width * (4 if bottleneck else 1)
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stages)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.fc(x.mean(dim=(2, 3)))


class LeNet(nn.Module):
  """models.LeNet in PyTorch."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
    self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
                              nn.Linear(128, 10))

  def forward(self, x):
    return self.head(self.features(x))


# Cohen et al.'s arch names -> (constructor, normalisation stats, test input side)
ARCHES = {
    "cifar_resnet20": (lambda: ResNet((3, 3, 3), (16, 32, 64), False, 10, False), "cifar10", 32),
    "cifar_resnet110": (lambda: ResNet((18, 18, 18), (16, 32, 64), False, 10, False), "cifar10", 32),
    "resnet50": (lambda: ResNet((3, 4, 6, 3), (64, 128, 256, 512), True, 1000, True), "imagenet", 32),
}
# this package's model names -> constructor
MODELS = {"lenet": LeNet, "resnet20": ARCHES["cifar_resnet20"][0],
          "resnet110": ARCHES["cifar_resnet110"][0], "resnet50": ARCHES["resnet50"][0]}
