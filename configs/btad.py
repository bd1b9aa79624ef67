"""BTAD with the published SPR recipe of ``base.py``, unchanged.

Usage: ``python run.py --config=configs/btad.py:01
--config.data.manual_dir=/path/to/btad``; ``:all`` runs the products 01, 02
and 03 one after the other.

Images are resized to squares of ``data.image_size`` pixels without a crop,
so product 03 (800 x 600 pixels) changes its aspect ratio.
"""

from configs import base


def get_config(category: str | None = None):
  """Returns the SPR recipe for one BTAD product (or "all")."""
  config = base.get_base_config()
  config.data.name = "btad"
  config.data.category = category or "01"
  return config
