"""``spr_textures``: a small anomaly data set made from real photographs.

Built offline from the texture photographs that scikit-image ships (see
``synthesis.py`` for the splits and defect kinds), in the same features as
``mvtec_ad``: 160 training images and 100 test images (40 normal, 60 with
defects) of 128 x 128 pixels per category.
"""

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from tfds_builders import features
from tfds_builders.spr_textures import synthesis

# brick is a regular texture; gravel and grass are irregular (stochastic).
CATEGORIES = tuple(sorted(synthesis.PHOTOGRAPHS))


class SprTextures(tfds.core.GeneratorBasedBuilder):
  """Texture photographs with painted defects and exact masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Brick, gravel and grass from scikit-image."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=name, description=f"scikit-image's {name}")
      for name in CATEGORIES
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=features.anomaly_features(),
        supervised_keys=None,
        homepage="https://scikit-image.org/docs/stable/api/skimage.data.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything comes from installed packages.
    examples = list(synthesis.generate_category(self.builder_config.name))
    return {
        split: self._generate_examples(
            [example for example in examples if example[0] == split])
        for split in ("train", "test")
    }

  def _generate_examples(self, examples):
    for split, defect_type, index, image, mask in examples:
      file_name = f"{split}/{defect_type}/{index:03d}.png"
      mask_image = mask.astype(np.uint8)[..., None] * 255
      yield file_name, {
          "image": PIL.Image.fromarray(image),
          "mask": PIL.Image.fromarray(mask_image[..., 0]),
          "label": int(defect_type != "good"),
          "defect_type": defect_type,
          "file_name": file_name,
      }
