"""Tests for dakd_jax.data.tfds_builders: prepare tiny datasets, read them back, reuse, configs."""
import os

import numpy as np
import pytest
from PIL import Image

from dakd_jax.data import tfds_builders
from dakd_jax.data.records import DatasetError, ImageRecord, load_image

HEIGHT, WIDTH = 48, 24
# Identities deliberately unsorted: training labels follow ascending identity (method.md 6.1).
TRAIN_IDS = (5, 2, 9)
TEST_IDS = (13, 11)


def write_dataset(root):
  """SYSU-like tree of random 60x30 JPEGs (so preparing must resize); returns split -> records."""
  rng = np.random.default_rng(0)
  split_records = {}
  for split, identities in (("train", TRAIN_IDS), ("test", TEST_IDS)):
    split_records[split] = []
    for identity in identities:
      for camera, modality, count in ((1, "visible", 3), (3, "infrared", 2)):
        folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
        os.makedirs(folder, exist_ok=True)
        for j in range(count):
          path = os.path.join(folder, f"{j:04d}.jpg")
          Image.fromarray(rng.integers(0, 256, (60, 30, 3), dtype=np.uint8)).save(path)
          split_records[split].append(ImageRecord(path, identity, camera, modality))
  return split_records


class CountingRecords:
  """records_fn that counts how often the builder asks for records."""

  def __init__(self, split_records):
    self.split_records = split_records
    self.calls = 0

  def __call__(self, split):
    self.calls += 1
    return self.split_records[split]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  data_dir = str(tmp_path_factory.mktemp("prepared"))
  split_records = write_dataset(root)
  records_fn = CountingRecords(split_records)
  builder = tfds_builders.prepare("sysu_mm01", root, data_dir, HEIGHT, WIDTH,
                                  progress=False, records_fn=records_fn)
  return dict(root=root, data_dir=data_dir, records=split_records, records_fn=records_fn,
              builder=builder)


def test_images_equal_load_image_in_reader_order(prepared):
  sources = tfds_builders.load_sources(prepared["builder"])
  assert set(sources) == {"train", "test"}
  for split, records in prepared["records"].items():
    assert len(sources[split]) == len(records)
    for i, record in enumerate(records):
      example = sources[split][i]
      assert example["image"].dtype == np.uint8
      np.testing.assert_array_equal(example["image"], load_image(record.path, HEIGHT, WIDTH))


def test_metadata_matches_records_and_examples(prepared):
  sources = tfds_builders.load_sources(prepared["builder"])
  expected_label = {2: 0, 5: 1, 9: 2}  # ascending identity, worked by hand
  for split, records in prepared["records"].items():
    metadata = tfds_builders.split_metadata(sources[split])
    np.testing.assert_array_equal(metadata["identity"], [r.identity for r in records])
    np.testing.assert_array_equal(metadata["camera"], [r.camera for r in records])
    np.testing.assert_array_equal(metadata["modality"],
                                  [0 if r.modality == "visible" else 1 for r in records])
    labels = [expected_label[r.identity] if split == "train" else -1 for r in records]
    np.testing.assert_array_equal(metadata["label"], labels)
    expected_paths = [f"cam{r.camera}/{r.identity:04d}/{os.path.basename(r.path)}"
                      for r in records]
    assert list(metadata["path"]) == expected_paths
    # The sidecar agrees with the features stored in every example.
    for i in range(len(records)):
      example = sources[split][i]
      for name in ("label", "identity", "camera", "modality"):
        assert int(example[name]) == int(metadata[name][i]), (split, i, name)
      assert example["path"].decode() == metadata["path"][i]


def test_prepare_twice_reuses_files(prepared):
  files = sorted(os.listdir(prepared["builder"].data_dir))
  mtimes = [os.path.getmtime(os.path.join(prepared["builder"].data_dir, f)) for f in files]
  calls = prepared["records_fn"].calls
  again = tfds_builders.prepare("sysu_mm01", prepared["root"], prepared["data_dir"], HEIGHT,
                                WIDTH, progress=False, records_fn=prepared["records_fn"])
  assert prepared["records_fn"].calls == calls  # no records read, so nothing rebuilt
  assert os.fspath(again.data_dir) == os.fspath(prepared["builder"].data_dir)
  assert sorted(os.listdir(again.data_dir)) == files
  assert [os.path.getmtime(os.path.join(again.data_dir, f)) for f in files] == mtimes


def test_changed_size_prepares_new_directory(prepared):
  smaller = tfds_builders.prepare("sysu_mm01", prepared["root"], prepared["data_dir"], 40, 20,
                                  progress=False, records_fn=prepared["records_fn"])
  assert os.fspath(smaller.data_dir) != os.fspath(prepared["builder"].data_dir)
  assert os.path.isdir(prepared["builder"].data_dir)
  record = prepared["records"]["test"][3]
  np.testing.assert_array_equal(tfds_builders.load_sources(smaller)["test"][3]["image"],
                                load_image(record.path, 40, 20))


def test_regdb_builder_names_trial_and_prepares(prepared):
  builder = tfds_builders.prepare("regdb", prepared["root"], prepared["data_dir"], HEIGHT, WIDTH,
                                  trial=3, progress=False, records_fn=prepared["records_fn"])
  relative = os.path.relpath(builder.data_dir, prepared["data_dir"]).split(os.sep)
  digest = tfds_builders.root_digest(prepared["root"])
  assert relative == ["regdb", f"h{HEIGHT}_w{WIDTH}_trial3_root{digest}", "1.0.0"]
  source = tfds_builders.load_sources(builder)["train"]
  assert len(source) == len(prepared["records"]["train"])


def test_config_names_separate_roots_and_reject_bad_arguments(tmp_path):
  first = tfds_builders.make_config("sysu_mm01", str(tmp_path / "a"), 384, 128)
  second = tfds_builders.make_config("sysu_mm01", str(tmp_path / "b"), 384, 128)
  assert first.name.startswith("h384_w128_root") and first.name != second.name
  # The same root spelt differently resolves to the same name.
  again = tfds_builders.make_config("sysu_mm01", str(tmp_path / "x" / ".." / "a"), 384, 128)
  assert again.name == first.name
  with pytest.raises(ValueError, match="trial"):
    tfds_builders.make_config("regdb", str(tmp_path), 288, 144)
  with pytest.raises(ValueError, match="trial"):
    tfds_builders.make_config("sysu_mm01", str(tmp_path), 288, 144, trial=1)
  with pytest.raises(ValueError, match="dataset"):
    tfds_builders.make_config("market1501", str(tmp_path), 288, 144)


def test_empty_split_fails_and_leaves_nothing_prepared(prepared, tmp_path):
  records = {"train": prepared["records"]["train"], "test": []}
  with pytest.raises(DatasetError, match="'test' has no images"):
    tfds_builders.prepare("sysu_mm01", prepared["root"], str(tmp_path), 32, 16,
                          progress=False, records_fn=records.__getitem__)
  builder = tfds_builders.create_builder("sysu_mm01", prepared["root"], str(tmp_path), 32, 16)
  assert not builder.is_prepared()


def test_missing_root_is_reported(tmp_path):
  with pytest.raises(DatasetError, match="not a directory"):
    tfds_builders.prepare("sysu_mm01", str(tmp_path / "missing"), str(tmp_path), 32, 16,
                          progress=False, records_fn=lambda split: [])


def test_split_metadata_rejects_sliced_split(prepared):
  sliced = prepared["builder"].as_data_source("train[:2]")
  with pytest.raises(DatasetError, match="sidecar"):
    tfds_builders.split_metadata(sliced)
