"""MVTec AD as a TFDS data set, built from a manually downloaded copy.

One BuilderConfig per category, with the splits and checks of
`tfds_builders.folder_builder` and the folder rules of
`tfds_builders.mvtec_layout`.
"""

from etils import epath
import tensorflow_datasets as tfds

from tfds_builders import folder_builder
from tfds_builders import layout
from tfds_builders import mvtec_layout

CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

HOMEPAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

LAYOUT = f"""\
<manual_dir>/
  <category>/                      one of {layout.format_choices(CATEGORIES)}
    train/good/*.png               normal training images
    test/good/*.png                normal test images
    test/<defect>/*.png            anomalous test images, one folder per defect
    ground_truth/<defect>/<name>_mask.png
                                   mask of test/<defect>/<name>.png, non-zero
                                   pixels are anomalous (<name>.png and .bmp
                                   masks are read too)
"""

GUIDE = layout.LayoutGuide(
    dataset_name="MVTec AD", layout=LAYOUT, download_url=HOMEPAGE
)

CATEGORY_LAYOUT = mvtec_layout.CategoryLayout(
    guide=GUIDE,
    categories=CATEGORIES,
    normal_dir="good",
    mask_name_format="{stem}_mask.png",
)

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={{MVTec AD} -- A Comprehensive Real-World Dataset for Unsupervised
         Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and
          Steger, Carsten},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition
             (CVPR)},
  year={2019}
}
"""


def index_category(
    manual_dir: epath.PathLike, category: str
) -> mvtec_layout.CategoryIndex:
  """Checks the folder of `category` under `manual_dir` and lists its images.

  Raises:
    DatasetLayoutError: if `category` is unknown or the folder does not match
      `LAYOUT`. The message names the path or value at fault.
  """
  return mvtec_layout.index_category(manual_dir, category, CATEGORY_LAYOUT)


class MvtecAd(folder_builder.CategoryFolderBuilder):
  """MVTec AD, one BuilderConfig per category, splits `train` and `test`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = folder_builder.category_configs(CATEGORIES)
  CATEGORY_LAYOUT = CATEGORY_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download MVTec AD from {HOMEPAGE} (free registration, license
CC BY-NC-SA 4.0), unpack the archive and pass the unpacked folder as
manual_dir. It must have this layout:

{LAYOUT}"""

  def _info(self) -> tfds.core.DatasetInfo:
    return folder_builder.dataset_info(
        self,
        description=(
            "MVTec AD: industrial products with pixel-level annotations of "
            "surface defects. Training images are normal only."
        ),
        homepage=HOMEPAGE,
        citation=_CITATION,
        license="CC BY-NC-SA 4.0",
    )
