"""MPDD with the published SPR recipe of ``base.py``, unchanged.

Usage: ``python run.py --config=configs/mpdd.py:bracket_black
--config.data.manual_dir=/path/to/mpdd``; ``:all`` runs the 6 categories one
after the other.
"""

from configs import base


def get_config(category: str | None = None):
  """Returns the SPR recipe for one MPDD category (or "all")."""
  config = base.get_base_config()
  config.data.name = "mpdd"
  config.data.category = category or "bracket_black"
  return config
