"""Cross-modal PK sampler: which training images make up each batch (method.md 5.1).

Sits between the prepared training split (its per-example labels and modalities, read without
decoding images by `tfds_builders.split_metadata`) and the Grain pipeline (`pipeline.py`), which
turns the indices drawn here into image batches. Every batch is a pure function of
`(seed, global step)`, so any step can be drawn on its own: resuming at step `s` sees exactly the
batches an uninterrupted run would, and every process computes the same global batch and loads
its own slice of it.

Batch layout (identity-major, `n = B * K`): position `b * K + k` holds the `k`-th visible and the
`k`-th infrared draw of the `b`-th identity, so visible position `j` and infrared position `j`
always share a label.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class LabelIndex(NamedTuple):
  """Dataset rows of one modality grouped by training label, padded for vectorised draws.

  indices: int64 [num_labels, max_count]; row `c` holds the dataset indices of label `c` in its
    first `counts[c]` entries, the rest is padding (-1) that is never drawn.
  counts: int64 [num_labels]; number of images of each label (0 if the label has none).
  """
  indices: np.ndarray
  counts: np.ndarray


def make_label_index(labels: np.ndarray, rows: np.ndarray, num_labels: int) -> LabelIndex:
  """Groups dataset rows by label.

  Args:
    labels: int [M], the training label of each selected row, in 0..num_labels-1.
    rows: int [M], the dataset index of each selected row (e.g. the visible rows of the split).
    num_labels: C, the number of training labels.
  Returns:
    LabelIndex with rows of each label in ascending dataset-index order.
  Raises:
    ValueError: if shapes differ or a label is outside 0..num_labels-1.
  """
  labels = np.asarray(labels, dtype=np.int64)
  rows = np.asarray(rows, dtype=np.int64)
  if labels.shape != rows.shape or labels.ndim != 1:
    raise ValueError(f"labels {labels.shape} and rows {rows.shape} must be equal 1-D shapes")
  if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
    raise ValueError(
        f"labels must lie in 0..{num_labels - 1}, got range {labels.min()}..{labels.max()}; "
        "pass training-split metadata (test rows carry label -1)")
  order = np.lexsort((rows, labels))
  labels, rows = labels[order], rows[order]
  counts = np.bincount(labels, minlength=num_labels).astype(np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  indices = np.full((num_labels, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
  # Column of each sorted row inside its label's block.
  columns = np.arange(labels.size) - starts[labels]
  indices[labels, columns] = rows
  return LabelIndex(indices=indices, counts=counts)


def make_modality_indices(labels: np.ndarray,
                          modality: np.ndarray) -> tuple[LabelIndex, LabelIndex]:
  """(visible, infrared) LabelIndex of a training split from its metadata arrays.

  Args:
    labels: int [N] training labels 0..C-1 of every row of the split (C = max + 1).
    modality: int [N], 0 visible, 1 infrared (`records.MODALITY_CODE`).
  Raises:
    ValueError: a negative label (test-split metadata) or a modality code other than 0/1.
  """
  labels = np.asarray(labels, dtype=np.int64)
  modality = np.asarray(modality)
  if labels.size == 0 or labels.min() < 0:
    raise ValueError("training metadata needs labels >= 0 for every row; got "
                     f"{'no rows' if labels.size == 0 else labels.min()} (test splits carry -1)")
  if not np.isin(modality, (0, 1)).all():
    raise ValueError(f"modality codes must be 0 or 1, got {np.unique(modality)}")
  num_labels = int(labels.max()) + 1
  rows = np.arange(labels.size)
  return tuple(make_label_index(labels[modality == code], rows[modality == code], num_labels)
               for code in (0, 1))


def steps_per_epoch(num_visible: int, num_infrared: int, ids_per_batch: int,
                    images_per_id: int) -> int:
  """Batches per epoch, `floor(N / (B * K)) + 1` with `N = max(num_visible, num_infrared)`.

  method.md 5.1: SYSU-MM01 (22,258 / 11,909, B*K = 32) gives 696; RegDB (2,060 / 2,060,
  B*K = 40) gives 52. Raises ValueError for non-positive B or K.
  """
  if ids_per_batch <= 0 or images_per_id <= 0:
    raise ValueError(f"ids_per_batch ({ids_per_batch}) and images_per_id ({images_per_id}) "
                     "must be positive")
  return max(num_visible, num_infrared) // (ids_per_batch * images_per_id) + 1


def eligible_labels(visible_by_label: LabelIndex, infrared_by_label: LabelIndex) -> np.ndarray:
  """Labels that can be sampled: those with at least one visible AND one infrared image.

  A cross-modal batch pairs each visible image with an infrared image of the same identity, so a
  label missing one modality cannot fill its positions. Such labels are left out of sampling
  (always, silently, deterministically); the reference data never has one (SYSU-MM01 and RegDB
  training identities all have both modalities). Returns int64 [C'] ascending.
  """
  if visible_by_label.counts.shape != infrared_by_label.counts.shape:
    raise ValueError(f"visible ({visible_by_label.counts.shape[0]}) and infrared "
                     f"({infrared_by_label.counts.shape[0]}) label counts differ")
  both = (visible_by_label.counts > 0) & (infrared_by_label.counts > 0)
  return np.flatnonzero(both).astype(np.int64)


def batch_indices(step: int, *, seed: int, visible_by_label: LabelIndex,
                  infrared_by_label: LabelIndex, ids_per_batch: int,
                  images_per_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Draws one global cross-modal PK batch (method.md 5.1), a pure function of (seed, step).

  With `rng = np.random.default_rng([seed, step])`, in this order:
    1. B distinct labels, uniformly without replacement among `eligible_labels` (in draw order);
    2. for each label, K visible rows uniformly WITH replacement among that label's rows;
    3. the same for infrared.
  Args:
    step: global step (>= 0).
    seed: sampler seed (>= 0).
    visible_by_label, infrared_by_label: `make_label_index` of each modality (same num_labels).
    ids_per_batch: B. images_per_id: K.
  Returns:
    (visible_idx int64 [B*K], infrared_idx int64 [B*K], labels int32 [B*K]), identity-major:
    position `b*K + k` belongs to the b-th drawn label.
  Raises:
    ValueError: negative seed/step, or fewer than B eligible labels.
  """
  if seed < 0 or step < 0:
    raise ValueError(f"seed ({seed}) and step ({step}) must be non-negative")
  eligible = eligible_labels(visible_by_label, infrared_by_label)
  if eligible.size < ids_per_batch:
    raise ValueError(
        f"ids_per_batch={ids_per_batch} but only {eligible.size} training labels have both "
        "visible and infrared images; lower data.ids_per_batch or check the training split")
  rng = np.random.default_rng([seed, step])
  chosen = rng.choice(eligible, size=ids_per_batch, replace=False)
  shape = (ids_per_batch, images_per_id)

  def draw(by_label: LabelIndex) -> np.ndarray:
    # `integers` broadcasts the per-row upper bound: column j of row b is uniform in
    # [0, counts[chosen[b]]).
    columns = rng.integers(0, by_label.counts[chosen][:, None], size=shape)
    return by_label.indices[chosen[:, None], columns].reshape(-1)

  visible_idx = draw(visible_by_label)
  infrared_idx = draw(infrared_by_label)
  labels = np.repeat(chosen, images_per_id).astype(np.int32)
  return visible_idx, infrared_idx, labels
