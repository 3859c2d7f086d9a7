"""Tests for the SYSU-MM01 and RegDB readers on tiny trees written here."""
import io
import os
import re

import pytest
from PIL import Image

from dakd_jax.data import dataset_files, regdb, sysu
from dakd_jax.data.records import INFRARED, VISIBLE, DatasetError, describe, records_of


def _image_bytes(fmt):
  buffer = io.BytesIO()
  Image.new("RGB", (4, 8), (10, 20, 30)).save(buffer, format=fmt)
  return buffer.getvalue()


def write_sysu(root, layout, splits):
  """layout: {(identity, camera): [file names]}; splits: {split file name: text}."""
  data = _image_bytes("JPEG")
  for camera in range(1, 7):
    (root / f"cam{camera}").mkdir(parents=True, exist_ok=True)
  for (identity, camera), names in layout.items():
    folder = root / f"cam{camera}" / f"{identity:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
      (folder / name).write_bytes(data)
  (root / "exp").mkdir(exist_ok=True)
  for name, text in splits.items():
    (root / "exp" / name).write_text(text)
  return root


# Names listed out of order on purpose: the reader must sort them.
SYSU_LAYOUT = {
    (1, 1): ["0003.jpg", "0001.jpg"], (1, 3): ["0002.jpg"], (1, 6): ["0010.jpg", "0004.jpg"],
    (2, 2): ["0001.jpg"], (2, 4): ["0005.jpg", "0002.jpg", "0009.jpg"], (2, 3): ["0001.jpg"],
    (5, 5): ["0001.jpg"], (5, 6): ["0007.jpg"],
    (4, 1): ["0002.jpg", "0001.jpg"], (4, 3): ["0001.jpg"], (4, 5): ["0003.jpg"],
    (10, 2): ["0001.jpg"], (10, 6): ["0004.jpg", "0002.jpg"],
}
SYSU_SPLITS = {"train_id.txt": "5,1\n", "val_id.txt": "2", "test_id.txt": "10,4\nignored line\n"}


@pytest.fixture
def sysu_root(tmp_path):
  return write_sysu(tmp_path / "SYSU-MM01", SYSU_LAYOUT, SYSU_SPLITS)


def _expected_sysu(root, identities):
  """Identity ascending, camera ascending, name ascending, straight from the layout."""
  rows = []
  for identity in sorted(identities):
    for camera in range(1, 7):
      for name in sorted(SYSU_LAYOUT.get((identity, camera), [])):
        modality = INFRARED if camera in (3, 6) else VISIBLE
        path = os.path.join(str(root), f"cam{camera}", f"{identity:04d}", name)
        rows.append((path, identity, camera, modality))
  return rows


def _rows(records):
  return [(r.path, r.identity, r.camera, r.modality) for r in records]


def test_sysu_train_is_train_plus_val_in_order(sysu_root):
  records = sysu.read_sysu(str(sysu_root), "train")
  assert _rows(records) == _expected_sysu(sysu_root, [1, 2, 5])
  assert len(records) == 12  # Hand count: id 1 has 5 images, id 2 has 5, id 5 has 2.
  assert all(os.path.isfile(r.path) for r in records)


def test_sysu_test_split_and_modalities(sysu_root):
  records = sysu.read_sysu(str(sysu_root), "test")
  assert _rows(records) == _expected_sysu(sysu_root, [4, 10])
  infrared = records_of(records, INFRARED)
  assert [(r.identity, r.camera, os.path.basename(r.path)) for r in infrared] == [
      (4, 3, "0001.jpg"), (10, 6, "0002.jpg"), (10, 6, "0004.jpg")]
  assert [r.camera for r in records_of(records, VISIBLE)] == [1, 1, 5, 2]


def test_sysu_relative_root_gives_absolute_paths(sysu_root, monkeypatch):
  monkeypatch.chdir(sysu_root.parent)
  records = sysu.read_sysu("SYSU-MM01", "test")
  assert _rows(records) == _expected_sysu(sysu_root, [4, 10])


def test_sysu_describe_counts(sysu_root):
  text = describe(sysu.read_sysu(str(sysu_root), "train"), title="sysu train")
  rows = {}
  for line in text.splitlines():
    match = re.match(r"\s+(\S.*?)\s+\|\s+(\d+)\s+\|\s+(\d+)$", line)
    if match:
      rows[match.group(1)] = (int(match.group(2)), int(match.group(3)))
  assert text.splitlines()[0].strip() == "sysu train"
  # Hand counts from SYSU_LAYOUT for ids 1, 2, 5.
  assert rows == {
      "visible": (3, 7), "camera 1": (1, 2), "camera 2": (1, 1), "camera 4": (1, 3),
      "camera 5": (1, 1), "infrared": (3, 5), "camera 3": (2, 2), "camera 6": (2, 3),
      "total": (3, 12)}


