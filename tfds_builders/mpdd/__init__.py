"""TFDS builder for MPDD, read from a manually downloaded copy."""
