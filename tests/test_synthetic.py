"""Tests of the synthetic dataset writers: bytes, layouts, the ensure/marker rules, modality gap.

The layouts are checked by small parsers written here (independent of the project's readers),
and the modality gap by a raw-pixel nearest neighbour written out in NumPy.
"""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dakd_jax.data import synthetic
from tests.file_trees import tree_bytes

SMALL_SYSU = dict(num_train_ids=4, num_val_ids=1, num_test_ids=3, images_per_camera=2,
                  height=48, width=24)
SMALL_REGDB = dict(num_ids=6, images_per_modality=3, height=48, width=24, num_trials=3)
REGDB_NAME = re.compile(r"^(female|male)_(front|back)_([vt])_(\d{5})_(\d+)\.bmp$")
SMALL_LLCM = dict(num_train_ids=4, num_test_ids=5, images_per_camera=2, height=48, width=24)
LLCM_NAME = re.compile(r"^(\d{4})_c(\d{2})_s\d{6}_f\d+_(vis|nir)\.jpg$")
WRITERS = {"sysu": synthetic.write_sysu_tree, "regdb": synthetic.write_regdb_tree,
           "llcm": synthetic.write_llcm_tree}


def file_stamps(root):
  """{relative path: (inode, modification time in ns)}: changes when a file is rewritten."""
  stamps = {}
  for folder, _, files in os.walk(root):
    for name in files:
      stat = os.stat(os.path.join(folder, name))
      stamps[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_ino, stat.st_mtime_ns)
  return stamps


def read_ids(root, split):
  with open(os.path.join(root, "exp", f"{split}_id.txt"), encoding="utf-8") as file:
    return [int(token) for token in file.readline().strip().split(",")]


def parse_sysu(root):
  """{(identity, camera): sorted file names} from the camera folders."""
  assert sorted(os.listdir(root)) == ["cam1", "cam2", "cam3", "cam4", "cam5", "cam6", "exp"]
  folders = {}
  for camera in range(1, 7):
    for pid in os.listdir(os.path.join(root, f"cam{camera}")):
      assert re.fullmatch(r"\d{4}", pid), pid
      folders[(int(pid), camera)] = sorted(os.listdir(os.path.join(root, f"cam{camera}", pid)))
  return folders


def parse_regdb_idx(root, split, modality, trial):
  """[(relative path, label)] of one idx file."""
  with open(os.path.join(root, "idx", f"{split}_{modality}_{trial}.txt"),
            encoding="utf-8") as file:
    text = file.read()
  assert text.endswith("\n") and not text.endswith("\n\n")
  return [(line.split(" ")[0], int(line.split(" ")[1])) for line in text.splitlines()]


@pytest.mark.parametrize("kind, params", [("sysu", SMALL_SYSU), ("regdb", SMALL_REGDB),
                                          ("llcm", SMALL_LLCM)])
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, kind, params):
  writer = WRITERS[kind]
  writer(str(tmp_path / "a"), seed=3, **params)
  writer(str(tmp_path / "b"), seed=3, **params)
  writer(str(tmp_path / "c"), seed=4, **params)
  first, second, other = (tree_bytes(tmp_path / name) for name in "abc")
  assert len(first) > 20 and first == second
  images, other_images = ({content for path, content in tree.items()
                           if path.endswith((".jpg", ".bmp"))} for tree in (first, other))
  assert len(images) > 20 and not images & other_images


def test_images_of_an_identity_do_not_depend_on_the_other_identities(tmp_path):
  # Seeds are derived per identity, so adding identities leaves the first ones' bytes alone.
  synthetic.write_regdb_tree(str(tmp_path / "six"), **SMALL_REGDB)
  synthetic.write_regdb_tree(str(tmp_path / "nine"), **dict(SMALL_REGDB, num_ids=9))
  six, nine = tree_bytes(tmp_path / "six"), tree_bytes(tmp_path / "nine")
  images = {path: content for path, content in six.items() if path.endswith(".bmp")}
  assert len(images) == 36 and all(nine[path] == content for path, content in images.items())


