"""Verification metrics: TPR at fixed FPR and the ROC over all query-gallery pairs.

A second reading of the same distance matrix that `metrics.rank_metrics` ranks: instead of
"is the right person near the top", "if a pair is accepted as the same person whenever its
distance is below a threshold, how many true pairs are accepted when only a fraction f of the
false pairs is" (fast-reid's `TEST.ROC`, face verification's TAR@FAR). Works on arrays only, so
it runs on saved features (`eval.features`) as well as after extraction.

Pairs: every (query, gallery) pair not removed by the protocol (SYSU: a camera-3 query and a
camera-2 gallery image, the same pairs `rank_metrics` drops; `metrics.removed_pairs` builds
the mask). Positive = same identity, negative = different identity.

Threshold semantics (exact, ties included): a pair is accepted when its distance is strictly
below the threshold tau. For a target f, let m be the largest false-positive count with
m / num_negative <= f; tau is the (m+1)-th smallest negative distance (+inf when m equals the
number of negatives). Accepting d < tau then gives at most m false positives, and every
threshold that accepts more pairs accepts that negative (and all negatives tied with it), so
the reported TPR is the largest reachable with FPR <= f. Pairs tied at tau are all rejected;
the achieved FPR is reported next to the target and may be below it. fast-reid instead reports
the ROC point whose FPR is nearest to the target, which may lie above it. Targets below
1 / num_negative can only be met with zero false positives.
"""
from __future__ import annotations

import numpy as np

from dakd_jax.evaluation import metrics as metrics_lib

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)
DEFAULT_CHUNK_BYTES = 64 * 2**20


def tpr_at_fpr(distmat, query_ids, gallery_ids, fprs=DEFAULT_FPRS, removed=None):
  """TPR at each target FPR over all kept query-gallery pairs (semantics in the module doc).

  Args:
    distmat: [num_query, num_gallery] finite distances, lower is closer (any scale, e.g. the
      evaluator's -cosine); NumPy, memmap or JAX array, read a chunk of rows at a time.
    query_ids, gallery_ids: [num_query] / [num_gallery] identity labels.
    fprs: target false-positive rates, each in [0, 1].
    removed: optional [num_query, num_gallery] bool, True for pairs left out (neither positive
      nor negative), e.g. `metrics.removed_pairs("sysu", ...)`.

  Returns:
    {"fpr_targets": float64 [t], "tpr": float64 [t], "fpr": float64 [t] achieved FPR (<= the
     target), "threshold": float64 [t] tau (accept distance < tau; inf = accept all),
     "num_positive": int, "num_negative": int, "summary": {"TPR@FPR=0.0001": tpr, ...}}.

  Raises:
    ValueError: bad shapes, non-finite distances, targets outside [0, 1], or no positive or
      no negative pair left.
  """
  targets = np.asarray(fprs, np.float64).reshape(-1)
  if targets.size == 0 or not np.all((targets >= 0) & (targets <= 1)):
    raise ValueError(f"tpr_at_fpr: fprs must be a non-empty list of rates in [0, 1], got "
                     f"{fprs!r}.")
  positive, negative = sorted_pair_distances(distmat, query_ids, gallery_ids, removed)
  points = _operating_points(positive, negative, targets)
  points["summary"] = {f"TPR@FPR={target:g}": float(tpr)
                       for target, tpr in zip(targets, points["tpr"])}
  return points


def roc_curve(distmat, query_ids, gallery_ids, removed=None, num_points=200):
  """The ROC as exact operating points at log-spaced target FPRs (for plots).

  Each point is `tpr_at_fpr` at one target: num_points targets spaced evenly in log between
  1 / num_negative and 1, plus the zero-false-positive point. Memory stays O(pairs), unlike a
  curve with one point per distinct distance.

  Args: as `tpr_at_fpr`; num_points >= 2.
  Returns: the `tpr_at_fpr` dict (without "summary"), points ordered by increasing FPR.
  """
  if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)) or (
      num_points < 2):
    raise ValueError(f"roc_curve: num_points must be an integer >= 2, got {num_points!r}.")
  positive, negative = sorted_pair_distances(distmat, query_ids, gallery_ids, removed)
  targets = np.concatenate([[0.0], np.logspace(-np.log10(negative.size), 0.0, num_points)])
  return _operating_points(positive, negative, targets)


