"""From a dataset's location to ready-to-use data: generate (synthetic only), prepare (TFDS), index.

The result, a frozen `DataBundle`, is what training and evaluation read: random-access sources
of the prepared train and test splits, their metadata arrays (no image decoded), the number of
training identities, the dataset's spec and where protocols find their file lists.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
from typing import Mapping

import jax
import numpy as np

from dakd_jax import errors
from dakd_jax.data import dataset_files
from dakd_jax.data import records as records_lib
from dakd_jax.data import specs
from dakd_jax.data import synthetic
from dakd_jax.data import tfds_builders
from dakd_jax.errors import DatasetError

ROOT_FIX = "choose another folder (--config.data.root)"
PREPARED_FIX = "choose another folder (--config.data.prepared_dir)"


@dataclasses.dataclass(frozen=True)
class DataBundle:
  """Prepared splits and what is known about them (immutable).

  spec: the dataset's spec.
  root: the dataset root the protocols read their file lists from (absolute).
  trial: the training trial of a dataset with trials (RegDB), else None.
  train_source / test_source: random-access sources; `source[i]['image']` is uint8 [H, W, 3].
  train_meta / test_meta: label, identity, camera, modality (0 visible, 1 infrared), path arrays.
  num_classes: training identities C (labels 0..C-1).
  test_rows: the test split's relative path -> row.
  fingerprint: identifies the dataset's files and split files (`tfds_builders.fingerprint`).
  val_source / val_meta: the held-out validation split (checkpoint.select=val), else None.
  held_out: how the validation identities were chosen and how many ("" without them).
  """
  spec: specs.DatasetSpec
  root: str
  trial: int | None
  train_source: object
  test_source: object
  train_meta: Mapping[str, np.ndarray]
  test_meta: Mapping[str, np.ndarray]
  num_classes: int
  test_rows: Mapping[str, int]
  fingerprint: str = ""
  val_source: object = None
  val_meta: Mapping[str, np.ndarray] | None = None
  held_out: str = ""

  @property
  def dataset(self) -> str:
    """The dataset's name."""
    return self.spec.name

  def test_index_of(self, record: records_lib.ImageRecord) -> int:
    """Row in the prepared test split of a protocol record (by path relative to the root)."""
    prefix = os.path.join(self.root, "")
    relative = (record.path[len(prefix):] if record.path.startswith(prefix)  # as relpath, quicker
                else os.path.relpath(record.path, self.root)).replace(os.sep, "/")
    if relative not in self.test_rows:
      raise DatasetError(
          f"{record.path} is in the evaluation protocol but not in the prepared test split of "
          f"{self.root}; the prepared data is stale: delete the prepared folder and run again")
    return self.test_rows[relative]