def test_sysu_layout(tmp_path):
  params = dict(SMALL_SYSU, num_train_ids=12, num_test_ids=6)
  synthetic.write_sysu_tree(str(tmp_path), seed=1, **params)
  folders = parse_sysu(str(tmp_path))
  splits = {split: read_ids(str(tmp_path), split) for split in ("train", "val", "test")}
  assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 1, 6]
  everyone = sorted(sum(splits.values(), []))
  assert len(set(everyone)) == 19 and all(ids == sorted(ids) for ids in splits.values())
  assert everyone != list(range(1, 20))  # non-contiguous identity numbers, as in SYSU-MM01
  assert {pid for pid, _ in folders} == set(everyone)
  cameras_of = {pid: {camera for p, camera in folders if p == pid} for pid in everyone}
  for pid, cameras in cameras_of.items():
    for pair in ((1, 2), (4, 5), (3, 6)):  # indoor, outdoor visible, infrared: never empty
      assert cameras & set(pair), (pid, cameras)
  assert any(len(cameras) < 6 for cameras in cameras_of.values())
  assert all(names == ["0001.jpg", "0002.jpg"] for names in folders.values())
  for (pid, camera), names in list(folders.items())[:12]:
    with Image.open(os.path.join(tmp_path, f"cam{camera}", f"{pid:04d}", names[0])) as image:
      assert image.format == "JPEG" and image.size == (24, 48)
      pixels = np.asarray(image.convert("RGB"), np.int32)
    channel_spread = np.abs(pixels - pixels.mean(-1, keepdims=True)).mean()
    if camera in (3, 6):
      assert channel_spread < 2.0  # infrared: grey, three (nearly) equal channels
    else:
      assert channel_spread > 5.0


def test_regdb_layout(tmp_path):
  synthetic.write_regdb_tree(str(tmp_path), seed=2, **SMALL_REGDB)
  assert sorted(os.listdir(tmp_path)) == ["Thermal", "Visible", "idx"]
  numbers = {}
  for folder, letter in (("Visible", "v"), ("Thermal", "t")):
    assert sorted(os.listdir(tmp_path / folder), key=int) == [str(i) for i in range(1, 7)]
    for pid in range(1, 7):
      names = os.listdir(tmp_path / folder / str(pid))
      matches = [REGDB_NAME.match(name) for name in names]
      assert len(names) == 3 and all(m and m[3] == letter and m[5] == str(pid) for m in matches)
      numbers[(folder, pid)] = sorted(m[4] for m in matches)
  assert all(numbers[("Visible", pid)] == numbers[("Thermal", pid)] for pid in range(1, 7))
  assert sorted(os.listdir(tmp_path / "idx")) == sorted(
      f"{s}_{m}_{t}.txt" for s in ("train", "test") for m in ("visible", "thermal")
      for t in (1, 2, 3))
  train_sets = []
  for trial in (1, 2, 3):
    split_ids = {}
    for split in ("train", "test"):
      per_modality = []
      for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        rows = parse_regdb_idx(str(tmp_path), split, modality, trial)
        for path, _ in rows:
          assert path.startswith(folder + "/") and os.path.isfile(tmp_path / path)
        pids = [int(path.split("/")[1]) for path, _ in rows]
        labels = [label for _, label in rows]
        assert len(rows) == 3 * 3 and pids == sorted(pids)
        # Labels 0..C-1, in ascending identity order, one identity per label.
        assert sorted(set(labels)) == [0, 1, 2] and labels == sorted(labels)
        assert len({(pid, label) for pid, label in zip(pids, labels)}) == 3
        per_modality.append(list(zip(pids, labels)))
      assert per_modality[0] == per_modality[1]
      split_ids[split] = {pid for pid, _ in per_modality[0]}
    assert split_ids["train"].isdisjoint(split_ids["test"])
    assert split_ids["train"] | split_ids["test"] == set(range(1, 7))
    train_sets.append(split_ids["train"])
  assert len({frozenset(ids) for ids in train_sets}) > 1  # trials draw different splits


