"""TFDS builder for MVTec AD, read from a manually downloaded copy."""
