"""Tests for the evaluation protocols: SYSU-MM01 query/gallery draws and RegDB directions.

The gallery draws are compared with a re-statement of the AGW baseline's draw written below
(global `random.seed(trial)`, sorted `os.listdir` paths, module-level `choice` / `sample`), on a
tiny SYSU-MM01 tree written by the test.
"""
import io
import os
import random

import pytest
from PIL import Image

from dakd_jax.data import protocols
from dakd_jax.data import regdb
from dakd_jax.data import sysu
from dakd_jax.data.records import Protocol, ProtocolOptions
from dakd_jax.data.records import INFRARED, VISIBLE, DatasetError

# (identity, camera) -> number of images. Test ids 3, 7, 12, 105, 233; train ids 1, 2, 5.
COUNTS = {
    (3, 1): 12, (3, 2): 10, (3, 3): 7, (3, 4): 11, (3, 5): 10, (3, 6): 5,
    (7, 1): 10, (7, 3): 4, (7, 4): 13, (7, 5): 10, (7, 6): 6,
    (12, 2): 15, (12, 3): 9, (12, 5): 10,
    (105, 1): 11, (105, 2): 10, (105, 4): 10, (105, 6): 8,
    (233, 1): 10, (233, 2): 12, (233, 3): 5, (233, 4): 10, (233, 5): 14, (233, 6): 3,
    (1, 1): 3, (1, 3): 2, (2, 2): 2, (2, 6): 2, (5, 4): 1, (5, 3): 1,
}
SPLITS = {"train_id.txt": "1,2", "val_id.txt": "5", "test_id.txt": "233,3,105,12,7\n"}
# Hand counts from COUNTS: existing visible folders of test ids (all: 4+3+2+3+4; indoor:
# 2+1+1+2+2) and infrared images of test ids (12+10+9+8+8).
GALLERY_FOLDERS = {"all": 16, "indoor": 8}
QUERY_SIZE = 47


def write_tree(root, counts, splits):
  buffer = io.BytesIO()
  Image.new("RGB", (4, 8), (200, 100, 0)).save(buffer, format="JPEG")
  for camera in range(1, 7):
    (root / f"cam{camera}").mkdir(parents=True, exist_ok=True)
  for (identity, camera), count in counts.items():
    folder = root / f"cam{camera}" / f"{identity:04d}"
    folder.mkdir(parents=True)
    # 4-digit names in scattered order, as in the real data (the reference parses paths by
    # fixed character positions, which needs this shape).
    for number in random.Random(identity * 10 + camera).sample(range(1, 1000), count):
      (folder / f"{number:04d}.jpg").write_bytes(buffer.getvalue())
  (root / "exp").mkdir()
  for name, text in splits.items():
    (root / "exp" / name).write_text(text)
  return root


@pytest.fixture(scope="module")
def sysu_root(tmp_path_factory):
  return str(write_tree(tmp_path_factory.mktemp("sysu") / "SYSU-MM01", COUNTS, SPLITS))


@pytest.fixture(autouse=True)
def keep_global_random_state():
  state = random.getstate()
  yield
  random.setstate(state)


def _test_ids(data_path):
  with open(os.path.join(data_path, "exp/test_id.txt")) as file:
    return ["%04d" % int(token) for token in file.read().splitlines()[0].split(",")]


def _parse(paths):
  # The reference's own path parsing: camera digit and 4-digit identity at fixed positions.
  return [(path, int(path[-13:-9]), int(path[-15])) for path in paths]


def reference_query(data_path):
  paths = []
  for identity in sorted(_test_ids(data_path)):
    for camera in ["cam3", "cam6"]:
      img_dir = os.path.join(data_path, camera, identity)
      if os.path.isdir(img_dir):
        paths.extend(sorted([img_dir + "/" + name for name in os.listdir(img_dir)]))
  return _parse(paths)


def reference_gallery(data_path, mode, trial, shots):
  random.seed(trial)
  cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
  paths = []
  for identity in sorted(_test_ids(data_path)):
    for camera in cameras:
      img_dir = os.path.join(data_path, camera, identity)
      if os.path.isdir(img_dir):
        new_files = sorted([img_dir + "/" + name for name in os.listdir(img_dir)])
        if shots == 1:
          paths.append(random.choice(new_files))
        else:
          paths.extend(random.sample(new_files, 10))
  return _parse(paths)


def _triples(records):
  return [(r.path, r.identity, r.camera) for r in records]