def grey_spread(path):
  """Mean distance of a pixel's channels from their mean: ~0 for grey images."""
  with Image.open(path) as image:
    assert image.format == "JPEG" and image.size == (24, 48)
    pixels = np.asarray(image.convert("RGB"), np.int32)
  return np.abs(pixels - pixels.mean(-1, keepdims=True)).mean()


def parse_llcm_test(root, test_ids):
  """{(modality, pid): {camera: sorted names}} from test_vis/ and test_nir/, names checked."""
  folders = {}
  for modality, top in (("vis", "test_vis"), ("nir", "test_nir")):
    for camera_folder in os.listdir(root / top):
      camera = int(camera_folder[3:])
      for pid in os.listdir(root / top / camera_folder):
        assert re.fullmatch(r"\d{4}", pid) and int(pid) in test_ids
        names = sorted(os.listdir(root / top / camera_folder / pid))
        for name in names:
          match = LLCM_NAME.match(name)
          assert match and (match[1], int(match[2]), match[3]) == (pid, camera, modality)
        folders.setdefault((modality, int(pid)), {})[camera] = names
  return folders


def parse_llcm_list(root, modality):
  """[(pid folder, camera, label)] of idx/train_<modality>.txt; checks paths and names."""
  text = (root / "idx" / f"train_{modality}.txt").read_text()
  assert text.endswith("\n") and not text.endswith("\n\n")
  rows = []
  for line in text.splitlines():
    relative, label = line.split(" ")
    top, pid, name = relative.split("/")
    match = LLCM_NAME.match(name)
    assert top == modality and (root / relative).is_file()
    assert match and match[1] == pid and match[3] == modality
    rows.append((int(pid), int(match[2]), int(label)))
  assert len({line.split(" ")[0] for line in text.splitlines()}) == len(rows)
  return rows


def test_llcm_layout(tmp_path):
  synthetic.write_llcm_tree(str(tmp_path), seed=2, **SMALL_LLCM)
  assert sorted(os.listdir(tmp_path)) == ["idx", "nir", "test_nir", "test_vis", "vis"]
  assert sorted(os.listdir(tmp_path / "idx")) == ["test_id.txt", "train_nir.txt",
                                                  "train_vis.txt"]
  assert sorted(os.listdir(tmp_path / "test_vis")) == [f"cam{k}" for k in range(1, 10)]
  assert sorted(os.listdir(tmp_path / "test_nir")) == [f"cam{k}" for k in (1, 2, 4, 5, 6, 7,
                                                                            8, 9)]
  lines = (tmp_path / "idx" / "test_id.txt").read_text().splitlines()
  test_ids = [int(token) for token in lines[0].split(",")]
  assert len(lines) == 1 and len(test_ids) == 5 and test_ids == sorted(set(test_ids))
  test = parse_llcm_test(tmp_path, test_ids)
  assert {pid for _, pid in test} == set(test_ids)
  for cameras in test.values():
    assert 2 <= len(cameras) <= 4 and all(len(names) == 2 for names in cameras.values())
  lists = {modality: parse_llcm_list(tmp_path, modality) for modality in ("vis", "nir")}
  pairs = {modality: sorted({(pid, label) for pid, _, label in rows})
           for modality, rows in lists.items()}
  # Labels 0..3, one per training pid, in ascending pid order, in both lists alike.
  assert pairs["vis"] == pairs["nir"] and [label for _, label in pairs["vis"]] == [0, 1, 2, 3]
  assert [pid for pid, _ in pairs["vis"]] == sorted(pid for pid, _ in pairs["vis"])
  assert not {pid for pid, _ in pairs["vis"]} & set(test_ids)
  for modality, rows in lists.items():
    assert [label for _, _, label in rows] == sorted(label for _, _, label in rows)
    on_disk = sum(len(os.listdir(tmp_path / modality / pid))
                  for pid in os.listdir(tmp_path / modality))
    assert on_disk == len(rows)  # every training image is listed, once (paths are distinct)
    for pid, _ in pairs[modality]:
      cameras = [camera for p, camera, _ in rows if p == pid]
      assert 2 <= len(set(cameras)) <= 4 and len(cameras) == 2 * len(set(cameras))
      assert modality == "vis" or 3 not in cameras
  # Camera k records both modalities: some identity is seen by one camera by day and night.
  assert any(set(test[("vis", pid)]) & set(test[("nir", pid)]) for pid in test_ids)
  for (modality, pid), cameras in list(test.items())[:6]:
    camera, names = next(iter(cameras.items()))
    top = {"vis": "test_vis", "nir": "test_nir"}[modality]
    spread = grey_spread(tmp_path / top / f"cam{camera}" / f"{pid:04d}" / names[0])
    assert spread < 2.0 if modality == "nir" else spread > 5.0


