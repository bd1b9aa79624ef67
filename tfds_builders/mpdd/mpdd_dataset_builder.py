"""MPDD (Metal Parts Defect Detection) as a TFDS data set.

Built from a manually downloaded copy, with one BuilderConfig per category,
the splits and checks of `tfds_builders.folder_builder` and the folder rules
of `tfds_builders.mvtec_layout`. MPDD uses the folder names of MVTec AD.
"""

from etils import epath
import tensorflow_datasets as tfds

from tfds_builders import folder_builder
from tfds_builders import layout
from tfds_builders import mvtec_layout

CATEGORIES = (
    "bracket_black",
    "bracket_brown",
    "bracket_white",
    "connector",
    "metal_plate",
    "tubes",
)

# The authors' page, which links the download.
HOMEPAGE = "https://github.com/stepanje/MPDD"

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
    dataset_name="MPDD", layout=LAYOUT, download_url=HOMEPAGE
)

CATEGORY_LAYOUT = mvtec_layout.CategoryLayout(
    guide=GUIDE,
    categories=CATEGORIES,
    normal_dir="good",
    mask_name_format="{stem}_mask.png",
)

_CITATION = """\
@inproceedings{jezek2021mpdd,
  title={Deep learning-based defect detection of metal parts: evaluating
         current methods in complex conditions},
  author={Jezek, Stepan and Jonak, Martin and Burget, Radim and Dvorak, Pavel
          and Skotak, Milos},
  booktitle={13th International Congress on Ultra Modern Telecommunications
             and Control Systems and Workshops (ICUMT)},
  pages={66--71},
  year={2021},
  doi={10.1109/ICUMT54235.2021.9631567}
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


class Mpdd(folder_builder.CategoryFolderBuilder):
  """MPDD, one BuilderConfig per category, splits `train` and `test`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = folder_builder.category_configs(CATEGORIES)
  CATEGORY_LAYOUT = CATEGORY_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download MPDD through the link on {HOMEPAGE} (see that page for the
terms of use), unpack it and pass the folder that contains the category
folders as manual_dir. It must have this layout:

{LAYOUT}"""

  def _info(self) -> tfds.core.DatasetInfo:
    return folder_builder.dataset_info(
        self,
        description=(
            "MPDD (Metal Parts Defect Detection): metal parts from "
            "industrial manufacturing with pixel-level annotations of "
            "defects. Training images are normal only."
        ),
        homepage=HOMEPAGE,
        citation=_CITATION,
    )
