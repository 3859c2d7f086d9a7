"""LLCM on disk: index lists and test folders turned into `ImageRecord` lists, and its test sets.

First step of the data flow for LLCM (llcm.md 2, 3.1, 3.2): `read_llcm_split` gives the training
images (for the TFDS builder) or all test images; `llcm_full_set`, `llcm_sampled_set` and
`llcm_query_gallery` give the query and gallery records of one trial and direction. Layout:

  <root>/idx/train_vis.txt, idx/train_nir.txt   "<path relative to root> <int label>" per line
  <root>/idx/test_id.txt                        first line: comma-separated integer test ids
  <root>/test_vis/cam1 .. cam9/<pid as 4 digits>/<image>
  <root>/test_nir/cam1, cam2, cam4 .. cam9/<pid as 4 digits>/<image>   (no cam3)

Modality comes from the list or the folder (`*_vis` visible, `*_nir` near-infrared = INFRARED),
not from the camera: camera k records both. Test cameras and identities are parsed from the path
components below the root (`parse_test_path`), never by searching the full path for "cam" as the
reference does, which breaks when the root itself contains "cam". Training labels are used exactly
as written (no relabelling), so they must be 0..C-1 and the same set in both lists. Everything is
checked before anything is returned: a problem is a `DatasetError` naming the path (and line),
what was found and the fix.
"""
from __future__ import annotations

import os
import random
import re
import sys
from dakd_jax.data import dataset_files
from dakd_jax.data.records import INFRARED, MODALITIES, VISIBLE, DatasetError, ImageRecord
from dakd_jax.data.records import CameraRule, EvalOption, Protocol, ProtocolOptions
from dakd_jax.data.records import parse_list_line

DATASET_NAME = "llcm"
SPLITS = ("train", "test")
# Camera lists in the reference's order (llcm.md 3.1); near-infrared has no camera 3.
MODALITY_CAMERAS = {VISIBLE: (1, 2, 3, 4, 5, 6, 7, 8, 9), INFRARED: (1, 2, 4, 5, 6, 7, 8, 9)}
TEST_FOLDERS = {VISIBLE: "test_vis", INFRARED: "test_nir"}
TRAIN_LISTS = {VISIBLE: "train_vis.txt", INFRARED: "train_nir.txt"}
TRIALS = tuple(range(10))
DIRECTIONS = ("infrared_to_visible", "visible_to_infrared")
# Camera k records both modalities: a query never sees its own identity from its own camera
# number; CMC counts distinct identities (llcm.md 3.3).
CAMERA_RULE = CameraRule("llcm", removes_same_identity_same_camera=True,
                         distinct_identity_cmc=True)
# What "visible_to_infrared" means (llcm.md 3.2, 6.1): "plain" = all visible queries against the
# sampled near-infrared gallery; "deen_test_script" = what DEEN's and AGW's test.py compute:
# sampled near-infrared queries against all visible images.
VIS_TO_IR_VARIANTS = ("plain", "deen_test_script")
# Its evaluation settings (config eval.<name>): the query directions (() = both) and the
# visible->infrared reading.
DIRECTIONS_OPTION = EvalOption("directions", DIRECTIONS, (), may_be_empty=True)
VIS_TO_IR_OPTION = EvalOption("llcm_vis_to_ir", VIS_TO_IR_VARIANTS, "plain")
EVAL_OPTIONS = (DIRECTIONS_OPTION, VIS_TO_IR_OPTION)
# Camera of a training image whose file name does not carry one (the lists give none).
UNKNOWN_CAMERA = 0
# Accepted in an id/camera folder; anything else is refused rather than skipped, because the
# reference draws from every directory entry (see sysu.IMAGE_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# Release file names (llcm.md 2, third-party): <pid>_c<camera, 2 digits>_s<digits>_f<frame>_...
_TRAIN_NAME = re.compile(r"\d+_c(\d+)_.+")
_CAMERA_FOLDER = re.compile(r"cam(\d)")
_PID_FOLDER = re.compile(r"\d{4}")


def check_root(root: str) -> str:
  """Checks that `root` is a folder holding idx/; returns its absolute path.

  Raises DatasetError naming the missing root or idx folder.
  """
  if not os.path.isdir(root):
    raise DatasetError(
        f"LLCM root not found: {root!r}. Expected a folder holding idx/, test_vis/, test_nir/ "
        "and the training folders (the extracted LLCM release); set the data root in the config.")
  root = os.path.abspath(root)
  if not os.path.isdir(os.path.join(root, "idx")):
    raise DatasetError(
        f"LLCM index folder not found: {os.path.join(root, 'idx')}. Expected idx/train_vis.txt, "
        "idx/train_nir.txt and idx/test_id.txt as shipped with the release.")
  return root


