"""The common currency of the dataset readers: one `ImageRecord` per image file.

Readers (`sysu.py`, `regdb.py`) turn an on-disk layout into lists of records; protocols pick query
and gallery records from them; the TFDS builders store the records' images pre-resized. Nothing
here knows about a particular dataset.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

VISIBLE = "visible"
INFRARED = "infrared"
MODALITIES = (VISIBLE, INFRARED)
# Integer codes used inside arrays (model routing, prepared datasets).
MODALITY_CODE = {VISIBLE: 0, INFRARED: 1}


class DatasetError(ValueError):
  """Bad or missing dataset files; the message names the path and what was expected."""


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


def load_image(path: str, height: int, width: int) -> np.ndarray:
  """Decodes an image file as 3-channel RGB and resizes it with a Lanczos filter.

  Returns uint8 [height, width, 3]. Raises DatasetError naming the file when it is missing,
  unreadable or truncated.
  """
  if not os.path.isfile(path):
    raise DatasetError(f"image file not found: {path}")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
      return np.asarray(image, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError) as error:
    raise DatasetError(
        f"cannot decode image {path}: {error}. Expected a readable, complete image file "
        "(re-extract the dataset or delete the file).") from error


def records_of(records: Sequence[ImageRecord], modality: str) -> list[ImageRecord]:
  """The records of one modality, order preserved."""
  return [r for r in records if r.modality == modality]
