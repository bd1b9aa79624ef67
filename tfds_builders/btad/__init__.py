"""TFDS builder for BTAD, read from a manually downloaded copy."""
