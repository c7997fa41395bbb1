"""Every config key, with defaults; the other configs start from this one and change a few."""

import ml_collections

from instars_jax import plugins


def get_config(outside: str = "") -> ml_collections.ConfigDict:
  """The defaults, every plug-in's section included; `outside` (the text after the config
  file's ':', e.g. --config=configs/default.py:my_pkg.my_loss,my_pkg.my_stage): plug-ins
  outside the package, by dotted path, whose sections are added and which config.plugins
  records (instars_jax/plugins.py)."""
  config = ml_collections.ConfigDict()
  config.dataset = "fashion_mnist"  # fashion_mnist | cifar10_jpeg | cifar10 | imagenet2012 | npz:PATH | tfds:NAME
  config.data_dir = ""  # overrides where the dataset is read from
  config.cache_dir = ""  # where decoded datasets are cached (default ~/.cache/instars_jax)
  config.num_classes = 0  # 0: inferred from the labels
  # Images of folder:, array_record: and TFDS sources are resized (shorter side to
  # image_size·256/224) and centre-cropped to image_size; 0: as stored (all one size).
  config.image_size = 0
  config.corrupt_images = "fail"  # fail | skip: an unreadable image is replaced by the next one
  # Each data source's own settings, sources.<module>, from the DEFAULTS of its module in
  # instars_jax/data/ (tfds: the TFDS splits read as training and test sets); added below.
  config.sources = ml_collections.ConfigDict()
  # The input pipeline on grain (instars_jax/data/pipeline.py); none of these changes the batches.
  config.input = ml_collections.ConfigDict()
  config.input.workers = 0  # processes decoding and augmenting training batches (0: the trainer)
  config.input.threads = 2  # threads per process reading ahead
  config.input.prefetch = 4  # batches read ahead
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() (multi-host TPU/GPU)

  config.model = ml_collections.ConfigDict()
  config.model.name = "lenet"  # lenet | resnet20 | resnet110 | resnet50
  config.model.dtype = "float32"  # float32 | bfloat16

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 10
  # A share of the training set that no stage trains on (a fixed draw by seed), where the
  # selection settings (certify.thresholded.threshold, certify.cascade.threshold, ...) are
  # tuned: certify.split=holdout certifies it, and python -m instars_jax.tune sweeps τ there.
  config.train.holdout = 0.0
  config.train.examples = 0  # train on this many of the rest (a fixed draw by seed); 0: all
  config.train.batch_size = 256
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 1e-4
  config.train.schedule = "cosine"  # cosine | step
  config.train.lr_decay_epochs = (30, 60)  # for schedule = step
  config.train.lr_decay_factor = 0.1
  config.train.warmup_epochs = 0.0  # linear learning-rate warm-up before the schedule
  config.train.grad_clip = 0.0  # global gradient-norm clip; 0: none
  config.train.sigma = 0.25  # Gaussian augmentation noise level
  # The training loss, a module of instars_jax/train/losses/ (gaussian | consistency | macer |
  # smoothadv | stability); each module's settings are the section train.<loss>. Its `preset`
  # (mnist | cifar10 | imagenet) fills the settings its paper used at train.sigma where they
  # are None (unset); an unset key without a preset takes the module's default (its DEFAULTS,
  # whose sources its docstring cites). `batching`: split (each SGD step B/m examples with m
  # noise copies, the references') | whole (B examples with m copies: m times fewer updates).
  # A loss outside the package: its dotted path (its section: get_config's `outside`).
  config.train.loss = "gaussian"
  config.train.augment = "none"  # none | crop_flip | random_resized_crop (instars_jax/data/augment.py)
  config.train.eval_examples = 0  # test examples evaluated after each epoch; 0: all
  # Besides every epoch end, a checkpoint every this many global steps (0: none; only the
  # latest of them is kept), so a hard kill loses at most that many; SIGTERM/SIGINT always
  # checkpoint the step they stop at.
  config.train.checkpoint_every_steps = 0
  # Divergence stops (training.DivergenceWatch): a non-finite loss, or (after the first
  # epoch) a mean loss over `chance_steps` steps at or above chance_fraction x ln(classes),
  # ends the run with an error; the last checkpoint stays the last good one.
  config.train.divergence = ml_collections.ConfigDict()
  config.train.divergence.nonfinite = True
  config.train.divergence.chance_steps = 200  # 0: no check for a loss stuck at chance
  config.train.divergence.chance_fraction = 0.98
  # Insta-RS Train: stage 1 is Gaussian augmentation; in stage 2 every training example
  # trains at its own σ, the grid σ where the table's radius profile of it is best
  # (instars_jax/train/sigma_table.py), re-estimated between epochs.
  config.train.insta = False
  config.train.stage1_epochs = 0  # E1: the first stage-2 epoch
  config.train.stage1_noise = "sigma"  # sigma: train.sigma | grid: a grid σ per example and step
  config.train.table = ml_collections.ConfigDict()
  config.train.table.grid = (0.25, 0.5, 1.0)  # the σ an example can train at (and the estimator's)
  config.train.table.samples = 4  # m: noise vectors per example, shared by every grid σ
  config.train.table.update_every = 1  # epochs between updates in stage 2
  # Share of the training split one update visits (a rotating slice; 1: all of it). An update
  # costs K x samples forward passes per visited example.
  config.train.table.fraction = 1.0
  config.train.table.chunk = 256  # training examples per update step (all devices)
  # Share of stage-2 examples (drawn per example and step) trained at a random grid σ instead
  # of their table σ, so the base model stays good at every σ an estimator may pick.
  config.train.table.explore = 0.0
  # The CERTIFY sample count and failure probability the table's radii assume (and the
  # σ-estimator's labels): training's own, so a certification setting never changes training.
  config.train.table.n = 100_000
  config.train.table.alpha = 0.001


  config.certify = ml_collections.ConfigDict()
  config.certify.sigma = ml_collections.config_dict.placeholder(float)  # None: train.sigma
  config.certify.n0 = 100
  config.certify.n = 100_000
  config.certify.alpha = 0.001
  config.certify.skip = 1  # certify every skip-th test image ...
  config.certify.max = -1  # ... with index below max (-1: all)
  config.certify.batch = 400  # noisy images per forward pass on one device
  config.certify.instances = 8  # test images sharing each forward pass, per device
  # fixed: n estimation samples per image | sequential: up to n, stopping early with an
  # anytime-valid bound (instars_jax/smoothing/sequential/): with radii empty, once the radius is
  # within a factor (1 - tolerance) of the best still reachable; else once "radius >= r" is
  # decided for every r in radii (the radius written is the largest r proven).
  config.certify.sampling = "fixed"
  config.certify.tolerance = 0.05
  # The level of the upper bound on p_A that only stops sampling: radius mode's "best still
  # reachable" radius, and decision mode's giving up a radius no continuation could prove,
  # assume p_A below it (0.05: they hold with 95% confidence). 0: alpha, so they hold as
  # surely as the certificate, and sampling runs longer; the certificate never changes.
  config.certify.tolerance_alpha = 0.05
  config.certify.radii = ()
  config.certify.name = ""  # output DIR/certify/<name>.tsv; default sigma_<sigma> / the kind's own
  # σ experts: one fixed-σ run per train.table.grid σ, smallest first, commas between (e.g.
  # runs/cohen_0.25,runs/cohen_0.5,runs/cohen_1.0); the class test at σ_k uses expert k
  # (instars_jax/selection/experts.py). Empty: this run's model at every σ. Default file names gain
  # "_experts".
  config.certify.experts = ""
  config.certify.split = "test"  # test | holdout (the training examples train.holdout kept out)
  # fixed: certify.sigma for all | grid: fixed σ at every σ of train.table.grid in one process,
  # a results file each and one table with the label oracle over them | instance: a σ per
  # input, by certify.certificate
  config.certify.sigma_mode = "fixed"

  # With sigma_mode = instance, the kind: a module of instars_jax/certificates/, by its file
  # name, or any module by its dotted path: locally_constant (sound: σ from the smoothed
  # σ-estimator; needs train.estimator.epochs > 0 at training) | router (sound: σ from a tree of
  # binary estimators; needs train.estimator.router = True at training) | thresholded (sound: the
  # router's nodes as a chain that moves an input lower only where its probability of
  # "lower" is at least certify.thresholded.threshold; tune it with python -m
  # instars_jax.tune) | cascade (sound: cascaded smoothing over the grid, no estimator) |
  # memory (sound for one fixed query order) | per_sigma (Insta-RS as published: NOT a
  # certificate of the input-dependent classifier).
  config.certify.certificate = "locally_constant"

  # Every plug-in's own section, from the DEFAULTS of its module (instars_jax/plugins.py):
  # sources.<source>; train.<loss> (each loss's); train.<stage> (the training stages':
  # train.estimator, the σ-estimators', and train.finetune); certify.<kind> (estimator:
  # locally_constant, router and thresholded; thresholded; cascade; search: per_sigma, memory).
  plugins.add_sections(config, [m for m in outside.split(",") if m])
  # The σ-estimators train with a loss of their own (train.estimator.loss), whose settings
  # are train.estimator.<loss>: the loss's defaults without a preset, and the estimators' own
  # (sigma_estimators.LOSS_DEFAULTS).
  for name in plugins.names(plugins.LOSSES) + plugins.outside(plugins.LOSSES, config.plugins):
    section = plugins.section_name(plugins.LOSSES, name)
    if section in config.train.estimator:
      raise ValueError(f"the loss {name} declares the section {section}, a setting of "
                       "train.estimator: name its SECTION otherwise")
    config.train.estimator[section] = ml_collections.ConfigDict(
        plugins.stage_loss_section("sigma_estimators", name))
  return config


def cohen_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Cohen et al.'s (2019) schedule and certification settings, shared by their CIFAR-10 and
  ImageNet recipes: 90 epochs, SGD lr 0.1 x0.1 every 30 epochs, momentum 0.9, weight decay
  1e-4; certify with N0 = 100, N = 100,000, alpha = 0.001."""
  config.train.update(epochs=90, learning_rate=0.1, schedule="step", lr_decay_epochs=(30, 60),
                      lr_decay_factor=0.1, momentum=0.9, weight_decay=1e-4)
  config.certify.update(n0=100, n=100_000, alpha=0.001, batch=400)
  return config
