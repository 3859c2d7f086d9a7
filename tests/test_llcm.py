"""Tests for the LLCM reader and test sets (llcm.md 2, 3.1, 3.2) on synthetic LLCM trees.

The sets are compared with a re-statement of the reference loaders written below (test ids from
idx/test_id.txt as 4-digit strings, the camera lists in order, sorted `os.listdir` paths, global
`random.seed(trial)` and module-level `random.choice`). Identities and cameras of the expected
rows come from the loop variables, never from the path text. The tree's root sits below a folder
whose name contains "cam", which the reference's own path parsing gets wrong.
"""
import os
import random
import shutil

import numpy as np
import pytest

from dakd_jax.data import llcm, protocols, synthetic
from dakd_jax.data.records import INFRARED, VISIBLE, DatasetError, Protocol, ProtocolOptions
from dakd_jax.data.records import describe, records_of
from dakd_jax.evaluation import rank_metrics

TREE = dict(num_train_ids=5, num_test_ids=6, images_per_camera=3, height=32, width=16, seed=1)
CAMERA_LISTS = {VISIBLE: ("test_vis", [f"cam{k}" for k in range(1, 10)]),
                INFRARED: ("test_nir", [f"cam{k}" for k in (1, 2, 4, 5, 6, 7, 8, 9)])}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("camera_root") / "cam7_llcm"
  synthetic.write_llcm_tree(str(root), **TREE)
  return str(root)


@pytest.fixture
def copy(tree, tmp_path):
  """A private copy of the tree, to damage (same "cam" in the path above the root)."""
  root = tmp_path / "camera_root" / "cam3_copy"
  shutil.copytree(tree, root)
  return root


@pytest.fixture(autouse=True)
def keep_global_random_state():
  state = random.getstate()
  yield
  random.setstate(state)


def reference_ids(root):
  with open(os.path.join(root, "idx", "test_id.txt")) as file:
    return ["%04d" % int(token) for token in file.read().splitlines()[0].split(",")]


def reference_folders(root, modality):
  """[(identity, camera, sorted full paths)] of existing folders, in the reference's loop order."""
  top, cameras = CAMERA_LISTS[modality]
  found = []
  for pid in sorted(reference_ids(root)):
    for camera in cameras:
      folder = os.path.join(root, top, camera, pid)
      if os.path.isdir(folder):
        found.append((int(pid), int(camera[3:]),
                      sorted(folder + "/" + name for name in os.listdir(folder))))
  return found


def reference_full(root, modality):
  return [(path, pid, camera, modality) for pid, camera, paths in reference_folders(root, modality)
          for path in paths]


def reference_sampled(root, modality, trial):
  random.seed(trial)
  return [(random.choice(paths), pid, camera, modality)
          for pid, camera, paths in reference_folders(root, modality)]


def rows(records):
  return [(r.path, r.identity, r.camera, r.modality) for r in records]


def test_full_sets_in_reference_order(tree):
  for modality in (VISIBLE, INFRARED):
    full = llcm.llcm_full_set(tree, modality)
    assert rows(full) == reference_full(tree, modality)
    assert len({r.identity for r in full}) == 6 and all(os.path.isfile(r.path) for r in full)
  test = llcm.read_llcm_split(tree, "test")
  assert rows(test) == reference_full(tree, VISIBLE) + reference_full(tree, INFRARED)
  assert {r.camera for r in records_of(test, INFRARED)} <= {1, 2, 4, 5, 6, 7, 8, 9}


@pytest.mark.parametrize("modality", [VISIBLE, INFRARED])
def test_sampled_sets_replay_reference_draws(tree, modality):
  num_folders = len(reference_folders(tree, modality))
  draws = set()
  for trial in range(10):
    sampled = llcm.llcm_sampled_set(tree, modality, trial)
    assert rows(sampled) == reference_sampled(tree, modality, trial)
    assert len(sampled) == num_folders  # one per existing id/camera folder, every trial
    draws.add(tuple(r.path for r in sampled))
  assert len(draws) == 10  # the seed matters