def sorted_pair_distances(distmat, query_ids, gallery_ids, removed=None,
                          chunk_bytes=DEFAULT_CHUNK_BYTES):
  """(positive, negative): ascending distances of the kept same- / different-identity pairs.

  Args: as `tpr_at_fpr`; chunk_bytes bounds the rows of distmat read at once.
  Returns: two 1-D arrays in distmat's float dtype (float64 for integer input).
  """
  distmat, query_codes, gallery_codes, removed = _validate(distmat, query_ids, gallery_ids,
                                                           removed)
  num_query, num_gallery = distmat.shape
  rows = max(1, chunk_bytes // (8 * num_gallery))
  positives, negatives = [], []
  for start in range(0, num_query, rows):
    block = np.asarray(distmat[start:start + rows])
    if block.dtype.kind != "f":
      block = block.astype(np.float64)
    if not np.isfinite(block).all():
      row = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
      raise ValueError(f"tpr_at_fpr: distmat has a NaN or infinite distance in query row {row}; "
                       "fix the embeddings that produced it.")
    same = query_codes[start:start + rows, None] == gallery_codes[None, :]
    kept = np.ones_like(same) if removed is None else ~removed[start:start + rows]
    positives.append(block[same & kept])
    negatives.append(block[~same & kept])
  positive, negative = np.concatenate(positives), np.concatenate(negatives)
  if positive.size == 0 or negative.size == 0:
    raise ValueError(f"tpr_at_fpr: {positive.size} positive and {negative.size} negative pairs "
                     "are left; both are needed (check the identity labels and the removed "
                     "mask).")
  positive.sort()
  negative.sort()
  return positive, negative


def _operating_points(positive, negative, targets):
  """Best TPR with FPR <= each target, from ascending positive/negative distances."""
  num_negative = negative.size
  allowed = np.floor(targets * num_negative).astype(np.int64)
  # Fix floating rounding of the product so that allowed is exactly max{m: m / N <= f}.
  allowed = np.where((allowed + 1) / num_negative <= targets, allowed + 1, allowed)
  allowed = np.where(allowed / num_negative > targets, allowed - 1, allowed)
  allowed = np.clip(allowed, 0, num_negative)
  accept_all = allowed >= num_negative
  threshold = np.where(accept_all, np.inf,
                       negative[np.minimum(allowed, num_negative - 1)].astype(np.float64))
  false_positives = np.where(accept_all, num_negative,
                             np.searchsorted(negative, threshold, side="left"))
  true_positives = np.where(accept_all, positive.size,
                            np.searchsorted(positive, threshold, side="left"))
  return {"fpr_targets": targets, "tpr": true_positives / positive.size,
          "fpr": false_positives / num_negative, "threshold": threshold,
          "num_positive": int(positive.size), "num_negative": int(num_negative)}


def _validate(distmat, query_ids, gallery_ids, removed):
  """Checks shapes; returns (distmat, query codes, gallery codes, removed mask or None)."""
  if not isinstance(distmat, np.ndarray):
    distmat = np.asarray(distmat)
  if distmat.dtype.name == "bfloat16":
    distmat = distmat.astype(np.float32)
  if distmat.dtype.kind not in "fiu" or distmat.ndim != 2 or 0 in distmat.shape:
    raise ValueError(f"tpr_at_fpr: distmat must be a real [num_query, num_gallery] array with "
                     f"both > 0, got {distmat.dtype} {distmat.shape}.")
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  for name, ids, size in (("query_ids", query_ids, distmat.shape[0]),
                          ("gallery_ids", gallery_ids, distmat.shape[1])):
    if ids.ndim != 1 or ids.size != size:
      raise ValueError(f"tpr_at_fpr: {name} must be 1-D with {size} entries (distmat "
                       f"{distmat.shape}), got shape {ids.shape}.")
  if removed is not None:
    removed = np.asarray(removed)
    if removed.dtype != bool or removed.shape != distmat.shape:
      raise ValueError(f"tpr_at_fpr: removed must be a bool mask of distmat's shape "
                       f"{distmat.shape}, got {removed.dtype} {removed.shape}.")
  _, codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  return distmat, codes[:query_ids.size], codes[query_ids.size:], removed
