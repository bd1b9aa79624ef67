"""TFDS builders for the anomaly-detection data sets that sprs-jax reads."""