def test_sampled_set_leaves_global_random_state_alone(tree):
  random.seed(99)
  before = random.getstate()
  llcm.llcm_sampled_set(tree, VISIBLE, 4)
  assert random.getstate() == before


def test_query_gallery_directions_and_variants(tree):
  for trial in (0, 7):
    full = {m: rows(llcm.llcm_full_set(tree, m)) for m in (VISIBLE, INFRARED)}
    sampled = {m: rows(llcm.llcm_sampled_set(tree, m, trial)) for m in (VISIBLE, INFRARED)}
    for variant in llcm.VIS_TO_IR_VARIANTS:  # the variant does not touch IR->VIS
      query, gallery = llcm.llcm_query_gallery(tree, trial, "infrared_to_visible", variant)
      assert (rows(query), rows(gallery)) == (full[INFRARED], sampled[VISIBLE])
    plain = llcm.llcm_query_gallery(tree, trial, "visible_to_infrared")
    assert (rows(plain[0]), rows(plain[1])) == (full[VISIBLE], sampled[INFRARED])
    deen = llcm.llcm_query_gallery(tree, trial, "visible_to_infrared", "deen_test_script")
    # The test scripts' [2, 1] branch: the plain sets with their roles swapped.
    assert (rows(deen[0]), rows(deen[1])) == (rows(plain[1]), rows(plain[0]))


def test_deen_variant_is_the_reference_transposed_score_matrix(tree):
  # The reference scores gallery x query of the plain sets and passes the gallery's labels and
  # cameras as the query's; that is the variant's own query/gallery evaluated directly.
  query, gallery = llcm.llcm_query_gallery(tree, 3, "visible_to_infrared")
  rng = np.random.default_rng(0)
  features = {r.path: rng.normal(size=8) + 0.8 * np.eye(8)[r.identity % 8]
              for r in query + gallery}
  def distmat(left, right):
    return -np.array([[features[a.path] @ features[b.path] for b in right] for a in left])
  def fields(records, name):
    return np.array([getattr(r, name) for r in records])
  reference = rank_metrics(distmat(query, gallery).T, fields(gallery, "identity"),
                           fields(query, "identity"), fields(gallery, "camera"),
                           fields(query, "camera"), protocol="llcm", max_rank=5)
  deen_query, deen_gallery = llcm.llcm_query_gallery(tree, 3, "visible_to_infrared",
                                                     "deen_test_script")
  ours = rank_metrics(distmat(deen_query, deen_gallery), fields(deen_query, "identity"),
                      fields(deen_gallery, "identity"), fields(deen_query, "camera"),
                      fields(deen_gallery, "camera"), protocol="llcm", max_rank=5)
  np.testing.assert_allclose(ours["cmc"], reference["cmc"])
  assert (ours["mAP"], ours["mINP"]) == pytest.approx((reference["mAP"], reference["mINP"]))
  assert ours["num_valid_queries"] == len(deen_query)


def test_cameras_and_identities_from_components_below_a_root_with_cam(tree):
  assert "cam" in os.path.dirname(tree) and "cam" in os.path.basename(tree)
  records = llcm.read_llcm_split(tree, "test")
  substring_cameras = []
  for record in records:
    top, camera, pid, _ = os.path.relpath(record.path, tree).split(os.sep)
    assert (record.camera, record.identity) == (int(camera[3:]), int(pid))
    assert record.modality == {"test_vis": VISIBLE, "test_nir": INFRARED}[top]
    text = record.path.split("cam")[1][0]  # the reference's parse: after the first "cam"
    substring_cameras.append(int(text) if text.isdigit() else None)
  assert substring_cameras != [r.camera for r in records]  # the trap is real for this root