@pytest.mark.parametrize("split_files, message", [
    ({"train_id.txt": "1,x,2", "val_id.txt": "5"}, r"train_id\.txt, line 1, token 2 is 'x'"),
    ({"train_id.txt": "1,2,", "val_id.txt": "5"}, r"train_id\.txt, line 1, token 3 is ''"),
    ({"train_id.txt": "1,-2", "val_id.txt": "5"}, r"token 2 is '-2'"),
    ({"train_id.txt": "\n1,2", "val_id.txt": "5"}, r"train_id\.txt, line 1 is empty"),
    ({"train_id.txt": "", "val_id.txt": "5"}, r"train_id\.txt, line 1 is empty"),
    ({"train_id.txt": "1,2", "val_id.txt": "2"}, r"identity 2 is listed twice"),
    ({"train_id.txt": "1,2,1", "val_id.txt": "5"}, r"identity 1 is listed twice"),
    ({"train_id.txt": "1,2"}, r"split file not found: .*val_id\.txt"),
    ({"train_id.txt": "1,2,77", "val_id.txt": "5"},
     r"identity 77 of the 'train' split has no folder: expected .*cam<1\.\.6>.0077"),
])
def test_sysu_split_file_errors(tmp_path, split_files, message):
  root = write_sysu(tmp_path / "sysu", SYSU_LAYOUT, split_files)
  with pytest.raises(DatasetError, match=message):
    sysu.read_sysu(str(root), "train")


def test_sysu_missing_root_exp_camera_and_bad_split(tmp_path, sysu_root):
  with pytest.raises(DatasetError, match=r"SYSU-MM01 root not found: .*nowhere"):
    sysu.read_sysu(str(tmp_path / "nowhere"), "train")
  with pytest.raises(DatasetError,
                     match=r"split must be one of \['test', 'train', 'val'\], got 'valid'"):
    sysu.read_sysu(str(sysu_root), "valid")
  os.rename(sysu_root / "exp", sysu_root / "exp_moved")
  with pytest.raises(DatasetError, match=r"split folder not found: .*exp"):
    sysu.read_sysu(str(sysu_root), "test")
  os.rename(sysu_root / "cam4", sysu_root / "cam4_moved")
  with pytest.raises(DatasetError, match=r"camera folder missing: .*cam4"):
    sysu.read_sysu(str(sysu_root), "test")


def test_sysu_refuses_stray_file_in_identity_folder(sysu_root):
  before = sysu.read_sysu(str(sysu_root), "test")
  (sysu_root / "cam2" / "0010" / ".DS_Store").write_bytes(b"x")  # system junk: skipped
  assert sysu.read_sysu(str(sysu_root), "test") == before
  (sysu_root / "cam2" / "0010" / "notes.txt").write_bytes(b"x")
  with pytest.raises(DatasetError, match=r"1 entry .* not an image file .*cam2.0010.notes\.txt"):
    sysu.read_sysu(str(sysu_root), "test")
  # The train split does not look into test folders.
  assert len(sysu.read_sysu(str(sysu_root), "train")) == 12


def test_listings_read_once_lists_each_folder_once_and_answers_the_same(sysu_root,
                                                                         monkeypatch):
  """An evaluation's protocols read the same folders for every trial: inside
  `listings_read_once` each folder is listed once; the answers, stray entries included, are
  those of a fresh listing; outside it every call lists again."""
  listed = []
  real_listdir = os.listdir
  monkeypatch.setattr(os, "listdir", lambda folder: listed.append(folder) or real_listdir(folder))
  folders = {str(sysu_root / f"cam{c}" / f"{i:04d}") for i, c in SYSU_LAYOUT if i in (4, 10)}
  expected_query = sysu.query(str(sysu_root))
  expected_gallery = [sysu.gallery(str(sysu_root), trial, mode="all", shots=1)
                      for trial in range(3)]
  listed.clear()
  with dataset_files.listings_read_once():
    for trial in range(3):
      assert sysu.query(str(sysu_root)) == expected_query
      assert sysu.gallery(str(sysu_root), trial, mode="all", shots=1) == expected_gallery[trial]
  assert sorted(listed) == sorted(folders)  # each test folder once, in 6 reads of the split
  listed.clear()
  sysu.query(str(sysu_root))
  sysu.query(str(sysu_root))
  assert len(listed) == 2 * len(folders)  # no memory outside the block
  # A stray entry found inside the block is reported on every read, not only the first.
  (sysu_root / "cam2" / "0010" / "notes.txt").write_bytes(b"x")
  with dataset_files.listings_read_once():
    for _ in range(2):
      with pytest.raises(DatasetError, match="notes.txt"):
        sysu.query(str(sysu_root))


def write_regdb(root, trial, lists, images=None):
  """lists: {(split, modality): [(relative path, label)]}; writes images and idx files."""
  data = _image_bytes("BMP")
  (root / "idx").mkdir(parents=True, exist_ok=True)
  for (split, modality), rows in lists.items():
    for relative, _ in rows:
      (root / relative).parent.mkdir(parents=True, exist_ok=True)
      (root / relative).write_bytes(data)
    text = "".join(f"{relative} {label}\n" for relative, label in rows)
    (root / "idx" / f"{split}_{modality}_{trial}.txt").write_text(text)
  return root


