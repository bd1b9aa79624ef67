"""sprs-jax: anomaly detection with score-based perturbation resilience (SPR).

A score model s(x, t) is trained by denoising score matching on normal images
only. At test time each pixel is perturbed with small Gaussian noise and the
model is asked to undo it. Pixels the model cannot restore are anomalous.
"""

__version__ = "0.1.0"
