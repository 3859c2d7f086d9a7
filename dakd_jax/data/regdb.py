"""RegDB on disk and its evaluation protocol: the per-trial index files as `ImageRecord` lists.

First step of the data flow for RegDB (method.md 6.2): `read_regdb_split` gives a trial's
training images (for the TFDS builder) or test images; `query_gallery` turns the test images of
a trial into query and gallery sets for one direction (method.md 7.3). Layout:

  <root>/Visible/<id>/*.bmp, <root>/Thermal/<id>/*.bmp
  <root>/idx/{train,test}_{visible,thermal}_{trial}.txt, trial 1..10,
      one line per image: `<path relative to root> <integer label>`

The identity of a record is the label in the index file; camera 1 is visible, camera 2 thermal
(modality INFRARED). Every listed image must exist, and training labels must be exactly
0..C-1 because the training code indexes the class centres by label.
"""
from __future__ import annotations

import os

from dakd_jax.data.records import INFRARED, VISIBLE, DatasetError, ImageRecord, Protocol
from dakd_jax.data.records import parse_list_line
from dakd_jax.data.records import CameraRule, EvalOption, ProtocolOptions

DATASET_NAME = "regdb"
TRIALS = tuple(range(1, 11))
SPLITS = ("train", "test")
# Query direction; the first is the released training-time evaluation.
DIRECTIONS = ("visible_to_thermal", "thermal_to_visible")
# One camera per modality: nothing is removed, CMC counts images (method.md 7.3).
CAMERA_RULE = CameraRule("regdb")
# Its evaluation settings (config eval.<name>): the query directions, () = both.
DIRECTIONS_OPTION = EvalOption("directions", DIRECTIONS, (), may_be_empty=True)
EVAL_OPTIONS = (DIRECTIONS_OPTION,)
# Index-file spelling of each modality -> (record modality, camera number).
MODALITY_FILES = {"visible": (VISIBLE, 1), "thermal": (INFRARED, 2)}
# Accept the record spelling too, so callers can pass `records.INFRARED`.
_MODALITY_ALIASES = {"visible": "visible", "thermal": "thermal", "infrared": "thermal"}


def _check_args(root: str, trial: int, split: str) -> str:
  """Validates the common arguments; returns the absolute root."""
  if not os.path.isdir(root):
    raise DatasetError(
        f"RegDB root not found: {root!r}. Expected a folder holding Visible/, Thermal/ and idx/ "
        "(the extracted RegDB archive); set the data root in the config.")
  if isinstance(trial, bool) or not isinstance(trial, int) or trial not in TRIALS:
    raise DatasetError(f"RegDB trial must be an integer in 1..10, got {trial!r}.")
  if split not in SPLITS:
    raise DatasetError(f"RegDB split must be one of {SPLITS}, got {split!r}.")
  return os.path.abspath(root)


def index_path(root: str, trial: int, split: str, modality: str) -> str:
  """`<root>/idx/<split>_<visible|thermal>_<trial>.txt` (no existence check)."""
  return os.path.join(root, "idx", f"{split}_{_MODALITY_ALIASES[modality]}_{trial}.txt")


def _check_train_labels(path: str, labels: list[int]) -> None:
  """Training labels must be exactly 0..C-1 (centres are indexed by label)."""
  distinct = sorted(set(labels))
  if distinct != list(range(len(distinct))):
    missing = sorted(set(range(max(distinct) + 1)) - set(distinct))[:5]
    raise DatasetError(
        f"RegDB training labels in {path} must be exactly 0..C-1 (the class centres are indexed "
        f"by label); found {len(distinct)} distinct labels from {distinct[0]} to {distinct[-1]}"
        f"{f', missing e.g. {missing}' if missing else ''}. Use the index files shipped with "
        "RegDB or relabel them.")


def read_regdb(root: str, trial: int, split: str, modality: str) -> list[ImageRecord]:
  """The images of one modality of one RegDB trial and split, in index-file order.

  Args:
    root: the RegDB folder (holds idx/ and the image folders).
    trial: 1..10.
    split: "train" or "test".
    modality: "visible" or "thermal" (also accepted: "infrared", same as "thermal").

  Returns: records with identity = the file's label, camera 1 (visible) or 2 (thermal), modality
    VISIBLE or INFRARED, absolute paths. 2,060 per modality per split on the real data.
  Raises DatasetError: root missing, trial outside 1..10, unknown split or modality, index file
    missing or empty, malformed line (file and line number), listed image missing, training
    labels not exactly 0..C-1.
  """
  root = _check_args(root, trial, split)
  if modality not in _MODALITY_ALIASES:
    raise DatasetError(
        f"RegDB modality must be one of {sorted(_MODALITY_ALIASES)}, got {modality!r}.")
  path = index_path(root, trial, split, modality)
  if not os.path.isfile(path):
    raise DatasetError(
        f"RegDB index file not found: {path}. Expected idx/{{train,test}}_{{visible,thermal}}_"
        "{1..10}.txt under the RegDB root (shipped with the dataset).")
  record_modality, camera = MODALITY_FILES[_MODALITY_ALIASES[modality]]
  with open(path, "r", encoding="utf-8") as file:
    lines = file.read().splitlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue  # Blank lines (e.g. a trailing one) carry nothing.
    image, label = parse_list_line(path, number, line, root, "RegDB index file")
    if not os.path.isfile(image):
      raise DatasetError(
          f"RegDB image listed in {path}, line {number} not found: {image}. Re-extract the "
          "dataset or fix the index file.")
    records.append(ImageRecord(path=image, identity=label, camera=camera,
                               modality=record_modality))
  if not records:
    raise DatasetError(f"RegDB index file {path} lists no images.")
  if split == "train":
    _check_train_labels(path, [r.identity for r in records])
  return records


