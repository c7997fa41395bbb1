"""The sound instance-wise recipe of configs/fashion_mnist_sound.py on the JPEG re-encoded
CIFAR-10 of ../shared (issue 38), with Cohen et al.'s three σ as the grid:

    python train.py --config=configs/cifar10_sound.py --workdir=DIR \
        --config.data_dir=../shared/data/cifar10-jpeg-q75.tar.xz
    python certify.py --workdir=DIR             # the sound row: thresholded, τ tuned
    python certify.py --workdir=DIR --config.certify.sigma_mode=fixed   # σ = 1.0 expert
    python certify.py --workdir=DIR/experts/sigma_0.5                   # σ = 0.5 expert
    python certify.py --workdir=DIR/experts/sigma_0.25                  # σ = 0.25 expert

Stages of the one train.py run, each resuming after SIGTERM or kill -9:
1. base: ResNet-20 (configs/cifar10_small.py's recipe, 15 epochs) at σ = 1.0, the grid's top
   expert, on 90% of the training set (10% held out, seed 0, for the selector and τ);
2. sigma_experts: the σ = 0.25 and σ = 0.5 experts, runs of their own in DIR/experts/;
3. sigma_estimators: two router nodes (σ = 1.0 against the lower σ, σ = 0.5 against 0.25),
   labelled by the three experts' radius profiles (label_samples noise vectors per σ,
   n = 10,000), gain-weighted and bin-balanced, initialised from the base model, 2 epochs;
4. tune_threshold: τ of the thresholded chain on the held-out examples (every 20th: 250).

Full size wants an accelerator (the labels' profile pass alone is 45,000 × 100 × 3 ResNet-20
passes). A CPU cannot size it down usefully: on a 2-core Zen 3, ResNet-20 trains at about 35
images/s, and a run with --config.train.examples=5000 --config.train.epochs=6
--config.train.estimator.epochs=1 --config.train.estimator.label_samples=16
--config.certify.n=1000 --config.certify.skip=50 (16 min an expert beside another job) gave
experts at 21–31% noisy accuracy and 234 of 5,000 training examples with any positive radius
to label the nodes by (docs/results.md).
"""

from configs import cifar10_small
from configs.fashion_mnist_sound import sound_recipe

EXPERTS = "{workdir}/experts/sigma_0.25,{workdir}/experts/sigma_0.5,{workdir}"  # grid order


def get_config(outside: str = ""):  # outside plug-ins: configs/default.get_config
  return sound_recipe(cifar10_small.get_config(outside), (0.25, 0.5, 1.0), EXPERTS)