def _parse_list_line(path: str, number: int, line: str, root: str) -> tuple[str, int]:
  """One training-list line -> (absolute image path, label); the image must exist."""
  image, label = parse_list_line(path, number, line, root, "LLCM training list")
  if not os.path.isfile(image):
    raise DatasetError(
        f"LLCM image listed in {path}, line {number} not found: {image}. Re-extract the "
        "release or fix the list.")
  return image, label


def train_camera(path: str) -> int:
  """Camera of a training image from its file name `<pid>_c<camera>_...`, else UNKNOWN_CAMERA.

  The training lists give a path and a label only; the camera is known only where the file name
  follows the release's naming (llcm.md 2). Training does not use cameras.
  """
  match = _TRAIN_NAME.fullmatch(os.path.basename(path))
  return int(match.group(1)) if match else UNKNOWN_CAMERA


def _read_train_list(root: str, modality: str) -> tuple[str, list[ImageRecord], list[int]]:
  """(list path, records in list order, line number of each record) of one training list."""
  path = os.path.join(root, "idx", TRAIN_LISTS[modality])
  if not os.path.isfile(path):
    raise DatasetError(
        f"LLCM training list not found: {path}. Expected idx/train_vis.txt and "
        "idx/train_nir.txt as shipped with the release.")
  with open(path, "r", encoding="utf-8") as file:
    lines = file.read().splitlines()
  records, numbers = [], []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue  # Blank lines (e.g. a trailing one) carry nothing.
    image, label = _parse_list_line(path, number, line, root)
    records.append(ImageRecord(path=image, identity=label, camera=train_camera(image),
                               modality=modality))
    numbers.append(number)
  if not records:
    raise DatasetError(f"LLCM training list {path} lists no images.")
  return path, records, numbers


def _check_contiguous(path: str, labels: list[int], numbers: list[int]) -> None:
  """Labels must be exactly 0..C-1: the reference indexes per-label image lists by label."""
  distinct = sorted(set(labels))
  count = len(distinct)
  # C distinct integers are {0..C-1} iff all lie in [0, C): name the first line that does not.
  for label, number in zip(labels, numbers):
    if not 0 <= label < count:
      missing = sorted(set(range(count)) - set(distinct))[:5]
      raise DatasetError(
          f"LLCM training list {path}, line {number}: label {label} breaks the labels 0..C-1 "
          f"({count} distinct labels from {distinct[0]} to {distinct[-1]}, missing e.g. "
          f"{missing}). Labels are used as written (the class index), so the list must use "
          "0..C-1; use the lists shipped with the release or relabel both lists alike.")


def _check_same_labels(lists: dict) -> None:
  """Both training lists must hold the same label set (every identity in both modalities)."""
  for modality, other in ((VISIBLE, INFRARED), (INFRARED, VISIBLE)):
    path, records, numbers = lists[modality]
    other_labels = {r.identity for r in lists[other][1]}
    for record, number in zip(records, numbers):
      if record.identity not in other_labels:
        raise DatasetError(
            f"LLCM training list {path}, line {number}: label {record.identity} has no image "
            f"in {lists[other][0]} (which has labels 0..{max(other_labels)}). Both lists must "
            "hold the same labels: every training identity needs both modalities.")


def read_llcm_train(root: str) -> list[ImageRecord]:
  """The LLCM training images: idx/train_vis.txt then idx/train_nir.txt, each in list order.

  Returns: records with identity = the label as written (no relabelling; 713 identities on the
    real data), camera from the file name (`train_camera`), modality VISIBLE or INFRARED from the
    list, absolute paths.
  Raises DatasetError: root or list missing, a list empty, a malformed line, a listed image
    missing, labels of a list not exactly 0..C-1, or the two lists' label sets differing (each
    naming the file and line).
  """
  root = check_root(root)
  lists = {modality: _read_train_list(root, modality) for modality in (VISIBLE, INFRARED)}
  for path, records, numbers in lists.values():
    _check_contiguous(path, [r.identity for r in records], numbers)
  _check_same_labels(lists)
  return lists[VISIBLE][1] + lists[INFRARED][1]