def read_regdb_split(root: str, trial: int, split: str) -> list[ImageRecord]:
  """Visible then thermal records of one RegDB trial and split.

  Returns: `read_regdb(..., "visible") + read_regdb(..., "thermal")`.
  Raises DatasetError: see `read_regdb`; for the training split also when the two modalities do
    not list the same identities (every training identity needs both modalities).
  """
  visible = read_regdb(root, trial, split, "visible")
  thermal = read_regdb(root, trial, split, "thermal")
  if split == "train":
    visible_ids = {r.identity for r in visible}
    thermal_ids = {r.identity for r in thermal}
    if visible_ids != thermal_ids:
      only_visible = sorted(visible_ids - thermal_ids)[:5]
      only_thermal = sorted(thermal_ids - visible_ids)[:5]
      raise DatasetError(
          f"RegDB trial {trial} training index files disagree on identities: only visible "
          f"{only_visible}, only thermal {only_thermal} (first few shown) in "
          f"{index_path(os.path.abspath(root), trial, split, 'visible')} and "
          f"{index_path(os.path.abspath(root), trial, split, 'thermal')}. Every training "
          "identity needs images in both modalities.")
  return visible + thermal


def read_split(root: str, split: str, trial: int | None = None) -> list[ImageRecord]:
  """The dataset spec's reader: `read_regdb_split` of one trial (required)."""
  if trial is None:
    raise DatasetError("RegDB splits depend on the trial: pass a trial in 1..10 "
                       "(config data.trial)")
  return read_regdb_split(root, trial, split)


def split_files(root: str, trial: int | None) -> list[str]:
  """The index files of one trial (for the dataset fingerprint)."""
  return [index_path(root, trial, split, modality) for split in SPLITS
          for modality in ("visible", "thermal")]


def query_gallery_of(root: str, trial: int,
                     direction: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """The RegDB query and gallery sets of one trial (method.md 7.3).

  Args:
    root: the RegDB folder.
    trial: 1..10; evaluate the model trained on the same trial.
    direction: "visible_to_thermal" (visible queries) or "thermal_to_visible".

  Returns: (query, gallery) records in index-file order (2,060 each on the real data).
  Raises DatasetError: unknown direction; see `read_regdb`.
  """
  if direction not in DIRECTIONS:
    raise DatasetError(f"RegDB direction must be one of {DIRECTIONS}, got {direction!r}.")
  visible = read_regdb(root, trial, "test", "visible")
  thermal = read_regdb(root, trial, "test", "thermal")
  return (visible, thermal) if direction == "visible_to_thermal" else (thermal, visible)


def check_protocol(protocol: Protocol) -> None:
  """Raises ValueError unless `protocol` is a RegDB setting: a direction and a trial 1..10."""
  if protocol.direction not in DIRECTIONS or protocol.mode or protocol.shots \
      or protocol.variant:
    raise ValueError(f"a {DATASET_NAME} protocol needs direction in {DIRECTIONS} and no mode, "
                     f"shots or variant; got {protocol}")
  if protocol.trial not in TRIALS:
    raise ValueError(f"a RegDB protocol needs trial in 1..10, got {protocol.trial!r}")


def make_protocols(options: ProtocolOptions, *, during_training: bool = False) -> list[Protocol]:
  """RegDB protocols of the training trial (one model per trial), one per direction.

  During training: visible->thermal only, as the released training-time evaluation.
  """
  directions = (DIRECTIONS[:1] if during_training
                else (options.value(DIRECTIONS_OPTION) or DIRECTIONS))
  return [Protocol(DATASET_NAME, options.trial, direction=direction) for direction in directions]


def query_gallery(protocol: Protocol, root: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(query, gallery) records of a RegDB protocol."""
  return query_gallery_of(root, protocol.trial, protocol.direction)