def test_ensure_and_command_line_llcm(tmp_path):
  root = synthetic.ensure_synthetic(str(tmp_path / "llcm"), "llcm", seed=3, **SMALL_LLCM)
  marker = json.loads((tmp_path / "llcm" / synthetic.MARKER_NAME).read_text())
  assert marker["kind"] == "llcm" and marker["params"] == dict(SMALL_LLCM, seed=3)
  synthetic.write_llcm_tree(str(tmp_path / "direct"), seed=3, **SMALL_LLCM)
  written = tree_bytes(root)
  assert written.pop(synthetic.MARKER_NAME) and written == tree_bytes(tmp_path / "direct")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "dakd_jax.data.synthetic", "--root", str(tmp_path / "cli"),
             "--kind", "llcm", "--seed", "3"] + [
                 f"--{name.replace('_', '-')}={value}" for name, value in SMALL_LLCM.items()]
  subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True)
  assert tree_bytes(tmp_path / "cli") == tree_bytes(root)
  with pytest.raises(ValueError, match="unknown parameter"):
    synthetic.ensure_synthetic(str(tmp_path / "other"), "llcm", num_val_ids=1)


def test_writers_refuse_bad_sizes_and_occupied_folders(tmp_path):
  with pytest.raises(ValueError, match="images_per_camera"):
    synthetic.write_sysu_tree(str(tmp_path / "a"), images_per_camera=0)
  with pytest.raises(ValueError, match="height"):
    synthetic.write_regdb_tree(str(tmp_path / "b"), height=8)
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not an empty folder"):
    synthetic.write_regdb_tree(str(tmp_path / "c"), **SMALL_REGDB)
  assert os.listdir(tmp_path / "c") == ["keep.txt"]


def test_ensure_generates_then_reuses(tmp_path):
  root = tmp_path / "deep" / "sysu"
  assert synthetic.ensure_synthetic(str(root), "sysu", **SMALL_SYSU) == str(root)
  with open(root / synthetic.MARKER_NAME, encoding="utf-8") as file:
    marker = json.load(file)
  assert marker["kind"] == "sysu" and marker["format_version"] == synthetic.FORMAT_VERSION
  assert marker["params"] == dict(SMALL_SYSU, seed=0)
  assert marker["num_files"] == len(tree_bytes(root)) - 1
  assert os.listdir(tmp_path / "deep") == ["sysu"]  # no temporary folder left behind
  before = file_stamps(root)
  # Same parameters, with a default spelled out: reused, no file rewritten or replaced.
  assert synthetic.ensure_synthetic(str(root), "sysu", seed=0, **SMALL_SYSU) == str(root)
  assert file_stamps(root) == before