def _regdb_lists(train_ids=(30, 11, 52), test_ids=(7, 99)):
  lists = {}
  for split, ids in (("train", train_ids), ("test", test_ids)):
    for folder, modality in (("Visible", "visible"), ("Thermal", "thermal")):
      rows = []
      for label, identity in enumerate(ids):
        for shot in (2, 1):  # Index order is kept as written, not sorted.
          rows.append((f"{folder}/{identity}/{modality}_{identity}_{shot}.bmp",
                       label if split == "train" else identity))
      lists[(split, modality)] = rows
  return lists


@pytest.fixture
def regdb_root(tmp_path):
  return write_regdb(tmp_path / "RegDB", 3, _regdb_lists())


def test_regdb_records_follow_index_files(regdb_root):
  lists = _regdb_lists()
  for split in ("train", "test"):
    for modality, record_modality, camera in (("visible", VISIBLE, 1), ("thermal", INFRARED, 2)):
      records = regdb.read_regdb(str(regdb_root), 3, split, modality)
      expected = [(os.path.join(str(regdb_root), rel), label, camera, record_modality)
                  for rel, label in lists[(split, modality)]]
      assert _rows(records) == expected
  both = regdb.read_regdb_split(str(regdb_root), 3, "train")
  assert [r.modality for r in both] == [VISIBLE] * 6 + [INFRARED] * 6
  assert [r.identity for r in both] == [0, 0, 1, 1, 2, 2] * 2
  assert _rows(regdb.read_regdb(str(regdb_root), 3, "test", "infrared")) == _rows(
      regdb.read_regdb(str(regdb_root), 3, "test", "thermal"))


def test_regdb_skips_blank_lines(regdb_root):
  path = regdb_root / "idx" / "test_visible_3.txt"
  path.write_text(path.read_text() + "\n  \n")
  assert len(regdb.read_regdb(str(regdb_root), 3, "test", "visible")) == 4


def test_regdb_argument_errors(tmp_path, regdb_root):
  with pytest.raises(DatasetError, match=r"RegDB root not found: .*absent"):
    regdb.read_regdb(str(tmp_path / "absent"), 1, "train", "visible")
  for trial in (0, 11, "1", True, 2.0):
    with pytest.raises(DatasetError, match=rf"trial must be an integer in 1\.\.10, got {trial!r}"):
      regdb.read_regdb(str(regdb_root), trial, "train", "visible")
  with pytest.raises(DatasetError, match=r"split must be one of"):
    regdb.read_regdb(str(regdb_root), 3, "val", "visible")
  with pytest.raises(DatasetError, match=r"modality must be one of .*got 'rgb'"):
    regdb.read_regdb(str(regdb_root), 3, "train", "rgb")
  with pytest.raises(DatasetError, match=r"index file not found: .*idx.train_visible_4\.txt"):
    regdb.read_regdb(str(regdb_root), 4, "train", "visible")


@pytest.mark.parametrize("line, message", [
    ("Visible/7/visible_7_2.bmp", r"line 2 has 1 fields"),
    ("Visible/7/visible_7_2.bmp 7 extra", r"line 2 has 3 fields"),
    ("Visible/7/visible_7_2.bmp seven", r"line 2 has label 'seven', not an integer"),
    ("/abs/visible_7_2.bmp 7", r"line 2 gives an absolute image path"),
    ("Visible/7/gone.bmp 7", r", line 2 not found: .*gone\.bmp"),
])
def test_regdb_bad_lines(regdb_root, line, message):
  path = regdb_root / "idx" / "test_visible_3.txt"
  lines = path.read_text().splitlines()
  lines[1] = line
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DatasetError, match=r"test_visible_3\.txt.*" + message):
    regdb.read_regdb(str(regdb_root), 3, "test", "visible")


def test_regdb_train_labels_must_be_0_to_c_minus_1(tmp_path):
  lists = _regdb_lists()
  lists[("train", "visible")] = [(rel, 2 * label) for rel, label in lists[("train", "visible")]]
  root = write_regdb(tmp_path / "RegDB", 3, lists)
  with pytest.raises(DatasetError, match=r"train_visible_3\.txt must be exactly 0\.\.C-1.*"
                     r"3 distinct labels from 0 to 4, missing e\.g\. \[1, 3\]"):
    regdb.read_regdb(str(root), 3, "train", "visible")
  # Test labels are identities and need no relabelling.
  assert {r.identity for r in regdb.read_regdb(str(root), 3, "test", "visible")} == {7, 99}


def test_regdb_train_modalities_must_share_identities(tmp_path):
  lists = _regdb_lists()
  lists[("train", "thermal")] = [(rel, label) for rel, label in lists[("train", "thermal")]
                                 if label != 2]
  root = write_regdb(tmp_path / "RegDB", 3, lists)
  # Each file alone is fine (labels 0..2 and 0..1) ...
  assert len(regdb.read_regdb(str(root), 3, "train", "thermal")) == 4
  # ... but identity 2 has no thermal image.
  with pytest.raises(DatasetError, match=r"disagree on identities: only visible \[2\], only "
                     r"thermal \[\]"):
    regdb.read_regdb_split(str(root), 3, "train")
