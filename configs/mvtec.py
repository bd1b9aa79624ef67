"""MVTec AD with the published SPR recipe (see ``base.py``).

Usage: ``python run.py --config=configs/mvtec.py:bottle
--config.data.manual_dir=/path/to/mvtec_anomaly_detection``; ``:all`` runs
the 15 categories one after the other.
"""

from configs import base


def get_config(category: str | None = None):
  """Returns the SPR recipe for one MVTec AD category (or "all")."""
  config = base.get_base_config()
  config.data.name = "mvtec_ad"
  config.data.category = category or "bottle"
  return config
