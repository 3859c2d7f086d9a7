"""SYSU-MM01 on disk: split files and camera folders turned into `ImageRecord` lists.

First step of the data flow for SYSU-MM01 (method.md 6.1): `read_sysu` lists the training or
test images; `protocols.py` draws query and gallery sets from the same folder scan; the TFDS
builder stores the training records' images. Layout:

  <root>/cam1 .. cam6/<identity as 4 digits>/<image file>
  <root>/exp/train_id.txt, val_id.txt, test_id.txt   (first line: comma-separated integer ids)

Cameras 1, 2, 4, 5 are visible (1 and 2 indoor), 3 and 6 infrared. Everything is checked before
anything is returned: a problem is a `DatasetError` naming the path, what was found and the fix.
"""
from __future__ import annotations

import collections
import os
from typing import Sequence

from dakd_jax.data.records import INFRARED, MODALITIES, VISIBLE, DatasetError, ImageRecord

DATASET_NAME = "sysu_mm01"
CAMERAS = (1, 2, 3, 4, 5, 6)
VISIBLE_CAMERAS = (1, 2, 4, 5)
INDOOR_CAMERAS = (1, 2)
INFRARED_CAMERAS = (3, 6)
CAMERA_MODALITY = {camera: (INFRARED if camera in INFRARED_CAMERAS else VISIBLE)
                   for camera in CAMERAS}
SPLIT_FILES = {"train": ("train_id.txt", "val_id.txt"), "test": ("test_id.txt",)}
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
    split: "train" (train_id.txt + val_id.txt, method.md 6.1) or "test" (test_id.txt).

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


def list_images(root: str, camera: int, identity: int) -> list[str] | None:
  """Sorted file names in `<root>/cam<camera>/<identity:04d>`, or None if the folder is absent.

  The sort is Python's string order, the order of the reference's sorted path lists.
  Raises DatasetError naming an entry that is not an image file.
  """
  folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
  if not os.path.isdir(folder):
    return None
  names = sorted(os.listdir(folder))
  for name in names:
    path = os.path.join(folder, name)
    if not (os.path.isfile(path) and name.lower().endswith(IMAGE_EXTENSIONS)):
      raise DatasetError(
          f"SYSU-MM01 identity folder {folder} holds {name!r}, which is not an image file "
          f"({', '.join(IMAGE_EXTENSIONS)}). Remove it: it would change the gallery draws.")
  return names


def scan_folders(root: str, split: str) -> dict[tuple[int, int], list[str]]:
  """Lists every identity folder of a split.

  Args:
    root: the SYSU-MM01 folder.
    split: "train" or "test".

  Returns: {(identity, camera): sorted file names} for every existing folder (possibly empty),
    keys in (identity ascending, camera ascending) insertion order.
  Raises DatasetError: see `check_root`, `read_split_ids`, `list_images`; and an identity of the
    split with no folder under any camera.
  """
  root = check_root(root)
  folders = {}
  for identity in read_split_ids(root, split):
    found = False
    for camera in CAMERAS:
      names = list_images(root, camera, identity)
      if names is not None:
        folders[(identity, camera)] = names
        found = True
    if not found:
      raise DatasetError(
          f"SYSU-MM01 identity {identity} of the {split!r} split has no folder: expected "
          f"{os.path.join(root, 'cam<1..6>', f'{identity:04d}')} under at least one camera. "
          "Check the split files against the extracted camera folders.")
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


def describe(records: Sequence[ImageRecord], title: str = DATASET_NAME) -> str:
  """A torchreid-style summary table: identities and images per modality and per camera.

  Args:
    records: any records (SYSU-MM01 or RegDB).
    title: first line of the table.

  Returns: a multi-line string (no trailing newline), one row per modality, one per camera
    within it, and a total row; columns '# ids' and '# images'.
  """
  by_modality = collections.defaultdict(list)
  by_camera = collections.defaultdict(list)
  for record in records:
    by_modality[record.modality].append(record)
    by_camera[(record.modality, record.camera)].append(record)
  rule = "  " + "-" * 37
  lines = [f"  {title}", rule, f"  {'subset':<18} | {'# ids':>5} | {'# images':>8}", rule]

  def row(label, group):
    identities = len({r.identity for r in group})
    lines.append(f"  {label:<18} | {identities:5d} | {len(group):8d}")

  for modality in MODALITIES:
    if modality not in by_modality:
      continue
    row(modality, by_modality[modality])
    for camera in sorted(c for m, c in by_camera if m == modality):
      row(f"  camera {camera}", by_camera[(modality, camera)])
  lines.append(rule)
  row("total", records)
  lines.append(rule)
  return "\n".join(lines)