def test_parse_test_path():
  assert llcm.parse_test_path("test_nir/cam9/0042/x.jpg") == (INFRARED, 9, 42)
  assert llcm.parse_test_path(os.path.join("test_vis", "cam3", "0001", "a.png")) == (
      VISIBLE, 3, 1)
  for bad in ("test_nir/cam3/0001/x.jpg", "test_vis/cam10/0001/x.jpg", "test_vis/cam0/0001/x",
              "test_vis/cam1/001/x.jpg", "test_vis/cam1/0001/", "test_vis/cam1/0001/a/x.jpg",
              "vis/cam1/0001/x.jpg", "test_vis/camera1/0001/x.jpg", "test_vis/cam1/00a1/x.jpg"):
    with pytest.raises(DatasetError, match="is not '<test_vis|test_nir>/cam<k>/"):
      llcm.parse_test_path(bad)


def read_list(root, name):
  """[(absolute path, label, camera from the name's `_c<camera>_` field)] of one list."""
  with open(os.path.join(root, "idx", name)) as file:
    lines = file.read().splitlines()
  result = []
  for line in lines:
    relative, label = line.split(" ")
    camera = int(os.path.basename(relative).split("_")[1][1:])
    result.append((os.path.join(root, *relative.split("/")), int(label), camera))
  return result


def test_train_records_follow_the_lists(tree):
  records = llcm.read_llcm_split(tree, "train")
  expected = [(path, label, camera, modality)
              for name, modality in (("train_vis.txt", VISIBLE), ("train_nir.txt", INFRARED))
              for path, label, camera in read_list(tree, name)]
  assert rows(records) == expected
  for modality in (VISIBLE, INFRARED):
    assert {r.identity for r in records_of(records, modality)} == set(range(5))


def test_train_camera_is_unknown_without_the_release_naming(copy):
  os.rename(copy / "vis", copy / "day")
  lines = (copy / "idx" / "train_vis.txt").read_text().splitlines()
  renamed = []
  for number, line in enumerate(lines):
    relative, label = line.split(" ")
    new = f"day/{relative.split('/')[1]}/img{number:03d}.jpg"
    os.rename(copy / "day" / relative.split("/", 1)[1], copy / new)
    renamed.append(f"{new} {label}")
  (copy / "idx" / "train_vis.txt").write_text("\n".join(renamed) + "\n")
  visible = records_of(llcm.read_llcm_split(str(copy), "train"), VISIBLE)
  assert {r.camera for r in visible} == {llcm.UNKNOWN_CAMERA} and len(visible) == len(lines)


def rewrite_labels(path, change):
  """Applies change(label) -> label or None (drop the line); returns the new (label) lines."""
  kept = []
  for line in path.read_text().splitlines():
    relative, label = line.split(" ")
    new = change(int(label))
    if new is not None:
      kept.append((relative, new))
  path.write_text("".join(f"{relative} {label}\n" for relative, label in kept))
  return [label for _, label in kept]


def test_train_labels_must_be_contiguous(copy):
  labels = rewrite_labels(copy / "idx" / "train_nir.txt", lambda l: l + 1 if l >= 2 else l)
  line = labels.index(5) + 1  # labels 0, 1, 3, 4, 5: the first line with a label >= 5
  with pytest.raises(DatasetError, match=rf"train_nir\.txt, line {line}: label 5 breaks the "
                     r"labels 0\.\.C-1 .*missing e\.g\. \[2\]"):
    llcm.read_llcm_split(str(copy), "train")


def test_train_label_sets_must_match(copy):
  rewrite_labels(copy / "idx" / "train_nir.txt", lambda l: None if l == 4 else l)
  labels = [label for _, label, _ in read_list(str(copy), "train_vis.txt")]
  line = labels.index(4) + 1
  with pytest.raises(DatasetError, match=rf"train_vis\.txt, line {line}: label 4 has no image in "
                     r".*train_nir\.txt \(which has labels 0\.\.3\)"):
    llcm.read_llcm_split(str(copy), "train")


