"""The common currency of the dataset readers: `ImageRecord` per image file, `Protocol` per setting.

Readers (`sysu.py`, `regdb.py`) turn an on-disk layout into lists of records and draw query and
gallery records for a `Protocol`; the TFDS builders store the records' images pre-resized;
`describe` prints the torchreid-style summary of a set of records. Nothing here knows about a
particular dataset.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from dakd_jax.errors import DatasetError  # pylint: disable=unused-import  (re-exported)
from dakd_jax.modalities import INFRARED, MODALITIES, VISIBLE  # pylint: disable=unused-import
from dakd_jax.modalities import CODES as MODALITY_CODE

# Gallery images drawn per (identity, camera) folder -> the name of the setting.
SHOT_NAMES = {1: "single-shot", 10: "multi-shot"}


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image file.

  path: absolute path of the image file.
  identity: the person id as written on disk (SYSU folder name, RegDB label in the idx file).
  camera: camera number as on disk (SYSU 1..6; RegDB 1 = visible, 2 = thermal).
  modality: VISIBLE or INFRARED.
  """
  path: str
  identity: int
  camera: int
  modality: str

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")


def make_label_map(records: Iterable[ImageRecord]) -> dict[int, int]:
  """Maps each identity to a training label 0..C-1, identities sorted ascending (method.md 6.1)."""
  return {identity: label for label, identity in enumerate(sorted({r.identity for r in records}))}


def _to_rgb(image: Image.Image) -> Image.Image:
  """3-channel 8-bit RGB; 16/32-bit grey images (PNG modes I;16*, I) scaled to 0..255 first.

  PIL's own `convert("RGB")` clips those modes at 255, which turns a 16-bit grey image white.
  Mode I is read as 16-bit data (what a 16-bit PNG decodes to), so 65535 maps to 255.
  """
  if image.mode.startswith("I;16") or image.mode == "I":
    values = np.asarray(image, dtype=np.float64)
    grey = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
  return image.convert("RGB")


def load_image(path: str, height: int, width: int) -> np.ndarray:
  """Decodes an image file as 3-channel RGB and resizes it with a Lanczos filter.

  Returns uint8 [height, width, 3]. Raises DatasetError naming the file when it is missing,
  unreadable or truncated.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"image file not found: {path}")
  try:
    with Image.open(path) as image:
      image = _to_rgb(image)
      if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
      return np.asarray(image, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as error:
    raise DatasetError(
        f"cannot decode image {path}: {error}. Expected a readable, complete image file "
        "(re-extract the dataset or delete the file).") from error


def parse_list_line(path: str, number: int, line: str, root: str,
                    what: str) -> tuple[str, int]:
  """One line `<image path relative to root> <integer label>` of an index or list file ->
  (absolute image path, label). `what` names the file kind in the error, e.g. "RegDB index
  file". Raises DatasetError naming the file, the line number and the expected form."""
  fields = line.split()
  problem = None
  if len(fields) != 2:
    problem = f"has {len(fields)} fields"
  elif os.path.isabs(fields[0]):
    problem = "gives an absolute image path"
  else:
    try:
      label = int(fields[1])
    except ValueError:
      problem = f"has label {fields[1]!r}, not an integer"
  if problem:
    raise DatasetError(
        f"{what} {path}, line {number} {problem}: {line!r}. Expected "
        "'<image path relative to the dataset root> <integer label>'.")
  return os.path.join(root, fields[0]), label


def records_of(records: Sequence[ImageRecord], modality: str) -> list[ImageRecord]:
  """The records of one modality, order preserved."""
  return [r for r in records if r.modality == modality]


