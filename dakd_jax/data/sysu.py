"""SYSU-MM01 on disk and its evaluation protocol.

First step of the data flow for SYSU-MM01 (method.md 6.1): `read_sysu` lists the training or
test images (the TFDS builder stores them); `query` and `gallery` draw the evaluation sets from
the same folder scan (method.md 7.2). Layout:

  <root>/cam1 .. cam6/<identity as 4 digits>/<image file>
  <root>/exp/train_id.txt, val_id.txt, test_id.txt   (first line: comma-separated integer ids)

Cameras 1, 2, 4, 5 are visible (1 and 2 indoor), 3 and 6 infrared. Everything is checked before
anything is returned: a problem is a `DatasetError` naming the path, what was found and the fix.
"""
from __future__ import annotations

import os
import random

from dakd_jax.data import dataset_files
from dakd_jax.data.records import INFRARED, SHOT_NAMES, VISIBLE, DatasetError, ImageRecord
from dakd_jax.data.records import CameraRule, EvalOption, Protocol, ProtocolOptions, records_of

DATASET_NAME = "sysu_mm01"
CAMERAS = (1, 2, 3, 4, 5, 6)
VISIBLE_CAMERAS = (1, 2, 4, 5)
INDOOR_CAMERAS = (1, 2)
INFRARED_CAMERAS = (3, 6)
# The protocol (method.md 7.2): camera-3 queries never see camera-2 gallery images (the two
# share a room); CMC counts distinct identities.
CAMERA_RULE = CameraRule("sysu", removed_camera_pairs=((3, 2),), distinct_identity_cmc=True)
CAMERA_MODALITY = {camera: (INFRARED if camera in INFRARED_CAMERAS else VISIBLE)
                   for camera in CAMERAS}
SPLIT_FILES = {"train": ("train_id.txt", "val_id.txt"), "test": ("test_id.txt",),
               "val": ("val_id.txt",)}
# Extensions accepted in an identity folder. Anything else is refused rather than skipped: the
# reference lists every directory entry, so skipping a file would silently change which files
# the seeded gallery draws pick (and keeping it would fail later at decode time).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def check_root(root: str) -> str:
  """Checks that `root` holds the six camera folders and returns its absolute path.

  Raises DatasetError naming the missing root or camera folder.
  """
  if not os.path.isdir(root):
    raise DatasetError(
        f"SYSU-MM01 root not found: {root!r}. Expected a folder holding cam1 .. cam6 and exp/ "
        "(the extracted SYSU-MM01 archive); set the data root in the config.")
  root = os.path.abspath(root)
  for camera in CAMERAS:
    folder = os.path.join(root, f"cam{camera}")
    if not os.path.isdir(folder):
      raise DatasetError(
          f"SYSU-MM01 camera folder missing: {folder}. Expected cam1 .. cam6 under {root} "
          "(re-extract the dataset).")
  return root


def _parse_id_file(path: str) -> list[int]:
  """Reads the comma-separated integer ids on the first line of a split file."""
  if not os.path.isfile(path):
    raise DatasetError(
        f"SYSU-MM01 split file not found: {path}. Expected exp/train_id.txt, exp/val_id.txt "
        "and exp/test_id.txt as shipped with the dataset.")
  with open(path, "r", encoding="utf-8") as file:
    lines = file.read().splitlines()
  if not lines or not lines[0].strip():
    raise DatasetError(
        f"SYSU-MM01 split file {path}, line 1 is empty. Expected comma-separated integer "
        "identities on the first line, e.g. '1,2,4'.")
  ids = []
  for position, token in enumerate(lines[0].split(","), start=1):
    text = token.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > 9999:
      raise DatasetError(
          f"SYSU-MM01 split file {path}, line 1, token {position} is {token!r}. Expected "
          "comma-separated integer identities between 0 and 9999 (4-digit folder names).")
    ids.append(int(text))
  return ids


def read_split_ids(root: str, split: str) -> list[int]:
  """The identities of a split, ascending.

  Args:
    root: the SYSU-MM01 folder (holds exp/).
    split: "train" (train_id.txt + val_id.txt, method.md 6.1), "test" (test_id.txt) or "val"
      (val_id.txt alone).

  Returns: sorted list of distinct int identities.
  Raises DatasetError: unknown split, missing exp folder or split file, malformed first line,
    an identity listed twice (within or across the files).
  """
  if split not in SPLIT_FILES:
    raise DatasetError(f"SYSU-MM01 split must be one of {sorted(SPLIT_FILES)}, got {split!r}.")
  exp = os.path.join(root, "exp")
  if not os.path.isdir(exp):
    raise DatasetError(
        f"SYSU-MM01 split folder not found: {exp}. Expected exp/ with train_id.txt, "
        "val_id.txt and test_id.txt (shipped with the dataset).")
  seen = {}
  for name in SPLIT_FILES[split]:
    path = os.path.join(exp, name)
    for identity in _parse_id_file(path):
      if identity in seen:
        raise DatasetError(
            f"SYSU-MM01 identity {identity} is listed twice (in {seen[identity]} and {path}). "
            "Each identity may appear once per split; fix the split files.")
      seen[identity] = path
  return sorted(seen)


