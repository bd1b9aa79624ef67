"""Fields shared by every configuration, set to the published SPR recipe.

The recipe is that of Shin et al., "Anomaly Detection using Score-based
Perturbation Resilience", ICCV 2023, and of the authors' PyTorch release.

The data-set configs (``mvtec.py``, ``btad.py``, ``mpdd.py``, ``demo.py``)
start from ``get_base_config`` and change only what differs. Every field can
be overridden on the command line, for example
``--config.training.num_epochs=10``.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the published SPR recipe with no data set selected."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # TFDS builder name (a key of input_pipeline.BUILDERS, such as "mvtec_ad")
  # and BuilderConfig name.
  config.data.name = ""
  config.data.category = ""
  # Folder with the unpacked data set, in the layout the builder documents.
  config.data.manual_dir = ""
  # Where TFDS stores the prepared array_record files ("" = TFDS's default,
  # ~/tensorflow_datasets, or $TFDS_DATA_DIR).
  config.data.data_dir = ""
  # Side in pixels of the square images given to the score model.
  config.data.image_size = 192

  config.model = ml_collections.ConfigDict()
  # Channels per U-Net level, from the input resolution down.
  config.model.widths = (64, 128, 256, 512, 512)
  config.model.num_groups = 32
  config.model.embed_dim = 256
  config.model.fourier_scale = 30.0
  # Compute dtype of the convolutions: "float32" or "bfloat16" (params stay
  # float32 either way).
  config.model.dtype = "float32"

  config.sde = ml_collections.ConfigDict()
  # VE SDE: sigma(t) = sqrt((sigma_max^(2t) - 1) / (2 ln sigma_max)).
  config.sde.sigma_max = 25.0

  config.training = ml_collections.ConfigDict()
  config.training.num_epochs = 3000
  # Global batch size, split evenly over all devices of all processes.
  config.training.batch_size = 16
  config.training.learning_rate = 1e-4
  # Linear warm-up from 0 to learning_rate over this many steps (0 = none).
  config.training.warmup_steps = 0
  # "piecewise": multiplied by lr_decay_factor at each of lr_decay_epochs.
  # "cosine": decays to 0 at the last step.
  config.training.lr_schedule = "piecewise"
  config.training.lr_decay_epochs = (1000, 2000)
  config.training.lr_decay_factor = 0.1
  config.training.weight_decay = 1e-3
  config.training.ema_decay = 0.9999
  # Diffusion times drawn uniformly from [t_min, t_max] for each training image.
  config.training.t_min = 1e-5
  config.training.t_max = 1.0
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 1000
  # Checkpoints kept in <workdir>/<category>/checkpoints.
  config.training.max_checkpoints = 2

  config.eval = ml_collections.ConfigDict()
  # Diffusion times t at which the perturbation resilience is measured. The
  # resilience maps of all levels are averaged.
  config.eval.noise_levels = (1e-3,)
  # Noise draws per image and noise level.
  config.eval.num_draws = 3
  config.eval.batch_size = 16
  # Heat maps and masks are compared at heatmap_size x heatmap_size pixels.
  config.eval.heatmap_size = 256
  # Side of the mean filter applied to the heat map, in heat-map pixels.
  config.eval.filter_size = 31
  # Number of test images drawn as PNG panels (input | ground truth | overlay).
  config.eval.num_panels = 12
  return config
