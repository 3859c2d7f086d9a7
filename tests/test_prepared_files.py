"""A damaged prepared copy (a truncated or missing file) is found before it is read and
prepared again (dakd_jax/data/prepared_files.py, tfds_builders.prepare)."""
import glob
import os
import sys
import zlib

import numpy as np

from dakd_jax.data import prepared_files
from dakd_jax.data import tfds_builders
from dakd_jax.data.records import load_image
from tests.test_tfds_builders import HEIGHT, WIDTH, write_dataset


def test_the_signature_reads_both_ends_of_a_file(tmp_path):
  path = tmp_path / "f"
  data = bytes(range(256)) * 1024  # 256 KiB: the middle is not read
  path.write_bytes(data)
  expected = zlib.crc32(data[-65536:], zlib.crc32(data[:65536]))
  assert prepared_files.file_signature(str(path)) == {"size": len(data), "crc32": expected}
  small = tmp_path / "g"
  small.write_bytes(b"abc")
  assert prepared_files.file_signature(str(small)) == {"size": 3, "crc32": zlib.crc32(b"abc")}
  # A change in the middle is not seen (the price of reading 128 KiB a file); at an end it is.
  prepared_files.record_files(str(tmp_path))
  path.write_bytes(data[:100_000] + b"x" + data[100_001:])
  assert prepared_files.find_damage(str(tmp_path)) == []
  path.write_bytes(data[:-1] + b"x")
  assert prepared_files.find_damage(str(tmp_path)) == ["f: its contents changed"]
  small.unlink()
  assert prepared_files.find_damage(str(tmp_path)) == ["f: its contents changed", "g: missing"]


def test_a_truncated_prepared_file_is_reported_in_one_line_and_prepared_again(tmp_path, capfd):
  root, data_dir = str(tmp_path / "raw"), str(tmp_path / "prepared")
  records = write_dataset(root)
  builder = tfds_builders.prepare("sysu_mm01", root, data_dir, HEIGHT, WIDTH, progress=False,
                                  split_records=records)
  directory = os.fspath(builder.data_dir)
  shard = glob.glob(os.path.join(directory, "*-train.array_record-*"))[0]
  size = os.path.getsize(shard)
  os.truncate(shard, 100)
  capfd.readouterr()
  again = tfds_builders.prepare("sysu_mm01", root, data_dir, HEIGHT, WIDTH, progress=False,
                                split_records=records)
  lines = capfd.readouterr().err.splitlines()
  assert lines == [f"dakd_jax: warning: the prepared copy {directory} is damaged: "
                   f"{os.path.basename(shard)}: 100 bytes, {size} recorded; preparing it again"]
  assert os.path.getsize(shard) == size and prepared_files.find_damage(directory) == []
  train = tfds_builders.load_sources(again)["train"]
  np.testing.assert_array_equal(train[len(train) - 1]["image"],
                                load_image(records["train"][-1].path, HEIGHT, WIDTH))
  # A copy left without its dataset_info.json (an incomplete copy) is prepared again too.
  os.remove(os.path.join(directory, "dataset_info.json"))
  tfds_builders.prepare("sysu_mm01", root, data_dir, HEIGHT, WIDTH, progress=False,
                        split_records=records)
  assert prepared_files.find_damage(directory) == []


def test_seven_junk_and_stray_files_are_reported_in_one_message(tmp_path, capsys):
  """Junk skipped with one warning line; every stray or empty file in one error."""
  from dakd_jax.data import prepare  # pylint: disable=import-outside-toplevel
  from dakd_jax.data import specs  # pylint: disable=import-outside-toplevel
  from dakd_jax.errors import DatasetError  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "sysu")
  sizes = specs.SyntheticSizes(num_train_ids=3, num_val_ids=1, num_test_ids=3,
                               images_per_camera=2, height=48, width=24, seed=0)
  prepare.ensure_synthetic_data(specs.get_spec("sysu_mm01"), root, sizes)
  folders = sorted(glob.glob(os.path.join(root, "cam[1-6]", "[0-9][0-9][0-9][0-9]")))
  junk = [os.path.join(folders[0], ".DS_Store"), os.path.join(folders[1], "Thumbs.db"),
          os.path.join(folders[2], "._0001.jpg"), os.path.join(folders[3], "desktop.ini")]
  stray = [os.path.join(folders[4], "empty.jpg"), os.path.join(folders[5], "notes.txt"),
           os.path.join(folders[6], "copy.jpg.part")]
  for path in junk + stray:
    with open(path, "wb") as f:
      f.write(b"" if path.endswith("empty.jpg") else b"x")
  with pytest.raises(DatasetError) as raised:
    tfds_builders.read_split_records("sysu_mm01", root, None)
  message = str(raised.value)
  assert message.count("entries in identity folders are not image files") + message.count(
      "entry in identity folders is not an image file") == 2  # one sentence per split
  assert all(path in message for path in stray) and not any(path in message for path in junk)
  assert f"{stray[0]} (empty)" in message and "\n" not in message
  for path in stray:
    os.remove(path)
  records = tfds_builders.read_split_records("sysu_mm01", root, None)
  assert not any(os.path.basename(r.path) in (".DS_Store", "._0001.jpg")
                 for split in records.values() for r in split)
  capsys.readouterr()
  summarise = prepare._summarise  # pylint: disable=protected-access
  summarise(specs.get_spec("sysu_mm01"), root, None, records, sys.stderr)
  warnings = [line for line in capsys.readouterr().err.splitlines() if "system file" in line]
  assert warnings == [f"dakd_jax: warning: SYSU-MM01: skipped 4 system file(s) that are not part "
                      f"of the dataset: {', '.join(sorted(junk))}"]


def test_every_unreadable_image_is_named_before_preparing(tmp_path):
  from dakd_jax.data import dataset_files  # pylint: disable=import-outside-toplevel
  from dakd_jax.errors import DatasetError  # pylint: disable=import-outside-toplevel
  import pytest  # pylint: disable=import-outside-toplevel
  records = write_dataset(str(tmp_path / "raw"))
  paths = [r.path for split in records.values() for r in split]
  dataset_files.unreadable_images(paths, "SYSU-MM01")  # all open
  for path in paths[:12]:
    with open(path, "wb") as f:
      f.write(b"not a jpeg")
  with pytest.raises(DatasetError, match=r"SYSU-MM01: 12 image file\(s\) cannot be opened") as e:
    dataset_files.unreadable_images(paths, "SYSU-MM01")
  assert all(p in str(e.value) for p in paths[:10]) and paths[10] not in str(e.value)
  assert str(e.value).count(", ") == 9 and "and 2 more" in str(e.value)
