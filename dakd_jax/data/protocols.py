"""Evaluation protocols: which images are queries and which are gallery, per trial.

Sits between the readers (`sysu.py`, `regdb.py`) and the evaluation code: a `Protocol` names one
setting (dataset, mode, shots, direction, trial) and `query_gallery` returns its two record
lists. The draws reproduce the AGW baseline's code (method.md 7.2, 7.3) file for file:

- SYSU-MM01 query: every infrared test image; it does not depend on the trial or the mode.
- SYSU-MM01 gallery, trial r: a random generator seeded with r visits the test identities
  ascending and the gallery cameras in order, and draws from each existing folder's sorted file
  list: one file (`choice`) for single-shot, ten distinct files (`sample(files, 10)`) for
  multi-shot. `random.Random(r)` makes the same calls as the reference's `random.seed(r)`
  followed by module-level calls, without touching the global random state.
- RegDB, trial t: the test index files of trial t; the direction says which side is the query.
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Iterable

from dakd_jax.data import regdb, sysu
from dakd_jax.data.records import INFRARED, DatasetError, ImageRecord, records_of

SYSU_MODES = {"all": sysu.VISIBLE_CAMERAS, "indoor": sysu.INDOOR_CAMERAS}
SYSU_SHOTS = {1: "single-shot", 10: "multi-shot"}
SYSU_TRIALS = tuple(range(10))
REGDB_DIRECTIONS = ("visible_to_thermal", "thermal_to_visible")


def sysu_query(root: str) -> list[ImageRecord]:
  """The SYSU-MM01 query set: every infrared test image (3,803 on the real data).

  Args:
    root: the SYSU-MM01 folder.

  Returns: records ordered by test identity ascending, camera 3 then 6, file name ascending.
    The same for every trial and both search modes.
  Raises DatasetError: see `sysu.scan_folders`.
  """
  return records_of(sysu.read_sysu(root, "test"), INFRARED)


def _check_trial(trial: int) -> None:
  if isinstance(trial, bool) or not isinstance(trial, int) or trial < 0:
    raise DatasetError(
        f"SYSU-MM01 trial must be a non-negative integer (the gallery seed; the protocol uses "
        f"0..9), got {trial!r}.")


def sysu_gallery(root: str, trial: int, *, mode: str, shots: int) -> list[ImageRecord]:
  """The SYSU-MM01 gallery drawn for one trial (method.md 7.2).

  Args:
    root: the SYSU-MM01 folder.
    trial: the seed of the draw; the protocol uses 0..9.
    mode: "all" (cameras 1, 2, 4, 5) or "indoor" (cameras 1, 2).
    shots: 1 (single-shot, one image per identity folder) or 10 (multi-shot).

  Returns: records in draw order (identity ascending, camera in mode order, then draw order for
    multi-shot). Real data: all 301 / 3,010, indoor 112 / 1,120 expected.
  Raises DatasetError: bad mode, shots or trial; an existing gallery folder that is empty, or that
    holds fewer than 10 images for multi-shot (the reference's draw would fail there too); see
    `sysu.scan_folders`.
  """
  if mode not in SYSU_MODES:
    raise DatasetError(f"SYSU-MM01 search mode must be one of {sorted(SYSU_MODES)}, got {mode!r}.")
  if isinstance(shots, bool) or shots not in SYSU_SHOTS:
    raise DatasetError(
        f"SYSU-MM01 shots must be 1 (single-shot) or 10 (multi-shot), got {shots!r}.")
  _check_trial(trial)
  folders = sysu.scan_folders(root, "test")
  root = os.path.abspath(root)
  generator = random.Random(trial)
  gallery = []
  for identity in sorted({identity for identity, _ in folders}):
    for camera in SYSU_MODES[mode]:
      names = folders.get((identity, camera))
      if names is None:
        continue
      if len(names) < shots:
        folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
        raise DatasetError(
            f"SYSU-MM01 gallery folder {folder} holds {len(names)} images; "
            f"{SYSU_SHOTS[shots]} draws {shots} from every existing gallery folder (the reference "
            "draw fails there too). Restore the folder's images from the dataset archive.")
      drawn = [generator.choice(names)] if shots == 1 else generator.sample(names, shots)
      gallery.extend(sysu.make_record(root, identity, camera, name) for name in drawn)
  return gallery


def regdb_query_gallery(root: str, trial: int,
                        direction: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """The RegDB query and gallery sets of one trial (method.md 7.3).

  Args:
    root: the RegDB folder.
    trial: 1..10; evaluate the model trained on the same trial.
    direction: "visible_to_thermal" (visible queries) or "thermal_to_visible".

  Returns: (query, gallery) records in index-file order (2,060 each on the real data).
  Raises DatasetError: unknown direction; see `regdb.read_regdb`.
  """
  if direction not in REGDB_DIRECTIONS:
    raise DatasetError(f"RegDB direction must be one of {REGDB_DIRECTIONS}, got {direction!r}.")
  visible = regdb.read_regdb(root, trial, "test", "visible")
  thermal = regdb.read_regdb(root, trial, "test", "thermal")
  return (visible, thermal) if direction == "visible_to_thermal" else (thermal, visible)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation setting.

  dataset: "sysu_mm01" or "regdb".
  trial: SYSU-MM01 gallery seed (0..9) or RegDB trial (1..10).
  mode: SYSU-MM01 only, "all" or "indoor".
  shots: SYSU-MM01 only, 1 or 10.
  direction: RegDB only, one of REGDB_DIRECTIONS.
  """
  dataset: str
  trial: int
  mode: str | None = None
  shots: int | None = None
  direction: str | None = None

  def __post_init__(self):
    if self.dataset == sysu.DATASET_NAME:
      if (self.mode not in SYSU_MODES or isinstance(self.shots, bool)
          or self.shots not in SYSU_SHOTS or self.direction):
        raise ValueError(
            f"a {sysu.DATASET_NAME} protocol needs mode in {sorted(SYSU_MODES)}, shots in "
            f"{sorted(SYSU_SHOTS)} and no direction; got {self}")
      _check_trial(self.trial)
    elif self.dataset == regdb.DATASET_NAME:
      if self.direction not in REGDB_DIRECTIONS or self.mode or self.shots:
        raise ValueError(
            f"a {regdb.DATASET_NAME} protocol needs direction in {REGDB_DIRECTIONS} and no mode "
            f"or shots; got {self}")
      if isinstance(self.trial, bool) or self.trial not in regdb.TRIALS:
        raise ValueError(f"a RegDB protocol needs trial in 1..10, got {self.trial!r}")
    else:
      raise ValueError(
          f"dataset must be {sysu.DATASET_NAME!r} or {regdb.DATASET_NAME!r}, got {self.dataset!r}")

  @property
  def setting(self) -> str:
    """The setting without the trial, e.g. 'sysu_mm01/all/single-shot' (trials average here)."""
    if self.dataset == sysu.DATASET_NAME:
      return f"{self.dataset}/{self.mode}/{SYSU_SHOTS[self.shots]}"
    return f"{self.dataset}/{self.direction}"

  @property
  def name(self) -> str:
    """The setting and the trial, e.g. 'sysu_mm01/all/single-shot/trial-0', for reports."""
    return f"{self.setting}/trial-{self.trial}"


def sysu_protocols(modes: Iterable[str] = ("all", "indoor"), shots: Iterable[int] = (1, 10),
                   trials: Iterable[int] = SYSU_TRIALS) -> list[Protocol]:
  """SYSU-MM01 protocols, ordered mode, then shots, then trial (the headline setting first)."""
  return [Protocol(sysu.DATASET_NAME, trial, mode=mode, shots=shot)
          for mode in modes for shot in shots for trial in trials]


def regdb_protocols(trial: int, directions: Iterable[str] = REGDB_DIRECTIONS) -> list[Protocol]:
  """RegDB protocols of one trial (one model per trial), one per direction."""
  return [Protocol(regdb.DATASET_NAME, trial, direction=direction) for direction in directions]


def query_gallery(protocol: Protocol, root: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(query, gallery) records of a protocol read from `root`.

  Raises DatasetError: see `sysu_query`, `sysu_gallery`, `regdb_query_gallery`.
  """
  if protocol.dataset == sysu.DATASET_NAME:
    gallery = sysu_gallery(root, protocol.trial, mode=protocol.mode, shots=protocol.shots)
    return sysu_query(root), gallery
  return regdb_query_gallery(root, protocol.trial, protocol.direction)
