"""A damaged prepared copy (a truncated or missing file) is found before it is read and
prepared again (dakd_jax/data/prepared_files.py, tfds_builders.prepare)."""
import glob
import os
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