def process_zero_first(fn):
  """Runs fn on process 0, then on the others once it is done (they then find its files)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # Multi-host only.
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("dakd_jax: process 0 prepared data")
  return result if jax.process_index() == 0 else fn()


def ensure_synthetic_data(spec: specs.DatasetSpec, root: str, sizes: specs.SyntheticSizes,
                          show_progress: bool = False) -> str:
  """Generates the synthetic stand-in tree of `spec` at `root` (reused when already there).

  Raises DatasetError when `root` holds something else (a real dataset, another synthetic
  tree), StorageError when it cannot be written.
  """
  def generate():
    with errors.writing(f"synthetic dataset in {root}", fix=ROOT_FIX):
      try:
        return synthetic.ensure_synthetic(root, spec.synthetic_kind, show_progress=show_progress,
                                          **spec.synthetic_params(sizes))
      except FileExistsError as error:  # A folder that is not (this) synthetic tree.
        raise DatasetError(f"config.data.root: {error} For a real dataset at this root, set "
                           "--config.synthetic.enabled=False") from None
  return process_zero_first(generate)


def _summarise(spec, root, trial, split_records, stream) -> None:
  """The dataset table (every split) and one warning line per split naming the identities it
  cannot use (one modality only in training, or no image at all)."""
  junk = dataset_files.junk_warning(spec.title, dataset_files.find_system_junk(root))
  if junk:
    print(junk, file=stream, flush=True)
  for split, records in split_records.items():  # The root tells the demo's two sets apart.
    print(records_lib.describe(records, f"{spec.title} {split} ({root})"), file=stream)
  for split in tfds_builders.SPLITS:
    listed = spec.listed_identities(root, split, trial) if spec.listed_identities else None
    line = records_lib.coverage_warning(split_records[split], listed, f"{spec.title} {split}",
                                        is_training=split == "train")
    if line:
      print(line, file=stream, flush=True)


def hold_out_validation(spec: specs.DatasetSpec, root: str, trial: int | None,
                        split_records: dict, fraction: float, seed: int) -> tuple[dict, str]:
  """split_records with the validation identities moved from "train" to a "val" split, and a
  sentence saying which and how many (it changes the training set: reports say so)."""
  identities, how = spec.held_out(root, trial, split_records["train"], fraction, seed)
  held = set(identities)
  train = [r for r in split_records["train"] if r.identity not in held]
  val = [r for r in split_records["train"] if r.identity in held]
  if not val or not train:
    raise DatasetError(f"holding out {how} leaves {len(train)} training and {len(val)} "
                       "validation images; use --config.checkpoint.select=last")
  note = (f"{len(held)} identities held out of training for checkpoint selection ({how}); "
          f"the model trains on {len({r.identity for r in train})} identities")
  return {**split_records, "train": train, "val": val}, note


def prepare_data(dataset: str, root: str, prepared_dir: str, image_size: tuple[int, int], *,
                 trial: int | None = None, synthetic_sizes: specs.SyntheticSizes | None = None,
                 progress: bool = True,
                 validation: tuple[float, int] | None = None) -> DataBundle:
  """Generates (synthetic), prepares (once per size/trial/content) and opens a dataset.

  Args:
    dataset: a dataset name. root: its extracted folder. prepared_dir: the TFDS data_dir.
    image_size: (height, width) the images are stored at.
    trial: the training trial where the splits depend on one (ignored otherwise).
    synthetic_sizes: generate a synthetic tree at `root` first (reused when present).
    progress: print the dataset summary, the preparation notice and progress bars (process 0).
    validation: (fraction, seed): hold out validation identities (`hold_out_validation`).
  Raises:
    DatasetError: missing or malformed dataset files (the message names them).
    StorageError: the synthetic tree or the prepared copy cannot be written.
  """
  spec = specs.get_spec(dataset)
  root = os.path.abspath(root)
  show = progress and jax.process_index() == 0
  if synthetic_sizes is not None:
    ensure_synthetic_data(spec, root, synthetic_sizes, show_progress=show)
  trial = spec.split_trial(trial)
  split_records = tfds_builders.read_split_records(dataset, root, trial)
  fingerprint = tfds_builders.fingerprint(split_records, root, spec.split_files(root, trial))
  if show:  # Before holding out: the listed identities are those of the whole training split.
    _summarise(spec, root, trial, split_records, sys.stderr)
  held_out = ""
  if validation is not None:
    split_records, held_out = hold_out_validation(spec, root, trial, split_records, *validation)
    if show:
      print(f"dakd_jax: {held_out}", file=sys.stderr)

  def prepare():
    with errors.writing(f"prepared {spec.title} data in {os.path.abspath(prepared_dir)}",
                        fix=PREPARED_FIX):
      if spec.trials:  # One copy of the images for every trial: each trial's splits are views.
        return tfds_builders.prepare_shared(dataset, root, prepared_dir, image_size[0],
                                            image_size[1], split_records, progress=show)
      return tfds_builders.prepare(dataset, root, prepared_dir, image_size[0], image_size[1],
                                   trial, progress=show, split_records=split_records)

  builder = process_zero_first(prepare)
  try:
    sources = (tfds_builders.split_views(builder, split_records) if spec.trials
               else tfds_builders.load_sources(builder))
  except (RuntimeError, OSError, ValueError) as error:  # Damage its record could not see.
    raise DatasetError(
        f"the prepared copy {builder.data_dir} cannot be read ({str(error).splitlines()[0]}); "
        "delete that folder and run again to prepare it anew") from error
  train_meta = tfds_builders.split_metadata(sources["train"])
  test_meta = tfds_builders.split_metadata(sources["test"])
  test_rows = types.MappingProxyType(
      {path: row for row, path in enumerate(test_meta["path"].tolist())})
  val_meta = (types.MappingProxyType(tfds_builders.split_metadata(sources["val"]))
              if "val" in sources else None)
  return DataBundle(spec=spec, root=root, trial=trial, train_source=sources["train"],
                    test_source=sources["test"], train_meta=types.MappingProxyType(train_meta),
                    test_meta=types.MappingProxyType(test_meta),
                    num_classes=int(train_meta["label"].max()) + 1, test_rows=test_rows,
                    fingerprint=fingerprint, val_source=sources.get("val"), val_meta=val_meta,
                    held_out=held_out)


def modality_rows(meta: Mapping[str, np.ndarray], modality_code: int) -> np.ndarray:
  """Indices of the split's images of one modality, in split order."""
  return np.flatnonzero(meta["modality"] == modality_code)