def test_ensure_error_cases(tmp_path):
  root = tmp_path / "regdb"
  synthetic.ensure_synthetic(str(root), "regdb", **SMALL_REGDB)
  before = tree_bytes(root)
  with pytest.raises(FileExistsError, match="generated with"):
    synthetic.ensure_synthetic(str(root), "regdb", **dict(SMALL_REGDB, seed=5))
  with pytest.raises(FileExistsError, match="generated with"):
    synthetic.ensure_synthetic(str(root), "sysu", **SMALL_SYSU)
  with pytest.raises(ValueError, match="unknown parameter"):
    synthetic.ensure_synthetic(str(root), "regdb", num_identities=4)
  with pytest.raises(ValueError, match="kind"):
    synthetic.ensure_synthetic(str(root), "market")
  assert tree_bytes(root) == before
  os.remove(root / "Thermal" / "1" / sorted(os.listdir(root / "Thermal" / "1"))[0])
  with pytest.raises(FileExistsError, match="damaged"):
    synthetic.ensure_synthetic(str(root), "regdb", **SMALL_REGDB)
  (root / synthetic.MARKER_NAME).write_text("{not json")
  with pytest.raises(FileExistsError, match="unreadable marker"):
    synthetic.ensure_synthetic(str(root), "regdb", **SMALL_REGDB)
  users = tmp_path / "users"
  users.mkdir()
  (users / "photo.jpg").write_bytes(b"x")
  with pytest.raises(FileExistsError, match="no synthetic_dataset.json"):
    synthetic.ensure_synthetic(str(users), "regdb", **SMALL_REGDB)
  assert tree_bytes(users) == {"photo.jpg": b"x"}
  with pytest.raises(ValueError, match="num_ids"):  # a failed generation leaves nothing
    synthetic.ensure_synthetic(str(tmp_path / "bad"), "regdb", num_ids=1)
  assert sorted(os.listdir(tmp_path)) == ["regdb", "users"]
  empty = tmp_path / "empty"
  empty.mkdir()
  synthetic.ensure_synthetic(str(empty), "regdb", **SMALL_REGDB)
  assert tree_bytes(empty) == before


def test_command_line(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, "-m", "dakd_jax.data.synthetic", "--root", str(tmp_path / "r"),
             "--kind", "regdb", "--num-ids", "4", "--images-per-modality", "2", "--height",
             "32", "--width", "16", "--num-trials", "2", "--seed", "7"]
  done = subprocess.run(command, cwd=repo, capture_output=True, text=True, check=True)
  assert "ready" in done.stdout
  expected = tmp_path / "e"
  synthetic.write_regdb_tree(str(expected), num_ids=4, images_per_modality=2, height=32,
                             width=16, num_trials=2, seed=7)
  written = tree_bytes(tmp_path / "r")
  assert written.pop(synthetic.MARKER_NAME) and written == tree_bytes(expected)
  failed = subprocess.run(command[:-2] + ["--seed", "8"], cwd=repo, capture_output=True,
                          text=True)
  assert failed.returncode == 2 and "generated with" in failed.stderr


@pytest.mark.parametrize("kind,params", [("sysu", SMALL_SYSU), ("regdb", SMALL_REGDB),
                                         ("llcm", SMALL_LLCM)])
def test_worker_processes_write_the_same_tree_and_marker(tmp_path, kind, params):
  """Persons written by two processes (large trees take every CPU by default) give the bytes
  one process writes, the marker included (the worker count is not a content parameter)."""
  one = synthetic.ensure_synthetic(str(tmp_path / "one"), kind, workers=1, **params)
  two = synthetic.ensure_synthetic(str(tmp_path / "two"), kind, workers=2, **params)
  assert tree_bytes(one) == tree_bytes(two)
  assert synthetic.ensure_synthetic(two, kind, workers=1, **params) == two  # reused as it is
  assert synthetic.default_workers(63) == 1
  assert synthetic.default_workers(64) == (os.cpu_count() or 1)