def read_test_ids(root: str) -> list[int]:
  """The test identities of idx/test_id.txt (first line, comma-separated), ascending.

  Raises DatasetError: file missing, first line empty, a token that is not an integer in
    0..9999 (4-digit folder names), an identity listed twice.
  """
  path = os.path.join(root, "idx", "test_id.txt")
  if not os.path.isfile(path):
    raise DatasetError(f"LLCM test id file not found: {path}. Expected idx/test_id.txt as "
                       "shipped with the release.")
  with open(path, "r", encoding="utf-8") as file:
    lines = file.read().splitlines()
  if not lines or not lines[0].strip():
    raise DatasetError(f"LLCM test id file {path}, line 1 is empty. Expected comma-separated "
                       "integer identities on the first line, e.g. '3,7,12'.")
  ids = []
  for position, token in enumerate(lines[0].split(","), start=1):
    text = token.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 9999:
      raise DatasetError(
          f"LLCM test id file {path}, line 1, token {position} is {token!r}. Expected "
          "comma-separated integer identities between 0 and 9999 (4-digit folder names).")
    if int(text) in ids:
      raise DatasetError(f"LLCM test id file {path}, line 1 lists identity {int(text)} twice. "
                         "Each identity may appear once; fix the file.")
    ids.append(int(text))
  return sorted(ids)


def parse_test_path(relative_path: str) -> tuple[str, int, int]:
  """(modality, camera, identity) of a test image from its path relative to the LLCM root.

  The path must have exactly the components `test_vis|test_nir / cam<k> / <pid, 4 digits> /
  <file>` ("/" or the OS separator), with k a camera of that modality; nothing above the root
  takes part, so a root containing "cam" cannot confuse it.
  Raises DatasetError naming the path and the expected form.
  """
  parts = relative_path.replace(os.sep, "/").split("/")
  folders = {folder: modality for modality, folder in TEST_FOLDERS.items()}
  if len(parts) == 4 and parts[0] in folders and parts[3]:
    modality = folders[parts[0]]
    camera, pid = _CAMERA_FOLDER.fullmatch(parts[1]), _PID_FOLDER.fullmatch(parts[2])
    if camera and pid and int(camera.group(1)) in MODALITY_CAMERAS[modality]:
      return modality, int(camera.group(1)), int(parts[2])
  raise DatasetError(
      f"LLCM test image path {relative_path!r} is not '<test_vis|test_nir>/cam<k>/<pid as 4 "
      "digits>/<file>' relative to the LLCM root (k in 1..9; no near-infrared camera 3).")


def _list_folder(folder: str, stray: list[str]) -> list[str]:
  """Sorted image names of an existing id/camera folder (system junk left out; other
  non-images appended to `stray`); refuses a folder without images."""
  strays_before = len(stray)
  names = dataset_files.list_image_names(folder, IMAGE_EXTENSIONS, stray)
  if not names and len(stray) == strays_before:
    raise DatasetError(
        f"LLCM test folder {folder} is empty. The protocol draws one image from every existing "
        "id/camera folder (the reference's draw fails here); restore its images from the "
        "release or delete the folder.")
  return names


def scan_test_folders(root: str) -> dict[str, dict[tuple[int, int], list[str]]]:
  """Lists every id/camera folder of the test identities, in the reference's order.

  Returns: {modality: {(identity, camera): sorted file names}} for every existing folder, keys in
    (identity ascending, camera in MODALITY_CAMERAS order) insertion order.
  Raises DatasetError: see `check_root`, `read_test_ids`; test_vis/ or test_nir/ missing; an
    existing folder that is empty or holds a non-image entry; a test identity with no folder in
    either modality.
  """
  root = check_root(root)
  identities = read_test_ids(root)
  folders, stray = {}, []
  for modality, top in TEST_FOLDERS.items():
    if not os.path.isdir(os.path.join(root, top)):
      raise DatasetError(f"LLCM test folder not found: {os.path.join(root, top)}. Expected "
                         "test_vis/cam1..cam9 and test_nir/cam1, cam2, cam4..cam9 under the root.")
    folders[modality] = {}
    for identity in identities:
      for camera in MODALITY_CAMERAS[modality]:
        folder = os.path.join(root, top, f"cam{camera}", f"{identity:04d}")
        if os.path.isdir(folder):
          folders[modality][(identity, camera)] = _list_folder(folder, stray)
  dataset_files.raise_if_stray("LLCM", stray, IMAGE_EXTENSIONS)
  found = {identity for by_key in folders.values() for identity, _ in by_key}
  for identity in identities:
    if identity not in found:
      raise DatasetError(
          f"LLCM test identity {identity} of {os.path.join(root, 'idx', 'test_id.txt')} has no "
          f"folder: expected {os.path.join(root, 'test_vis', 'cam<k>', f'{identity:04d}')} (or "
          "test_nir) for some camera k. Check test_id.txt against the extracted folders.")
  return folders