def test_private_generator_matches_seeded_module():
  population = [f"{n:04d}.jpg" for n in range(37)]
  for seed in range(10):
    random.seed(seed)
    module = [random.choice(population), random.sample(population, 10),
              random.choice(population[:12]), random.sample(population[:10], 10)]
    generator = random.Random(seed)
    private = [generator.choice(population), generator.sample(population, 10),
               generator.choice(population[:12]), generator.sample(population[:10], 10)]
    assert private == module


def test_query_matches_reference(sysu_root):
  query = sysu.query(sysu_root)
  assert _triples(query) == reference_query(sysu_root)
  assert len(query) == QUERY_SIZE
  assert {r.modality for r in query} == {INFRARED}
  assert [r.identity for r in query] == sorted(r.identity for r in query)


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shots", [1, 10])
def test_gallery_matches_reference_for_trials_0_to_9(sysu_root, mode, shots):
  draws = []
  for trial in range(10):
    gallery = sysu.gallery(sysu_root, trial, mode=mode, shots=shots)
    assert _triples(gallery) == reference_gallery(sysu_root, mode, trial, shots)
    assert len(gallery) == GALLERY_FOLDERS[mode] * shots
    assert {r.modality for r in gallery} == {VISIBLE}
    assert len({r.path for r in gallery}) == len(gallery)  # Multi-shot draws are distinct.
    draws.append(tuple(r.path for r in gallery))
  # The seed matters: ten trials give (almost surely) ten different galleries.
  assert len(set(draws)) == 10


def test_gallery_leaves_global_random_state_alone(sysu_root):
  random.seed(1234)
  before = random.getstate()
  sysu.gallery(sysu_root, 3, mode="all", shots=10)
  assert random.getstate() == before


def test_query_does_not_depend_on_trial_or_mode(sysu_root):
  settings = [p for p in sysu.make_protocols(ProtocolOptions()) if p.trial in (0, 5, 9)]
  queries = {tuple(map(tuple, _triples(protocols.query_gallery(p, sysu_root)[0])))
             for p in settings}
  assert len(queries) == 1
  galleries = {tuple(r.path for r in protocols.query_gallery(p, sysu_root)[1])
               for p in settings}
  assert len(galleries) == len(settings)


def test_multi_shot_needs_ten_images_per_gallery_folder(tmp_path):
  counts = dict(COUNTS)
  counts[(7, 4)] = 9
  root = str(write_tree(tmp_path / "sysu", counts, SPLITS))
  with pytest.raises(DatasetError, match=r"cam4.0007 holds 9 images; multi-shot draws 10"):
    sysu.gallery(root, 0, mode="all", shots=10)
  # Camera 4 is not an indoor gallery camera, and single-shot needs one image.
  assert len(sysu.gallery(root, 0, mode="indoor", shots=10)) == 80
  assert _triples(sysu.gallery(root, 4, mode="all", shots=1)) == reference_gallery(
      root, "all", 4, 1)


def test_empty_gallery_folder_is_an_error(tmp_path):
  counts = dict(COUNTS)
  counts[(105, 2)] = 0
  root = str(write_tree(tmp_path / "sysu", counts, SPLITS))
  with pytest.raises(DatasetError, match=r"cam2.0105 holds 0 images; single-shot draws 1"):
    sysu.gallery(root, 0, mode="indoor", shots=1)
  assert len(sysu.query(root)) == QUERY_SIZE


@pytest.mark.parametrize("kwargs, message", [
    (dict(trial=0, mode="outdoor", shots=1), r"search mode must be one of \['all', 'indoor'\]"),
    (dict(trial=0, mode="all", shots=5), r"shots must be 1 \(single-shot\) or 10"),
    (dict(trial=0, mode="all", shots=True), r"shots must be 1"),
    (dict(trial=-1, mode="all", shots=1), r"trial must be a non-negative integer"),
    (dict(trial="0", mode="all", shots=1), r"trial must be a non-negative integer"),
])
def test_gallery_argument_errors(sysu_root, kwargs, message):
  with pytest.raises(DatasetError, match=message):
    sysu.gallery(sysu_root, **kwargs)


def test_gallery_reports_reader_errors(tmp_path):
  with pytest.raises(DatasetError, match=r"SYSU-MM01 root not found"):
    sysu.gallery(str(tmp_path / "none"), 0, mode="all", shots=1)
  root = str(write_tree(tmp_path / "sysu", COUNTS, dict(SPLITS, **{"test_id.txt": "3,8"})))
  with pytest.raises(DatasetError, match=r"identity 8 of the 'test' split has no folder"):
    sysu.query(root)


