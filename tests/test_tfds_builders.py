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


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  data_dir = str(tmp_path_factory.mktemp("prepared"))
  split_records = write_dataset(root)
  builder = tfds_builders.prepare("sysu_mm01", root, data_dir, HEIGHT, WIDTH,
                                  progress=False, split_records=split_records)
  return dict(root=root, data_dir=data_dir, records=split_records, builder=builder)


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
  again = tfds_builders.prepare("sysu_mm01", prepared["root"], prepared["data_dir"], HEIGHT,
                                WIDTH, progress=False, split_records=prepared["records"])
  assert os.fspath(again.data_dir) == os.fspath(prepared["builder"].data_dir)
  assert sorted(os.listdir(again.data_dir)) == files
  assert [os.path.getmtime(os.path.join(again.data_dir, f)) for f in files] == mtimes


def test_changed_size_prepares_new_directory(prepared):
  smaller = tfds_builders.prepare("sysu_mm01", prepared["root"], prepared["data_dir"], 40, 20,
                                  progress=False, split_records=prepared["records"])
  assert os.fspath(smaller.data_dir) != os.fspath(prepared["builder"].data_dir)
  assert os.path.isdir(prepared["builder"].data_dir)
  record = prepared["records"]["test"][3]
  np.testing.assert_array_equal(tfds_builders.load_sources(smaller)["test"][3]["image"],
                                load_image(record.path, 40, 20))


def test_repaired_source_file_is_prepared_again(tmp_path):
  """The prepared copy is keyed by content: a file replaced under the same name (new bytes,
  size or time) gives a new variant holding the new pixels; the old one stays untouched."""
  root = str(tmp_path / "raw")
  records = write_dataset(root)
  first = tfds_builders.prepare("sysu_mm01", root, str(tmp_path / "prepared"), HEIGHT, WIDTH,
                                progress=False, split_records=records)
  target = records["test"][1].path
  Image.fromarray(np.full((60, 30, 3), 77, np.uint8)).save(target)
  os.utime(target, ns=(1, 10**18))  # a time no earlier write could have
  second = tfds_builders.prepare("sysu_mm01", root, str(tmp_path / "prepared"), HEIGHT, WIDTH,
                                 progress=False, split_records=records)
  assert os.fspath(second.data_dir) != os.fspath(first.data_dir)
  np.testing.assert_array_equal(tfds_builders.load_sources(second)["test"][1]["image"],
                                np.full((HEIGHT, WIDTH, 3), 77, np.uint8))
  assert tfds_builders.load_sources(first)["test"][1]["image"].mean() != 77


def test_content_digest_follows_files_and_labels_not_root_spelling(tmp_path):
  root = str(tmp_path / "raw")
  records = write_dataset(root)
  digest = tfds_builders.content_digest(records, root)
  spelt_otherwise = str(tmp_path / "x" / ".." / "raw")
  assert tfds_builders.content_digest(records, spelt_otherwise) == digest
  moved = {"train": records["train"][:-1], "test": records["test"] + records["train"][-1:]}
  assert tfds_builders.content_digest(moved, root) != digest
  with open(records["train"][0].path, "ab") as f:
    f.write(b"\0")  # one byte longer
  assert tfds_builders.content_digest(records, root) != digest


def test_regdb_builder_names_trial_and_prepares(prepared):
  builder = tfds_builders.prepare("regdb", prepared["root"], prepared["data_dir"], HEIGHT, WIDTH,
                                  trial=3, progress=False, split_records=prepared["records"])
  relative = os.path.relpath(builder.data_dir, prepared["data_dir"]).split(os.sep)
  digest = tfds_builders.content_digest(prepared["records"], prepared["root"])
  assert relative == ["regdb", f"h{HEIGHT}_w{WIDTH}_trial3_{digest}", "1.0.0"]
  source = tfds_builders.load_sources(builder)["train"]
  assert len(source) == len(prepared["records"]["train"])


def test_config_rejects_bad_arguments(tmp_path):
  config = tfds_builders.make_config("sysu_mm01", str(tmp_path / "a"), 384, 128, None, "abc")
  assert config.name == "h384_w128_abc"
  with pytest.raises(ValueError, match="trial"):
    tfds_builders.make_config("regdb", str(tmp_path), 288, 144, None, "abc")
  with pytest.raises(ValueError, match="trial"):
    tfds_builders.make_config("sysu_mm01", str(tmp_path), 288, 144, 1, "abc")
  with pytest.raises(ValueError, match="dataset"):
    tfds_builders.make_config("market1501", str(tmp_path), 288, 144, None, "abc")


