"""sprs-jax: anomaly detection with score-based perturbation resilience (SPR).

A score model s(x, t) is trained by denoising score matching on normal images
only. At test time each pixel is perturbed with small Gaussian noise and the
model is asked to undo it. Pixels the model cannot restore are anomalous.
"""

from sprs_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before anything imports JAX's backend: faster convolutions on CPU.
_xla_flags.configure()

# `load`, `Detector` and `Predictions` come from sprs_jax.api, imported on
# first use, so that `import sprs_jax` does not import Flax or TensorFlow.
_API_NAMES = ("load", "Detector", "Predictions")


def __getattr__(name):
  if name in _API_NAMES:
    import importlib
    return getattr(importlib.import_module("sprs_jax.api"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