def list_images(root: str, camera: int, identity: int,
                stray: list[str] | None = None) -> list[str] | None:
  """Sorted image names in `<root>/cam<camera>/<identity:04d>`, or None if the folder is absent.

  The sort is Python's string order, the order of the reference's sorted path lists. System
  junk (`.DS_Store`, ...) is left out. Entries that are not image files are appended to
  `stray`; without a `stray` list, a DatasetError names them at once.
  """
  folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
  if not os.path.isdir(folder):
    return None
  found = [] if stray is None else stray
  names = dataset_files.list_image_names(folder, IMAGE_EXTENSIONS, found)
  if stray is None:
    dataset_files.raise_if_stray("SYSU-MM01", found, IMAGE_EXTENSIONS)
  return names


def scan_folders(root: str, split: str) -> dict[tuple[int, int], list[str]]:
  """Lists every identity folder of a split.

  Args:
    root: the SYSU-MM01 folder.
    split: "train" or "test".

  Returns: {(identity, camera): sorted file names} for every existing folder (possibly empty),
    keys in (identity ascending, camera ascending) insertion order.
  Raises DatasetError: see `check_root`, `read_split_ids`; every entry of the identity folders
    that is not an image (one message, `dataset_files.raise_if_stray`); an identity of the
    split with no folder under any camera.
  """
  root = check_root(root)
  folders, stray = {}, []
  for identity in read_split_ids(root, split):
    found = False
    for camera in CAMERAS:
      names = list_images(root, camera, identity, stray)
      if names is not None:
        folders[(identity, camera)] = names
        found = True
    if not found:
      raise DatasetError(
          f"SYSU-MM01 identity {identity} of the {split!r} split has no folder: expected "
          f"{os.path.join(root, 'cam<1..6>', f'{identity:04d}')} under at least one camera. "
          "Check the split files against the extracted camera folders.")
  dataset_files.raise_if_stray("SYSU-MM01", stray, IMAGE_EXTENSIONS)
  return folders


def make_record(root: str, identity: int, camera: int, name: str) -> ImageRecord:
  """The record of `<root>/cam<camera>/<identity:04d>/<name>` (root absolute)."""
  path = os.path.join(root, f"cam{camera}", f"{identity:04d}", name)
  return ImageRecord(path=path, identity=identity, camera=camera,
                     modality=CAMERA_MODALITY[camera])


def read_sysu(root: str, split: str) -> list[ImageRecord]:
  """All images of a SYSU-MM01 split, both modalities.

  Args:
    root: the SYSU-MM01 folder (cam1 .. cam6, exp/).
    split: "train" (train + val ids: 395 identities on the real data) or "test" (96).

  Returns: records ordered by identity ascending, camera ascending, file name ascending; paths
    absolute. Filtered to one modality (`records.records_of`) this is the reference's per-modality
    order (method.md 6.1, 7.2).
  Raises DatasetError: see `scan_folders`.
  """
  folders = scan_folders(root, split)
  root = os.path.abspath(root)
  return [make_record(root, identity, camera, name)
          for (identity, camera), names in folders.items() for name in names]


def read_split(root: str, split: str, trial: int | None = None) -> list[ImageRecord]:
  """The dataset spec's reader: `read_sysu` (SYSU-MM01 has no trials; `trial` is ignored)."""
  del trial
  return read_sysu(root, split)


def split_files(root: str, trial: int | None = None) -> list[str]:
  """The files that define SYSU-MM01's splits (for the dataset fingerprint)."""
  del trial
  return [os.path.join(root, "exp", name) for name in ("train_id.txt", "val_id.txt",
                                                        "test_id.txt")]


def validation_ids(root: str, trial, train_records, fraction: float, seed: int) -> list[int]:
  """SYSU-MM01 ships its validation identities: exp/val_id.txt (trained on by the reference,
  which trains on train + val; held out here when checkpoints are selected on them)."""
  del trial, train_records, fraction, seed
  return read_split_ids(root, "val")


# Search modes -> gallery cameras; config shot names -> images drawn per folder.
MODES = {"all": VISIBLE_CAMERAS, "indoor": INDOOR_CAMERAS}
SHOTS = {"single": 1, "multi": 10}
TRIALS = tuple(range(10))
# Its evaluation settings (config eval.<name>); no direction: infrared queries a visible gallery.
MODES_OPTION = EvalOption("modes", tuple(MODES), ("all", "indoor"))
TRAINING_MODES_OPTION = EvalOption("training_modes", tuple(MODES), ("all", "indoor"))
SHOTS_OPTION = EvalOption("shots", tuple(SHOTS), ("single", "multi"))
EVAL_OPTIONS = (MODES_OPTION, TRAINING_MODES_OPTION, SHOTS_OPTION,
                EvalOption("directions", (), (), may_be_empty=True))


