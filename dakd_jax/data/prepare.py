"""From a config to ready-to-use data: generate (synthetic only), prepare (TFDS), index.

The result, a `DataBundle`, is what the training loop and evaluation read: random-access sources
of the prepared train and test splits, their metadata arrays (no image decoded), the number of
training identities, and where protocols find their file lists.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from dakd_jax.data import records
from dakd_jax.data import synthetic
from dakd_jax.data import tfds_builders

SYNTHETIC_KIND = {"sysu_mm01": "sysu", "regdb": "regdb"}


@dataclasses.dataclass
class DataBundle:
  """Prepared splits and what is known about them.

  train_source / test_source: random-access sources; `source[i]['image']` is uint8 [H, W, 3].
  train_meta / test_meta: label, identity, camera, modality (0 visible, 1 infrared), path arrays.
  num_classes: training identities C (labels 0..C-1).
  root: the dataset root the protocols read their file lists from.
  """
  dataset: str
  root: str
  trial: int
  train_source: object
  test_source: object
  train_meta: dict
  test_meta: dict
  num_classes: int
  # Caches of derived lookups: the test split's path -> row, and protocol -> (query, gallery)
  # rows (listing the protocol's folders once, not at every training-time evaluation).
  _test_positions: dict = dataclasses.field(default_factory=dict, repr=False)
  protocol_rows_cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def test_index_of(self, record: records.ImageRecord) -> int:
    """Index in the prepared test split of a protocol record (by path relative to the root)."""
    if not self._test_positions:
      self._test_positions.update(
          (p, i) for i, p in enumerate(self.test_meta["path"].tolist()))
    relative = os.path.relpath(record.path, self.root).replace(os.sep, "/")
    if relative not in self._test_positions:
      raise records.DatasetError(
          f"{record.path} is in the evaluation protocol but not in the prepared test split; "
          f"the prepared data is stale: delete the prepared folder and run again")
    return self._test_positions[relative]


def ensure_synthetic_data(config: ml_collections.ConfigDict) -> str:
  """Generates the synthetic tree at data.root when config.synthetic.enabled (else no-op)."""
  if not config.synthetic.enabled:
    return config.data.root
  s = config.synthetic
  kind = SYNTHETIC_KIND[config.data.dataset]
  if kind == "sysu":
    params = dict(num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids,
                  num_test_ids=s.num_test_ids, images_per_camera=s.images_per_camera,
                  height=s.image_height, width=s.image_width, seed=s.seed)
  else:
    params = dict(num_ids=2 * s.num_train_ids, images_per_modality=s.images_per_camera,
                  height=s.image_height, width=s.image_width, seed=s.seed)
  process_zero_first(lambda: synthetic.ensure_synthetic(config.data.root, kind, **params))
  return config.data.root


def process_zero_first(fn):
  """Runs fn on process 0, then on the others once it is done (they then find its files)."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils  # Multi-host only.
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("dakd_jax: process 0 prepared data")
  return result if jax.process_index() == 0 else fn()


def prepare_data(config: ml_collections.ConfigDict, *, progress: bool = True) -> DataBundle:
  """Generates (synthetic), prepares (once per size/trial/root) and opens the dataset."""
  root = os.path.abspath(ensure_synthetic_data(config))
  dataset = config.data.dataset
  trial = config.data.trial if dataset == "regdb" else None
  builder = process_zero_first(lambda: tfds_builders.prepare(
      dataset, root, config.data.prepared_dir, config.data.image_height,
      config.data.image_width, trial, progress=progress and jax.process_index() == 0))
  sources = tfds_builders.load_sources(builder)
  train_meta = tfds_builders.split_metadata(sources["train"])
  test_meta = tfds_builders.split_metadata(sources["test"])
  num_classes = int(train_meta["label"].max()) + 1
  return DataBundle(dataset=dataset, root=root, trial=config.data.trial,
                    train_source=sources["train"], test_source=sources["test"],
                    train_meta=train_meta, test_meta=test_meta, num_classes=num_classes)


def modality_rows(meta: dict, modality_code: int) -> np.ndarray:
  """Indices of the split's images of one modality, in split order."""
  return np.flatnonzero(meta["modality"] == modality_code)
