"""BTAD (beanTech Anomaly Detection) as a TFDS data set.

Built from a manually downloaded copy, with one BuilderConfig per product
("01", "02", "03"), the splits and checks of `tfds_builders.folder_builder`
and the folder rules of `tfds_builders.mvtec_layout`.

BTAD names its folders of normal images ok/ and of anomalous images ko/.
The examples still follow `tfds_builders.features`: normal images get the
defect_type "good" and anomalous ones "ko".

Images are BMP in some products and PNG in others, and masks may be either,
independently of their image. Images are stored at their original size,
which is not square for product 03 (800 x 600 pixels). The input pipeline
resizes them to a square.
"""

from etils import epath
import tensorflow_datasets as tfds

from tfds_builders import folder_builder
from tfds_builders import layout
from tfds_builders import mvtec_layout

CATEGORIES = ("01", "02", "03")

# The authors' page, which describes the data set and links the archive.
HOMEPAGE = "https://github.com/pankajmishra000/VT-ADL"
DOWNLOAD_URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip"

LAYOUT = f"""\
<manual_dir>/
  <product>/                       one of {layout.format_choices(CATEGORIES)}
    train/ok/*.bmp|png             normal training images
    test/ok/*.bmp|png              normal test images
    test/ko/*.bmp|png              anomalous test images
    ground_truth/ko/<name>.png|bmp mask of test/ko/<name>.<ext>, non-zero
                                   pixels are anomalous (<name>_mask.png and
                                   .bmp masks are read too)
"""

GUIDE = layout.LayoutGuide(
    dataset_name="BTAD", layout=LAYOUT, download_url=DOWNLOAD_URL
)

CATEGORY_LAYOUT = mvtec_layout.CategoryLayout(
    guide=GUIDE,
    categories=CATEGORIES,
    normal_dir="ok",
    mask_name_format="{stem}.png",
)

_CITATION = """\
@inproceedings{mishra2021vtadl,
  title={{VT-ADL}: A Vision Transformer Network for Image Anomaly Detection
         and Localization},
  author={Mishra, Pankaj and Verk, Riccardo and Fornasier, Daniele and
          Piciarelli, Claudio and Foresti, Gian Luca},
  booktitle={30th IEEE/IES International Symposium on Industrial Electronics
             (ISIE)},
  year={2021}
}
"""


def index_category(
    manual_dir: epath.PathLike, category: str
) -> mvtec_layout.CategoryIndex:
  """Checks the folder of product `category` and lists its images.

  Raises:
    DatasetLayoutError: if `category` is unknown or the folder does not match
      `LAYOUT`. The message names the path or value at fault.
  """
  return mvtec_layout.index_category(manual_dir, category, CATEGORY_LAYOUT)


class Btad(folder_builder.CategoryFolderBuilder):
  """BTAD, one BuilderConfig per product, splits `train` and `test`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = folder_builder.category_configs(CATEGORIES)
  CATEGORY_LAYOUT = CATEGORY_LAYOUT
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download BTAD from
{DOWNLOAD_URL}
(described at {HOMEPAGE}, license CC BY-SA 4.0), unpack
the archive and pass the folder that contains 01/, 02/ and 03/ as manual_dir.
It must have this layout:

{LAYOUT}"""

  def _info(self) -> tfds.core.DatasetInfo:
    return folder_builder.dataset_info(
        self,
        description=(
            "BTAD (beanTech Anomaly Detection): three industrial products "
            "with pixel-level annotations of surface defects. Training images "
            "are normal only."
        ),
        homepage=HOMEPAGE,
        citation=_CITATION,
        license="CC BY-SA 4.0",
    )