@pytest.mark.parametrize("line, message", [
    ("vis/x.jpg", r"line 2 has 1 fields"),
    ("vis/x.jpg 1 2", r"line 2 has 3 fields"),
    ("vis/x.jpg one", r"line 2 has label 'one', not an integer"),
    ("/abs/x.jpg 0", r"line 2 gives an absolute image path"),
    ("vis/gone.jpg 0", r"line 2 not found: .*gone\.jpg"),
])
def test_train_bad_lines(copy, line, message):
  path = copy / "idx" / "train_vis.txt"
  lines = path.read_text().splitlines()
  lines[1] = line
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(DatasetError, match=r"train_vis\.txt.*" + message):
    llcm.read_llcm_split(str(copy), "train")


def first_test_folder(root, top="test_vis"):
  """(camera folder name, pid) of the first existing id folder under `top`, and a test pid
  that has no folder under that camera."""
  pids = reference_ids(str(root))
  for camera in sorted(os.listdir(root / top)):
    present = sorted(os.listdir(root / top / camera))
    absent = [pid for pid in pids if pid not in present]
    if present and absent:
      return camera, present[0], absent[0]
  raise AssertionError("the tree has no camera that misses a test identity")


def test_empty_id_camera_folder_is_refused(copy):
  camera, _, absent = first_test_folder(copy)
  (copy / "test_vis" / camera / absent).mkdir()
  with pytest.raises(DatasetError, match=rf"test_vis.{camera}.{absent} is empty"):
    llcm.llcm_sampled_set(str(copy), VISIBLE, 0)
  shutil.rmtree(copy / "test_vis" / camera / absent)
  camera, present, _ = first_test_folder(copy, "test_nir")
  for name in os.listdir(copy / "test_nir" / camera / present):
    os.remove(copy / "test_nir" / camera / present / name)
  for call in (lambda: llcm.llcm_full_set(str(copy), VISIBLE),
               lambda: llcm.read_llcm_split(str(copy), "test")):
    with pytest.raises(DatasetError, match=rf"test_nir.{camera}.{present} is empty"):
      call()


def test_stray_file_is_refused_and_nir_camera_3_is_ignored(copy):
  # The reference's near-infrared camera list has no cam3: a folder there changes nothing.
  shutil.copytree(copy / "test_vis" / "cam1", copy / "test_nir" / "cam3")
  assert rows(llcm.llcm_sampled_set(str(copy), INFRARED, 2)) == reference_sampled(
      str(copy), INFRARED, 2)
  camera, present, _ = first_test_folder(copy)
  (copy / "test_vis" / camera / present / "notes.txt").write_text("x")
  with pytest.raises(DatasetError, match=rf"not an image file .*{camera}.{present}.notes\.txt"):
    llcm.llcm_full_set(str(copy), VISIBLE)


@pytest.mark.parametrize("text, message", [
    ("", r"test_id\.txt, line 1 is empty"),
    ("3,x", r"line 1, token 2 is 'x'"),
    ("3,12345", r"token 2 is '12345'"),
    ("{first},{first}", r"lists identity \d+ twice"),
    ("{first},9999", r"test identity 9999 of .*test_id\.txt has no folder"),
])
def test_test_id_file_errors(copy, text, message):
  first = reference_ids(str(copy))[0]
  (copy / "idx" / "test_id.txt").write_text(text.format(first=int(first)) + "\n")
  with pytest.raises(DatasetError, match=message):
    llcm.llcm_query_gallery(str(copy), 0, "infrared_to_visible")


def test_missing_files_and_folders(copy, tmp_path):
  with pytest.raises(DatasetError, match=r"LLCM root not found: .*nowhere"):
    llcm.read_llcm_split(str(tmp_path / "nowhere"), "test")
  shutil.rmtree(copy / "test_nir")
  with pytest.raises(DatasetError, match=r"LLCM test folder not found: .*test_nir"):
    llcm.read_llcm_split(str(copy), "test")
  os.remove(copy / "idx" / "train_nir.txt")
  with pytest.raises(DatasetError, match=r"training list not found: .*train_nir\.txt"):
    llcm.read_llcm_split(str(copy), "train")
  os.remove(copy / "idx" / "test_id.txt")
  with pytest.raises(DatasetError, match=r"test id file not found: .*test_id\.txt"):
    llcm.llcm_full_set(str(copy), VISIBLE)
  shutil.rmtree(copy / "idx")
  with pytest.raises(DatasetError, match=r"index folder not found"):
    llcm.read_llcm_split(str(copy), "train")