def pixel_features(paths, centre):
  """Raw pixels, 4 x 4 block means; RGB as is, or grey minus its mean; unit L2 norm."""
  images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float64) for p in paths])
  n, h, w, _ = images.shape
  blocks = images.reshape(n, h // 4, 4, w // 4, 4, 3).mean(axis=(2, 4))
  if centre:
    blocks = blocks.mean(-1)
    blocks = blocks - blocks.mean(axis=(1, 2), keepdims=True)
  features = blocks.reshape(n, -1)
  return features / np.linalg.norm(features, axis=1, keepdims=True)


def rank1_and_chance(query, query_ids, gallery, gallery_ids):
  """Rank-1 of cosine nearest neighbours, and its chance level: the mean over queries of the
  fraction of gallery images that share the query's identity."""
  nearest = np.argmax(query @ gallery.T, axis=1)
  rank1 = np.mean(gallery_ids[nearest] == query_ids)
  chance = np.mean([np.mean(gallery_ids == pid) for pid in query_ids])
  return rank1, chance


def test_raw_pixels_match_within_but_not_across_modalities(tmp_path):
  """The modality gap: infrared queries against the visible images of the test identities, and
  visible queries of camera 1 against cameras 4 and 5 (other scenes, same modality)."""
  synthetic.write_sysu_tree(str(tmp_path), num_train_ids=1, num_val_ids=1, num_test_ids=24,
                            images_per_camera=5, height=128, width=64, seed=0)
  folders = {key: names for key, names in parse_sysu(str(tmp_path)).items()
             if key[0] in read_ids(str(tmp_path), "test")}
  def gather(cameras):
    items = [(pid, os.path.join(tmp_path, f"cam{camera}", f"{pid:04d}", name))
             for (pid, camera), names in sorted(folders.items()) if camera in cameras
             for name in names]
    return np.array([pid for pid, _ in items]), [path for _, path in items]
  groups = {"infrared": gather((3, 6)), "visible": gather((1, 2, 4, 5)),
            "cam1": gather((1,)), "cam45": gather((4, 5))}
  results = {}
  for centre in (False, True):
    features = {name: pixel_features(paths, centre) for name, (_, paths) in groups.items()}
    ids = {name: pids for name, (pids, _) in groups.items()}
    cross, cross_chance = rank1_and_chance(features["infrared"], ids["infrared"],
                                           features["visible"], ids["visible"])
    same, same_chance = rank1_and_chance(features["cam1"], ids["cam1"], features["cam45"],
                                         ids["cam45"])
    print(f"centre={centre}: infrared->visible rank-1 {cross:.3f} (chance {cross_chance:.3f}),"
          f" cam1->cam4/5 rank-1 {same:.3f} (chance {same_chance:.3f})")
    results[centre] = cross, same
    chance = cross_chance
  # Colour pixels find the identity within the visible modality, but not across modalities;
  # colour-blind, contrast-normalised grey pixels do better across (near-infrared brightness
  # loosely follows luminance) but stay far below the within-modality colour match.
  (colour_cross, colour_same), (grey_cross, _) = results[False], results[True]
  assert colour_same > 5 * same_chance
  assert colour_cross < 3 * chance
  assert 2 * grey_cross < colour_same


class TerminalStream(io.StringIO):
  """stderr as a terminal: tqdm draws its bars only there."""

  def isatty(self):
    return True


@pytest.mark.parametrize("kind, params, persons", [
    ("sysu", SMALL_SYSU, 8), ("regdb", SMALL_REGDB, 6), ("llcm", SMALL_LLCM, 9)])
def test_progress_shows_a_notice_and_a_bar_and_changes_nothing_written(
    tmp_path, monkeypatch, capsys, kind, params, persons):
  quiet, shown = tmp_path / "quiet", tmp_path / "shown"
  synthetic.ensure_synthetic(str(quiet), kind, **params)
  assert capsys.readouterr().err == ""
  synthetic.ensure_synthetic(str(shown), kind, show_progress=True, **params)
  # Not a terminal (a log, a CI run): the one-line notice only, no bar.
  assert capsys.readouterr().err == f"dakd_jax: generating a synthetic {kind} dataset into " \
                                    f"{shown}\n"
  assert tree_bytes(quiet) == tree_bytes(shown)  # the marker included: progress is not content
  synthetic.ensure_synthetic(str(shown), kind, show_progress=True, **params)
  assert capsys.readouterr().err == ""  # reused: nothing to say
  terminal = TerminalStream()
  monkeypatch.setattr(sys, "stderr", terminal)
  synthetic.ensure_synthetic(str(tmp_path / "terminal"), kind, show_progress=True, **params)
  assert f"generating synthetic {kind} persons:   0%" in terminal.getvalue()
  assert f"0/{persons}" in terminal.getvalue()
