"""Tests for dakd_jax/data/records.py: 16-bit grey images, and the warning line naming the
identities a split cannot use (with the dataset summary printed at preparation)."""
import io

import numpy as np
from PIL import Image

from dakd_jax.data import prepare
from dakd_jax.data import records
from dakd_jax.data import specs
from dakd_jax.data import tfds_builders
from dakd_jax.data.records import INFRARED, VISIBLE, ImageRecord
from tests.test_readers import write_sysu

# 16-bit grey levels and the 8-bit levels they are: v / 257 rounded (65535 -> 255).
SIXTEEN_BIT = np.array([[0, 128, 257, 32896], [40000, 65278, 65407, 65535]], np.uint16)
EIGHT_BIT = np.array([[0, 0, 1, 128], [156, 254, 255, 255]], np.uint8)


def test_sixteen_bit_grey_png_becomes_its_eight_bit_levels(tmp_path):
  path = str(tmp_path / "thermal.png")
  Image.fromarray(SIXTEEN_BIT).save(path)
  with Image.open(path) as image:
    assert image.mode in ("I;16", "I")  # what Pillow decodes a 16-bit grey PNG to
  loaded = records.load_image(path, 2, 4)
  assert loaded.dtype == np.uint8 and loaded.shape == (2, 4, 3)
  for channel in range(3):
    np.testing.assert_array_equal(loaded[..., channel], EIGHT_BIT)


def test_mode_i_images_are_read_as_sixteen_bit_data():
  image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
  assert image.mode == "I"
  np.testing.assert_array_equal(np.asarray(records._to_rgb(image))[..., 1], EIGHT_BIT)
  # 8-bit images are untouched.
  grey = Image.fromarray(EIGHT_BIT)
  np.testing.assert_array_equal(np.asarray(records._to_rgb(grey))[..., 2], EIGHT_BIT)


def record(identity, modality):
  camera = 1 if modality == VISIBLE else 3
  return ImageRecord(f"/d/cam{camera}/{identity:04d}/1.jpg", identity, camera, modality)


def test_coverage_warning_names_the_unusable_identities():
  train = [record(1, VISIBLE), record(1, INFRARED), record(2, VISIBLE), record(7, INFRARED)]
  assert records.coverage_warning(train, [1, 2, 3, 7], "Set train", is_training=True) == (
      "dakd_jax: warning: Set train: 2 identities with images in one modality only [2, 7], "
      "1 identity with no image [3]; they are never sampled (check their folders)")
  # A test split: one modality is ordinary there; an identity without images is not.
  assert records.coverage_warning(train, [1, 2, 7, 9], "Set test", is_training=False) == (
      "dakd_jax: warning: Set test: 1 identity with no image [9]; it is in no query or gallery "
      "(check their folders)")
  assert records.coverage_warning(train[:2], [1], "Set train", is_training=True) is None
  assert records.coverage_warning(train[:2], None, "Set test", is_training=False) is None


def test_summary_at_preparation_warns_once_per_split_with_the_ids(tmp_path):
  """SYSU-MM01 on disk: train identity 3 and test identity 8 are listed but their folders are
  empty, identity 2 has visible images only, 7 infrared only."""
  layout = {(1, 1): ["0001.jpg"], (1, 3): ["0001.jpg"], (2, 1): ["0001.jpg", "0002.jpg"],
            (3, 1): [], (3, 3): [], (7, 6): ["0001.jpg"],
            (4, 2): ["0001.jpg"], (4, 6): ["0001.jpg"], (8, 3): []}
  root = str(write_sysu(tmp_path / "SYSU-MM01", layout, {
      "train_id.txt": "1,2,3", "val_id.txt": "7", "test_id.txt": "4,8"}))
  split_records = tfds_builders.read_split_records("sysu_mm01", root, None)
  stream = io.StringIO()
  prepare._summarise(specs.SYSU_MM01, root, None, split_records, stream)
  warnings = [line for line in stream.getvalue().splitlines() if "warning" in line]
  assert warnings == [
      "dakd_jax: warning: SYSU-MM01 train: 2 identities with images in one modality only "
      "[2, 7], 1 identity with no image [3]; they are never sampled (check their folders)",
      "dakd_jax: warning: SYSU-MM01 test: 1 identity with no image [8]; it is in no query or "
      "gallery (check their folders)"]
  text = stream.getvalue()
  assert text.count(f"SYSU-MM01 train ({root})\n") == 1
  assert text.count(f"SYSU-MM01 test ({root})\n") == 1