@pytest.mark.parametrize("call, message", [
    (lambda root: llcm.read_llcm_split(root, "val"), r"split must be one of"),
    (lambda root: llcm.llcm_full_set(root, "thermal"), r"modality must be one of"),
    (lambda root: llcm.llcm_sampled_set(root, VISIBLE, -1), r"trial must be a non-negative"),
    (lambda root: llcm.llcm_sampled_set(root, VISIBLE, True), r"trial must be a non-negative"),
    (lambda root: llcm.llcm_query_gallery(root, 0, "visible_to_thermal"), r"direction must be"),
    (lambda root: llcm.llcm_query_gallery(root, 0, "visible_to_infrared", "deen"),
     r"vis_to_ir must be one of \('plain', 'deen_test_script'\)"),
])
def test_argument_errors(tree, call, message):
  with pytest.raises(DatasetError, match=message):
    call(tree)


def test_describe_counts_per_camera(tree):
  rows, modality = {}, None
  for line in describe(llcm.read_llcm_split(tree, "test"), "llcm test").splitlines()[4:]:
    name, *numbers = [field.strip() for field in line.split("|")]
    if not numbers:
      continue
    if name in (VISIBLE, INFRARED, "total"):
      modality = name
    rows[(modality, name)] = tuple(int(n) for n in numbers)
  for code, folder_modality in ((VISIBLE, VISIBLE), (INFRARED, INFRARED)):
    folders = reference_folders(tree, folder_modality)
    assert rows[(code, code)] == (6, len(reference_full(tree, folder_modality)))
    for camera in sorted({c for _, c, _ in folders}):
      in_camera = [f for f in folders if f[1] == camera]
      assert rows[(code, f"camera {camera}")][0] == len({i for i, _, _ in in_camera})
  assert (INFRARED, "camera 3") not in rows


def test_protocol_entry_point_and_settings(tree):
  """protocols.query_gallery(Protocol("llcm", t, direction=...)) is llcm_query_gallery; the
  variant is part of the setting name, so every result says which reading it is."""
  options = ProtocolOptions(num_trials=2, values={"llcm_vis_to_ir": "deen_test_script"})
  made = llcm.make_protocols(options)
  assert [p.name for p in made] == [
      "llcm/infrared_to_visible/trial-0", "llcm/infrared_to_visible/trial-1",
      "llcm/visible_to_infrared/deen_test_script/trial-0",
      "llcm/visible_to_infrared/deen_test_script/trial-1"]
  assert [p.name for p in llcm.make_protocols(options, during_training=True)] == [
      "llcm/infrared_to_visible/trial-0", "llcm/infrared_to_visible/trial-1"]
  paths = lambda records: [r.path for r in records]
  for trial in (0, 3):
    for direction in llcm.DIRECTIONS:
      query, gallery = protocols.query_gallery(Protocol("llcm", trial, direction=direction),
                                               tree)
      expected = llcm.llcm_query_gallery(tree, trial, direction, "plain")
      assert (paths(query), paths(gallery)) == tuple(map(paths, expected))
    query, gallery = protocols.query_gallery(
        Protocol("llcm", trial, direction="visible_to_infrared", variant="deen_test_script"),
        tree)
    expected = llcm.llcm_query_gallery(tree, trial, "visible_to_infrared", "deen_test_script")
    assert (paths(query), paths(gallery)) == tuple(map(paths, expected))
  for bad in (Protocol("llcm", 0, direction="visible_to_thermal"),
              Protocol("llcm", 0, mode="all", shots=1, direction="infrared_to_visible"),
              Protocol("llcm", -1, direction="infrared_to_visible")):
    with pytest.raises(ValueError):
      protocols.check_protocol(bad)