def test_empty_split_fails_and_leaves_nothing_prepared(prepared, tmp_path):
  records = {"train": prepared["records"]["train"], "test": []}
  with pytest.raises(DatasetError, match="'test' has no images"):
    tfds_builders.prepare("sysu_mm01", prepared["root"], str(tmp_path), 32, 16,
                          progress=False, split_records=records)
  assert not [folder for _, folders, _ in os.walk(tmp_path) for folder in folders
              if folder == "1.0.0" or folder.startswith("incomplete.")]


def test_interrupted_preparation_is_cleaned_up_by_the_next_run(prepared, tmp_path):
  """A killed preparation leaves TFDS's incomplete.* folder; the next run removes it."""
  config = tfds_builders.make_config(
      "sysu_mm01", prepared["root"], 24, 12, None,
      tfds_builders.content_digest(prepared["records"], prepared["root"]))
  stale = tmp_path / "sysu_mm01" / config.name / "incomplete.ABC123_1.0.0"
  stale.mkdir(parents=True)
  (stale / "half_written.array_record").write_bytes(b"x")
  builder = tfds_builders.prepare("sysu_mm01", prepared["root"], str(tmp_path), 24, 12,
                                  progress=False, split_records=prepared["records"])
  assert builder.is_prepared() and not stale.exists()
  assert os.listdir(tmp_path / "sysu_mm01" / config.name) == ["1.0.0"]


def test_preparation_prints_one_line_of_its_own(prepared, tmp_path, capfd):
  tfds_builders.prepare("sysu_mm01", prepared["root"], str(tmp_path), 24, 12, progress=True,
                        split_records=prepared["records"])
  out, err = capfd.readouterr()
  assert "Downloading and preparing" not in out + err and "Unknown size" not in out + err
  # 3 training and 2 test identities with 3 visible + 2 infrared images each: 25 images.
  assert f"dakd_jax: preparing sysu_mm01 (25 images at 24x12) into {tmp_path}" in err


def test_missing_root_is_reported(tmp_path):
  with pytest.raises(DatasetError, match="not a directory"):
    tfds_builders.prepare("sysu_mm01", str(tmp_path / "missing"), str(tmp_path), 32, 16,
                          progress=False)


def test_split_metadata_rejects_sliced_split(prepared):
  sliced = prepared["builder"].as_data_source("train[:2]")
  with pytest.raises(DatasetError, match="sidecar"):
    tfds_builders.split_metadata(sliced)


def test_trials_share_one_copy_whose_views_equal_each_trials_own_copy(tmp_path):
  """RegDB's trials split one image set: prepare_shared writes it once (the same folder for
  both trials), and each trial's views give what a copy prepared for that trial alone holds:
  the same images, labels, identities, cameras, modalities and paths, row for row, through
  indexing and through the loader's batched reader."""
  from dakd_jax.data import pipeline
  from dakd_jax.data import synthetic
  root = str(tmp_path / "RegDB")
  synthetic.ensure_synthetic(root, "regdb", num_ids=8, images_per_modality=2, height=40,
                             width=20, num_trials=2)
  shared_dirs = set()
  for trial in (1, 2):
    records = tfds_builders.read_split_records("regdb", root, trial)
    shared = tfds_builders.prepare_shared("regdb", root, str(tmp_path / "shared"), 32, 16,
                                          records, progress=False)
    shared_dirs.add(os.fspath(shared.data_dir))
    views = tfds_builders.split_views(shared, records)
    alone = tfds_builders.load_sources(tfds_builders.prepare(
        "regdb", root, str(tmp_path / f"trial{trial}"), 32, 16, trial, progress=False,
        split_records=records))
    assert set(views) == set(alone) == {"train", "test"}
    for split in ("train", "test"):
      view, own = views[split], alone[split]
      assert len(view) == len(own) == len(records[split])
      expected = tfds_builders.split_metadata(own)
      got = tfds_builders.split_metadata(view)
      for name in ("label", "identity", "camera", "modality", "path"):
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{trial} {split}")
      rows = np.arange(len(own))[::-1]
      np.testing.assert_array_equal(pipeline.ImageReader(view).read(rows),
                                    pipeline.ImageReader(own).read(rows))
      for i in (0, len(own) - 1):
        np.testing.assert_array_equal(view[i]["image"], own[i]["image"])
        assert int(view[i]["label"]) == int(own[i]["label"])
  assert len(shared_dirs) == 1
  assert len(os.listdir(tmp_path / "shared" / "regdb")) == 1  # one prepared variant in all