def _write_regdb(root, trial):
  buffer = io.BytesIO()
  Image.new("RGB", (4, 8), (1, 2, 3)).save(buffer, format="BMP")
  (root / "idx").mkdir(parents=True)
  expected = {}
  for folder, modality in (("Visible", "visible"), ("Thermal", "thermal")):
    rows = [(f"{folder}/{identity}/{modality}_{shot}.bmp", identity)
            for identity in (40, 8) for shot in range(3)]
    for relative, _ in rows:
      (root / relative).parent.mkdir(parents=True, exist_ok=True)
      (root / relative).write_bytes(buffer.getvalue())
    text = "".join(f"{relative} {label}\n" for relative, label in rows)
    (root / "idx" / f"test_{modality}_{trial}.txt").write_text(text)
    expected[modality] = [(os.path.join(str(root), rel), label) for rel, label in rows]
  return str(root), expected


def test_regdb_directions(tmp_path):
  root, expected = _write_regdb(tmp_path / "RegDB", 4)
  rows = lambda records: [(r.path, r.identity) for r in records]
  query, gallery = regdb.query_gallery_of(root, 4, "visible_to_thermal")
  assert (rows(query), rows(gallery)) == (expected["visible"], expected["thermal"])
  assert {r.camera for r in query} == {1} and {r.modality for r in gallery} == {INFRARED}
  query, gallery = regdb.query_gallery_of(root, 4, "thermal_to_visible")
  assert (rows(query), rows(gallery)) == (expected["thermal"], expected["visible"])
  for protocol in regdb.make_protocols(ProtocolOptions(trial=4)):
    assert rows(protocols.query_gallery(protocol, root)[0]) == expected[
        protocol.direction.split("_to_")[0]]
  with pytest.raises(DatasetError, match=r"direction must be one of"):
    regdb.query_gallery_of(root, 4, "rgb_to_ir")
  with pytest.raises(DatasetError, match=r"index file not found: .*test_visible_5\.txt"):
    regdb.query_gallery_of(root, 5, "visible_to_thermal")


def test_protocol_names_and_lists():
  settings = sysu.make_protocols(ProtocolOptions())
  assert len(settings) == 40
  assert settings[0].name == "sysu_mm01/all/single-shot/trial-0"
  assert settings[9].name == "sysu_mm01/all/single-shot/trial-9"
  assert settings[10].name == "sysu_mm01/all/multi-shot/trial-0"
  assert settings[-1].name == "sysu_mm01/indoor/multi-shot/trial-9"
  assert len({p.name for p in settings}) == 40
  assert len({p.setting for p in settings}) == 4
  assert [p.name for p in regdb.make_protocols(ProtocolOptions(trial=7))] == [
      "regdb/visible_to_thermal/trial-7", "regdb/thermal_to_visible/trial-7"]
  assert [p.name for p in regdb.make_protocols(ProtocolOptions(trial=7),
                                               during_training=True)] == [
      "regdb/visible_to_thermal/trial-7"]
  assert [p.name for p in sysu.make_protocols(ProtocolOptions(
      num_trials=3, values={"modes": ("indoor",), "shots": ("multi",)}))][2:] == [
      "sysu_mm01/indoor/multi-shot/trial-2"]
  training = sysu.make_protocols(ProtocolOptions(num_trials=2), during_training=True)
  assert [p.name for p in training] == [
      "sysu_mm01/all/single-shot/trial-0", "sysu_mm01/all/single-shot/trial-1",
      "sysu_mm01/indoor/single-shot/trial-0", "sysu_mm01/indoor/single-shot/trial-1"]


@pytest.mark.parametrize("kwargs", [
    dict(dataset="sysu_mm01", trial=0, mode="all"),
    dict(dataset="sysu_mm01", trial=0, mode="all", shots=1, direction="visible_to_thermal"),
    dict(dataset="sysu_mm01", trial=-2, mode="all", shots=1),
    dict(dataset="regdb", trial=0, direction="visible_to_thermal"),
    dict(dataset="regdb", trial=1, direction="visible_to_thermal", shots=1),
    dict(dataset="regdb", trial=1, direction="ir_to_rgb"),
    dict(dataset="sysu", trial=0, mode="all", shots=1),
])
def test_protocol_rejects_inconsistent_settings(kwargs):
  with pytest.raises(ValueError):
    protocols.check_protocol(Protocol(**kwargs))
