"""A TFDS builder base for data sets in the MVTec AD folder layout.

A subclass sets `CATEGORY_LAYOUT`, `VERSION`, `BUILDER_CONFIGS` (one per
category, see `category_configs`) and `MANUAL_DOWNLOAD_INSTRUCTIONS`, and
returns `dataset_info(...)` from `_info`. The `train` split contains the
normal training images and the `test` split the normal and anomalous test
images with their masks.

The whole category folder is checked (file lists and image headers) before
TFDS writes anything, so a broken copy fails fast with a `DatasetLayoutError`.
Building needs no TensorFlow, since images are given to TFDS as PIL images.
"""

from collections.abc import Iterable
from typing import ClassVar, Iterator

from etils import epath
import tensorflow_datasets as tfds

from tfds_builders import features
from tfds_builders import layout
from tfds_builders import mvtec_layout


def category_configs(
    categories: Iterable[str],
) -> list[tfds.core.BuilderConfig]:
  """Returns one BuilderConfig per category, named after it."""
  return [
      tfds.core.BuilderConfig(
          name=category, description=f"Category {category}."
      )
      for category in categories
  ]


def dataset_info(
    builder: tfds.core.DatasetBuilder,
    *,
    description: str,
    homepage: str,
    citation: str,
    license: str | None = None,  # pylint: disable=redefined-builtin
) -> tfds.core.DatasetInfo:
  """Returns the DatasetInfo of a builder with the features of `features`.

  The metadata stores "manual_dir", the folder the prepared copy was built
  from.
  """
  # `dataset_info_from_configs` needs the builder to sit in a TFDS package
  # folder, so the DatasetInfo is built directly.
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=features.anomaly_features(),
      homepage=homepage,
      citation=citation,
      license=license,
      metadata=tfds.core.MetadataDict(),
  )


class CategoryFolderBuilder(
    tfds.core.GeneratorBasedBuilder, skip_registration=True
):
  """Builds one category of a data set in the MVTec AD folder layout."""

  CATEGORY_LAYOUT: ClassVar[mvtec_layout.CategoryLayout]

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._category_index: mvtec_layout.CategoryIndex | None = None

  def download_and_prepare(
      self,
      *,
      download_dir: epath.PathLike | None = None,
      download_config: tfds.download.DownloadConfig | None = None,
      **kwargs,
  ) -> None:
    """Checks the category folder, then builds the data set with TFDS.

    The check runs only when something will be generated, and before TFDS
    writes to data_dir. Without `download_config.manual_dir`, TFDS's default
    <download_dir>/manual is read.

    Raises:
      DatasetLayoutError: if the folder breaks a rule of `mvtec_layout`.
    """
    download_config = download_config or tfds.download.DownloadConfig()
    mode = tfds.download.GenerateMode(download_config.download_mode)
    if not self.is_prepared() or mode.overwrite_dataset:
      manual_dir = download_config.manual_dir or (
          epath.Path(download_dir or self.data_dir_root / "downloads")
          / "manual"
      )
      self._category_index = self._index_category(manual_dir)

    super().download_and_prepare(
        download_dir=download_dir, download_config=download_config, **kwargs
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = dl_manager.manual_dir
    index = self._category_index
    if index is None or index.manual_dir != layout.normalize_dir(manual_dir):
      index = self._index_category(manual_dir)

    self.info.metadata["manual_dir"] = index.manual_dir
    return {
        "train": self._generate_examples(index.train),
        "test": self._generate_examples(index.test),
    }

  def _generate_examples(
      self, records: list[mvtec_layout.ImageRecord]
  ) -> Iterator[tuple[str, dict[str, object]]]:
    guide = self.CATEGORY_LAYOUT.guide
    for record in records:
      yield record.file_name, mvtec_layout.load_example(record, guide)

  def _index_category(
      self, manual_dir: epath.PathLike
  ) -> mvtec_layout.CategoryIndex:
    return mvtec_layout.index_category(
        manual_dir, self.builder_config.name, self.CATEGORY_LAYOUT
    )