def describe(records: Sequence[ImageRecord], title: str) -> str:
  """A torchreid-style summary table: identities and images per modality and per camera.

  Args:
    records: any records (of one split or several).
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


def held_out_identities(identities: Iterable[int], fraction: float, seed: int) -> list[int]:
  """A seeded share of the identities, held out as a validation split (ascending).

  max(2, round(fraction * n)) of the n distinct identities, drawn without replacement with
  NumPy's generator seeded by [seed, 1]; at most n - 2 so that training keeps two identities.
  """
  distinct = np.array(sorted(set(identities)))
  count = min(max(2, round(fraction * len(distinct))), len(distinct) - 2)
  if count < 1:
    raise DatasetError(f"{len(distinct)} training identities are too few to hold out a "
                       "validation split; use --config.checkpoint.select=last")
  chosen = np.random.default_rng([seed, 1]).choice(distinct, size=count, replace=False)
  return sorted(int(identity) for identity in chosen)


def identities_missing_a_modality(records: Sequence[ImageRecord]) -> list[int]:
  """Identities of a training split with images in only one modality, ascending.

  The cross-modal sampler cannot use them (it pairs a visible and an infrared image of one
  identity at every batch position), so they are reported to the user.
  """
  seen = collections.defaultdict(set)
  for record in records:
    seen[record.identity].add(record.modality)
  return sorted(identity for identity, modalities in seen.items() if len(modalities) < 2)


def identities_without_images(records: Sequence[ImageRecord],
                              listed: Iterable[int]) -> list[int]:
  """The identities of `listed` (a split file's ids) that no record has, ascending."""
  return sorted(set(listed) - {record.identity for record in records})


def coverage_warning(records: Sequence[ImageRecord], listed: Iterable[int] | None,
                     title: str, *, is_training: bool) -> str | None:
  """One warning line naming the identities of a split that cannot be used, or None.

  Args:
    records: the split's records. listed: the identities its split files name (None: unknown).
    title: e.g. "SYSU-MM01 train". is_training: identities with one modality only are reported
      too (the cross-modal sampler never draws them); in a test split they are ordinary.
  Returns e.g. "dakd_jax: warning: SYSU-MM01 train: 2 identities with images in one modality
    only [2, 7], 1 identity with no image [3]; they are never sampled (check their folders)".
  """
  def count(ids):
    return f"{len(ids)} {'identity' if len(ids) == 1 else 'identities'}"

  problems = []
  lonely = identities_missing_a_modality(records) if is_training else []
  if lonely:
    problems.append(f"{count(lonely)} with images in one modality only {lonely}")
  empty = identities_without_images(records, listed) if listed is not None else []
  if empty:
    problems.append(f"{count(empty)} with no image {empty}")
  total = len(lonely) + len(empty)
  if not problems:
    return None
  effect = "never sampled" if is_training else "in no query or gallery"
  return (f"dakd_jax: warning: {title}: " + ", ".join(problems) +
          f"; {'it is' if total == 1 else 'they are'} {effect} (check their folders)")


@dataclasses.dataclass(frozen=True)
class CameraRule:
  """How a dataset's protocol ranks: which gallery images a query never sees, how CMC counts.

  Declared by each dataset's module (`sysu.CAMERA_RULE`, ...) and read by the metrics, the
  pictures and the verification, so a new dataset brings its rule with it.

  name: a short name for messages and `rank_metrics(protocol=...)` ("sysu", "regdb", "llcm").
  removed_camera_pairs: (query camera, gallery camera) pairs: a query from the first camera
    never sees gallery images from the second, whatever their identity (SYSU-MM01: (3, 2)).
  removes_same_identity_same_camera: a query never sees images of its own identity taken by its
    own camera number (LLCM, where camera k records both modalities).
  distinct_identity_cmc: CMC ranks distinct identities (the ranked list collapsed to each
    identity's first image) instead of images.
  """
  name: str
  removed_camera_pairs: tuple[tuple[int, int], ...] = ()
  removes_same_identity_same_camera: bool = False
  distinct_identity_cmc: bool = False

  @property
  def needs_cameras(self) -> bool:
    """Whether the rule reads camera numbers (then every query and gallery image needs one)."""
    return bool(self.removed_camera_pairs) or self.removes_same_identity_same_camera

  def removed_pairs(self, query_ids, query_cams, gallery_ids, gallery_cams) -> np.ndarray:
    """bool [Q, G]: the gallery images each query ignores (the plain statement of the rule)."""
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    removed = np.zeros((query_ids.size, gallery_ids.size), bool)
    if not self.needs_cameras:
      return removed
    query_cams, gallery_cams = np.asarray(query_cams), np.asarray(gallery_cams)
    for query_camera, gallery_camera in self.removed_camera_pairs:
      removed |= (query_cams == query_camera)[:, None] & (gallery_cams == gallery_camera)[None, :]
    if self.removes_same_identity_same_camera:
      removed |= ((query_ids[:, None] == gallery_ids[None, :])
                  & (query_cams[:, None] == gallery_cams[None, :]))
    return removed


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One evaluation setting; which fields apply depends on the dataset (its module checks them).

  dataset: a dataset name (`specs.DATASET_NAMES`).
  trial: the trial: a gallery seed (SYSU-MM01 0..9, LLCM 0..9) or a RegDB trial (1..10).
  mode: SYSU-MM01 search mode, "all" or "indoor".
  shots: SYSU-MM01 gallery images per identity folder, 1 or 10.
  direction: which modality queries, e.g. "visible_to_thermal" (RegDB) or
    "infrared_to_visible" (LLCM).
  variant: a reading of the direction where sources disagree (LLCM visible->infrared: "plain" or
    "deen_test_script"); None where there is only one.
  """
  dataset: str
  trial: int
  mode: str | None = None
  shots: int | None = None
  direction: str | None = None
  variant: str | None = None

  def __post_init__(self):
    if not isinstance(self.dataset, str) or isinstance(self.trial, bool) \
        or not isinstance(self.trial, int):
      raise ValueError(f"a protocol needs a dataset name and an integer trial; got {self}")

  @property
  def setting(self) -> str:
    """The setting without the trial, e.g. 'sysu_mm01/all/single-shot' (trials average here)."""
    parts = [self.dataset, self.mode, SHOT_NAMES.get(self.shots, self.shots), self.direction,
             self.variant]
    return "/".join(str(part) for part in parts if part is not None)

  @property
  def name(self) -> str:
    """The setting and the trial, e.g. 'sysu_mm01/all/single-shot/trial-0', for reports."""
    return f"{self.setting}/trial-{self.trial}"


@dataclasses.dataclass(frozen=True)
class EvalOption:
  """A dataset's own evaluation setting, config `eval.<name>`, declared by the dataset's module.

  name: the config field under `eval` (e.g. SYSU-MM01 "modes", LLCM "llcm_vis_to_ir").
  choices: the accepted values (of each entry, for a tuple field).
  default: the value when none is given (a tuple for a tuple field).
  may_be_empty: a tuple field may be () (the dataset says what that means).
  """
  name: str
  choices: tuple
  default: Any
  may_be_empty: bool = False

  def problem(self, value, field: str | None = None) -> str | None:
    """Why `value` is not accepted (a message naming config.<field>, default eval.<name>, and
    the fix), or None."""
    field = field or f"eval.{self.name}"
    if not isinstance(self.default, tuple):
      if value in self.choices:
        return None
      return f"config.{field} = {value!r} is not allowed: choose one of {self.choices}"
    bad = [entry for entry in value if entry not in self.choices]
    if not bad and (value or self.may_be_empty):
      return None
    need = " (or none)" if self.may_be_empty else " and at least one is needed"
    # A tuple is written as Python (quoted for the shell); 'a,b' would be one string.
    example = "(" + ",".join(repr(choice) for choice in self.choices) + ",)"
    return (f"config.{field} = {tuple(value)!r}: each entry must be one of "
            f"{self.choices}{need}; write the tuple in double quotes, e.g. "
            f"--config.{field}=\"{example}\"")


@dataclasses.dataclass(frozen=True)
class ProtocolOptions:
  """Which protocols an evaluation runs: the common settings and the dataset's own.

  num_trials: gallery draws (trials 0..num_trials-1) where the gallery is drawn.
  trial: the training trial of a dataset whose splits depend on it (RegDB 1..10).
  values: the dataset's `EvalOption` values by name (config `eval.<name>`); a missing one takes
    the option's default (`value`).
  """
  num_trials: int = 10
  trial: int = 1
  values: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def value(self, option: EvalOption):
    """The value of a dataset's option: given in `values`, else its default."""
    return self.values.get(option.name, option.default)