@pytest.mark.slow
def test_stage_all_on_a_tiny_llcm_tree(tmp_path):
  """run.py with configs/llcm.py on a generated LLCM tree: teacher, student, evaluation of both
  directions (the visible->infrared reading named in every result) and a picture per direction."""
  import json
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  overrides = {
      "data.root": str(tmp_path / "llcm"), "data.prepared_dir": str(tmp_path / "tfds"),
      "synthetic.enabled": True, "synthetic.num_train_ids": 5, "synthetic.num_val_ids": 1,
      "synthetic.num_test_ids": 4, "synthetic.images_per_camera": 2,
      "data.image_height": 96, "data.image_width": 48, "model.depth": 10, "model.width": 4,
      "model.non_local": False, "data.ids_per_batch": 2, "data.images_per_id": 2,
      "data.num_workers": 0, "eval.batch_size": 16, "eval.num_trials": 2, "eval.max_rank": 4,
      "teacher.epochs": 1, "teacher.steps_per_epoch": 2, "teacher.warmup_epochs": 0,
      "teacher.decay_epochs": "(0,1)", "distill.epochs": 1, "distill.steps_per_epoch": 2,
      "eval.llcm_vis_to_ir": "deen_test_script", "log.progress": False,
      "eval.num_visual_queries": 2, "eval.visual_top_k": 3}
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      [sys.executable, "run.py", "--config=configs/llcm.py", f"--workdir={workdir}",
       *[f"--config.{k}={v}" for k, v in overrides.items()]],
      cwd=repo, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.load(open(os.path.join(workdir, "eval", "results.json")))
  assert sorted(summary["results"]) == ["llcm/infrared_to_visible",
                                        "llcm/visible_to_infrared/deen_test_script"]
  assert summary["protocol"]["dataset"] == "llcm" and summary["protocol"]["trials"] == [0, 1]
  root = str(tmp_path / "llcm")
  for setting, trials in summary["results"].items():
    for trial in trials["trials"]:
      direction = setting.split("/")[1]
      query, gallery = llcm.llcm_query_gallery(root, trial["trial"], direction,
                                               "deen_test_script")
      assert (trial["num_query"], trial["num_gallery"]) == (len(query), len(gallery))
  for name in ("ranked_llcm_infrared_to_visible.png",
               "ranked_llcm_visible_to_infrared_deen_test_script.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 1000


def test_a_missing_camera_folder_is_named_in_one_warning(copy, capsys):
  shutil.rmtree(copy / "test_vis" / "cam5")
  shutil.rmtree(copy / "test_nir" / "cam9")
  records = llcm.read_split(str(copy), "test")
  assert not any("/test_vis/cam5/" in r.path for r in records)
  lines = capsys.readouterr().err.splitlines()
  assert lines == [f"dakd_jax: warning: LLCM: 2 test camera folder(s) missing: "
                   f"{copy}/test_vis/cam5, {copy}/test_nir/cam9; their cameras take no part in "
                   "the evaluation (restore them from the release)"]
  llcm.read_split(str(copy), "train")
  assert capsys.readouterr().err == ""


def test_the_default_synthetic_tree_fills_the_llcm_config_cmc(tmp_path):
  """configs/llcm.py as is (eval.max_rank 20) on `python -m dakd_jax.data.synthetic --kind
  llcm`'s tree: every gallery holds at least 20 distinct identities."""
  from dakd_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  root = str(tmp_path / "llcm")
  synthetic.main(["--root", root, "--kind", "llcm", "--height", "16", "--width", "16",
                  "--images-per-camera", "1"])
  max_rank = config_lib.load_config("configs/llcm.py", validate_config=False).eval.max_rank
  for modality in (VISIBLE, INFRARED):
    gallery = llcm.llcm_sampled_set(root, modality, 0)
    assert len({r.identity for r in gallery}) >= max_rank == 20