def make_test_record(root: str, relative_path: str) -> ImageRecord:
  """The record of `<root>/<relative_path>`, fields parsed by `parse_test_path` (root absolute)."""
  modality, camera, identity = parse_test_path(relative_path)
  return ImageRecord(path=os.path.join(root, *relative_path.split("/")), identity=identity,
                     camera=camera, modality=modality)


def _records(root: str, modality: str, folders: dict, trial: int | None) -> list[ImageRecord]:
  """All files of every folder (trial None), or one `choice` per folder from Random(trial)."""
  generator = None if trial is None else random.Random(trial)
  records = []
  for (identity, camera), names in folders[modality].items():
    chosen = names if generator is None else [generator.choice(names)]
    folder = f"{TEST_FOLDERS[modality]}/cam{camera}/{identity:04d}"
    records.extend(make_test_record(root, f"{folder}/{name}") for name in chosen)
  return records


def read_llcm_split(root: str, split: str) -> list[ImageRecord]:
  """All images of an LLCM split.

  Args:
    root: the LLCM folder.
    split: "train" (`read_llcm_train`) or "test" (the full visible set, then the full
      near-infrared set, as `llcm_full_set`).

  Returns: records with absolute paths; test records ordered identity ascending, camera in
    MODALITY_CAMERAS order, file name ascending, per modality.
  Raises DatasetError: unknown split; see `read_llcm_train`, `scan_test_folders`.
  """
  if split not in SPLITS:
    raise DatasetError(f"LLCM split must be one of {SPLITS}, got {split!r}.")
  if split == "train":
    return read_llcm_train(root)
  folders = scan_test_folders(root)
  return (llcm_full_set(root, VISIBLE, folders=folders)
          + llcm_full_set(root, INFRARED, folders=folders))


def _check_modality(modality: str) -> None:
  if modality not in MODALITIES:
    raise DatasetError(f"LLCM modality must be one of {MODALITIES}, got {modality!r}.")


def _check_trial(trial: int) -> None:
  if isinstance(trial, bool) or not isinstance(trial, int) or trial < 0:
    raise DatasetError(f"LLCM trial must be a non-negative integer (the draw's seed; the "
                       f"protocol uses 0..9), got {trial!r}.")


def llcm_full_set(root: str, modality: str, *, folders=None) -> list[ImageRecord]:
  """The full test set of one modality (llcm.md 3.1): every file of every id/camera folder.

  Args:
    root: the LLCM folder.
    modality: VISIBLE (test_vis, cameras 1..9) or INFRARED (test_nir, cameras 1, 2, 4..9).
    folders: `scan_test_folders(root)` when the caller has it already (else scanned here).

  Returns: records ordered identity ascending, camera in MODALITY_CAMERAS order, file name
    ascending (the reference's order); no randomness.
  Raises DatasetError: unknown modality; see `scan_test_folders`.
  """
  _check_modality(modality)
  folders = scan_test_folders(root) if folders is None else folders
  return _records(os.path.abspath(root), modality, folders, None)


def llcm_sampled_set(root: str, modality: str, trial: int, *,
                     folders=None) -> list[ImageRecord]:
  """The sampled test set of one modality for one trial (llcm.md 3.1), single-shot.

  A private `random.Random(trial)` visits the id/camera folders in the full set's order and draws
  one file with `choice` from each existing folder's sorted list: the same calls as the
  reference's `random.seed(trial)` and module-level `random.choice`, without touching the global
  random state. The size is the number of existing folders, the same in every trial.

  Args:
    root: the LLCM folder.
    modality: VISIBLE or INFRARED.
    trial: the seed; the protocol uses 0..9.
    folders: `scan_test_folders(root)` when the caller has it already (else scanned here).

  Returns: one record per existing id/camera folder, in draw order.
  Raises DatasetError: unknown modality, bad trial; see `scan_test_folders`.
  """
  _check_modality(modality)
  _check_trial(trial)
  folders = scan_test_folders(root) if folders is None else folders
  return _records(os.path.abspath(root), modality, folders, trial)