def query(root: str) -> list[ImageRecord]:
  """The SYSU-MM01 query set: every infrared test image (3,803 on the real data).

  Returns: records ordered by test identity ascending, camera 3 then 6, file name ascending.
    The same for every trial and both search modes.
  Raises DatasetError: see `scan_folders`.
  """
  return records_of(read_sysu(root, "test"), INFRARED)


def _check_trial(trial: int) -> None:
  if isinstance(trial, bool) or not isinstance(trial, int) or trial < 0:
    raise DatasetError(
        f"SYSU-MM01 trial must be a non-negative integer (the gallery seed; the protocol uses "
        f"0..9), got {trial!r}.")


def gallery(root: str, trial: int, *, mode: str, shots: int) -> list[ImageRecord]:
  """The SYSU-MM01 gallery drawn for one trial (method.md 7.2).

  A generator seeded with `trial` visits the test identities ascending and the mode's cameras in
  order, and draws from each existing folder's sorted file list: one file (`choice`) for
  single-shot, ten distinct files (`sample(files, 10)`) for multi-shot. `random.Random(trial)`
  makes the same calls as the reference's `random.seed(trial)` followed by module-level calls,
  without touching the global random state.

  Args:
    root: the SYSU-MM01 folder.
    trial: the seed of the draw; the protocol uses 0..9.
    mode: "all" (cameras 1, 2, 4, 5) or "indoor" (cameras 1, 2).
    shots: 1 (single-shot, one image per identity folder) or 10 (multi-shot).

  Returns: records in draw order (identity ascending, camera in mode order, then draw order for
    multi-shot). Real data: all 301 / 3,010, indoor 112 / 1,120 expected.
  Raises DatasetError: bad mode, shots or trial; an existing gallery folder that is empty, or that
    holds fewer than 10 images for multi-shot (the reference's draw would fail there too); see
    `scan_folders`.
  """
  if mode not in MODES:
    raise DatasetError(f"SYSU-MM01 search mode must be one of {sorted(MODES)}, got {mode!r}.")
  if isinstance(shots, bool) or shots not in SHOT_NAMES:
    raise DatasetError(
        f"SYSU-MM01 shots must be 1 (single-shot) or 10 (multi-shot), got {shots!r}.")
  _check_trial(trial)
  folders = scan_folders(root, "test")
  root = os.path.abspath(root)
  generator = random.Random(trial)
  drawn_records = []
  for identity in sorted({identity for identity, _ in folders}):
    for camera in MODES[mode]:
      names = folders.get((identity, camera))
      if names is None:
        continue
      if len(names) < shots:
        folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
        raise DatasetError(
            f"SYSU-MM01 gallery folder {folder} holds {len(names)} images; "
            f"{SHOT_NAMES[shots]} draws {shots} from every existing gallery folder (the "
            "reference draw fails there too). Restore the folder's images from the dataset "
            "archive.")
      drawn = [generator.choice(names)] if shots == 1 else generator.sample(names, shots)
      drawn_records.extend(make_record(root, identity, camera, name) for name in drawn)
  return drawn_records


def check_protocol(protocol: Protocol) -> None:
  """Raises ValueError unless `protocol` is a SYSU-MM01 setting: mode, shots, a trial >= 0."""
  if (protocol.mode not in MODES or isinstance(protocol.shots, bool)
      or protocol.shots not in SHOT_NAMES or protocol.direction or protocol.variant):
    raise ValueError(f"a {DATASET_NAME} protocol needs mode in {sorted(MODES)}, shots in "
                     f"{sorted(SHOT_NAMES)} and no direction or variant; got {protocol}")
  _check_trial(protocol.trial)


def make_protocols(options: ProtocolOptions, *, during_training: bool = False) -> list[Protocol]:
  """SYSU-MM01 protocols ordered mode, then shots, then trial (the headline setting first).

  During training: single-shot only (the released training-time evaluation), the training modes.
  """
  shots = ("single",) if during_training else options.value(SHOTS_OPTION)
  modes = options.value(TRAINING_MODES_OPTION if during_training else MODES_OPTION)
  return [Protocol(DATASET_NAME, trial, mode=mode, shots=SHOTS[shot])
          for mode in modes for shot in shots for trial in range(options.num_trials)]


def query_gallery(protocol: Protocol, root: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(query, gallery) records of a SYSU-MM01 protocol (infrared queries, visible gallery)."""
  return query(root), gallery(root, protocol.trial, mode=protocol.mode, shots=protocol.shots)
