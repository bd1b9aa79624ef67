"""The feature spec shared by every anomaly-detection builder.

Each example is one photograph of a product with its pixel-level ground truth:

* ``image``: uint8 RGB, [H, W, 3]. Grayscale sources are repeated to 3 channels.
* ``mask``: uint8, [H, W, 1], 255 where the pixel is anomalous and 0 elsewhere.
  Normal images carry an all-zero mask.
* ``label``: 0 for a normal ("good") image, 1 for an anomalous one.
* ``defect_type``: the defect folder name, ``"good"`` for normal images in
  every data set, also where their folder has another name (``ok`` in BTAD).
* ``file_name``: the image path relative to the category folder, for example
  ``"test/crack/000.png"``.

Images are given to TFDS as PIL images, so building needs no TensorFlow.
"""

import tensorflow_datasets as tfds

LABEL_NAMES = ("good", "anomalous")

# The defect_type of normal images.
NORMAL_DEFECT_TYPE = "good"


def anomaly_features() -> tfds.features.FeaturesDict:
  """Returns the FeaturesDict described in this module's docstring."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "mask": tfds.features.Image(shape=(None, None, 1)),
      "label": tfds.features.ClassLabel(names=LABEL_NAMES),
      "defect_type": tfds.features.Text(),
      "file_name": tfds.features.Text(),
  })
