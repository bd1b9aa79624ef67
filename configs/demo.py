"""The embedded demo data set (``spr_textures``) with a 2-core CPU recipe.

Usage: ``python run.py --config=configs/demo.py`` (brick),
``--config=configs/demo.py:gravel`` or ``--config=configs/demo.py:all``.

The recipe differs from the paper's only through config fields, so it can be
applied to any data set with the same ``--config.x=y`` overrides.
"""

from configs import base


def get_config(category: str | None = None):
  """Returns the CPU recipe for one spr_textures category (or "all")."""
  config = base.get_base_config()
  config.data.name = "spr_textures"
  config.data.category = category or "brick"
  config.data.image_size = 64

  config.model.widths = (32, 64, 128, 256, 256)

  config.training.num_epochs = 30
  config.training.lr_decay_epochs = ()
  config.training.t_max = 0.2
  config.training.log_every_steps = 20
  config.training.checkpoint_every_steps = 200

  config.eval.noise_levels = (1e-3, 1e-2)
  config.eval.batch_size = 20
  return config