def llcm_query_gallery(root: str, trial: int, direction: str, vis_to_ir: str = "plain"
                       ) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """The query and gallery sets of one LLCM trial and direction (llcm.md 3.2).

  Args:
    root: the LLCM folder.
    trial: the sampled side's seed; the protocol uses 0..9 and averages them.
    direction: "infrared_to_visible" (query: full near-infrared set; gallery: sampled visible
      set) or "visible_to_infrared".
    vis_to_ir: meaning of "visible_to_infrared" (ignored, but checked, for the other direction):
      "plain" (query: full visible set; gallery: sampled near-infrared set) or
      "deen_test_script" (query: sampled near-infrared set; gallery: full visible set, what the
      reference test scripts' [2, 1] branch computes, llcm.md 6.1).

  Returns: (query records, gallery records), each in the order of `llcm_full_set` /
    `llcm_sampled_set`.
  Raises DatasetError: unknown direction or variant, bad trial; see `scan_test_folders`.
  """
  if direction not in DIRECTIONS:
    raise DatasetError(f"LLCM direction must be one of {DIRECTIONS}, got {direction!r}.")
  if vis_to_ir not in VIS_TO_IR_VARIANTS:
    raise DatasetError(f"LLCM vis_to_ir must be one of {VIS_TO_IR_VARIANTS}, got {vis_to_ir!r}.")
  folders = scan_test_folders(root)
  full = lambda modality: llcm_full_set(root, modality, folders=folders)
  sampled = lambda modality: llcm_sampled_set(root, modality, trial, folders=folders)
  if direction == "infrared_to_visible":
    return full(INFRARED), sampled(VISIBLE)
  if vis_to_ir == "plain":
    return full(VISIBLE), sampled(INFRARED)
  return sampled(INFRARED), full(VISIBLE)


def missing_camera_folders(root: str) -> list[str]:
  """The camera folders of the test layout (test_vis/cam1..9, test_nir/cam1, 2, 4..9) absent
  under `root`: the release has them all; a missing one leaves its camera out of the protocol."""
  return [os.path.join(root, top, f"cam{camera}") for modality, top in TEST_FOLDERS.items()
          for camera in MODALITY_CAMERAS[modality]
          if os.path.isdir(os.path.join(root, top))
          and not os.path.isdir(os.path.join(root, top, f"cam{camera}"))]


def read_split(root: str, split: str, trial: int | None = None) -> list[ImageRecord]:
  """The dataset spec's reader: `read_llcm_split` (LLCM has no training trials). Reading the
  test split warns in one line (stderr) about missing camera folders."""
  del trial
  records = read_llcm_split(root, split)
  missing = missing_camera_folders(root) if split == "test" else []
  if missing:
    print(f"dakd_jax: warning: LLCM: {len(missing)} test camera folder(s) missing: "
          f"{', '.join(missing)}; their cameras take no part in the evaluation (restore them "
          "from the release)", file=sys.stderr, flush=True)
  return records


def split_files(root: str, trial: int | None = None) -> list[str]:
  """The files that define LLCM's splits (for the dataset fingerprint)."""
  del trial
  return [os.path.join(root, "idx", name) for name in
          (TRAIN_LISTS[VISIBLE], TRAIN_LISTS[INFRARED], "test_id.txt")]


def check_protocol(protocol: Protocol) -> None:
  """Raises ValueError unless `protocol` is an LLCM setting: a direction, a variant for
  visible->infrared (None means "plain"), a trial >= 0, no mode or shots."""
  if protocol.direction not in DIRECTIONS or protocol.mode or protocol.shots or (
      protocol.variant is not None and protocol.variant not in VIS_TO_IR_VARIANTS):
    raise ValueError(f"an {DATASET_NAME} protocol needs direction in {DIRECTIONS}, variant in "
                     f"{VIS_TO_IR_VARIANTS} (or None) and no mode or shots; got {protocol}")
  _check_trial(protocol.trial)


def make_protocols(options: ProtocolOptions, *, during_training: bool = False) -> list[Protocol]:
  """LLCM protocols: per direction, trials 0..num_trials-1; visible->infrared carries the
  configured variant. During training: infrared->visible only (the reference's training-time
  direction), all trials."""
  directions = (DIRECTIONS[:1] if during_training
                else (options.value(DIRECTIONS_OPTION) or DIRECTIONS))
  variant = options.value(VIS_TO_IR_OPTION)
  return [Protocol(DATASET_NAME, trial, direction=direction,
                   variant=variant if direction == "visible_to_infrared" else None)
          for direction in directions for trial in range(options.num_trials)]


def query_gallery(protocol: Protocol, root: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(query, gallery) records of an LLCM protocol (`llcm_query_gallery`)."""
  return llcm_query_gallery(root, protocol.trial, protocol.direction,
                            protocol.variant or "plain")
