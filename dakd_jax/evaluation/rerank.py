"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances.

Optional step of evaluation (method.md 7.1): query and gallery embeddings -> this module ->
a re-ranked [num_query, num_gallery] distance matrix -> `metrics.rank_metrics`. It follows the
classic `re_ranking(probFea, galFea, k1, k2, lambda_value)` used by the AGW baseline, in
float32 (the baseline keeps V in float16), with these implementation choices:
- neighbour lists come from a stable ranking (ties by index; the classic uses an unstable
  argsort, so its order among equal distances is unspecified);
- the k-reciprocal sets, their expansion, V and the query expansion are computed for all items
  at once with NumPy (no Python loop over items); V is kept sparse (row, column, value);
- the Jaccard term sum_k min(V[i, k], V[j, k]) is accumulated over the pairs that share a
  non-zero column, in blocks of queries sized from a memory budget, and only for gallery j.
The pairwise distance matrix over all num_query + num_gallery items is dense (float32), as in
the classic algorithm: memory grows with (num_query + num_gallery)**2.
"""
from __future__ import annotations

import numpy as np

from dakd_jax.evaluation.metrics import float_sort_keys

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
# Working bytes per (query entry, gallery entry) pair in the Jaccard step: index arrays and
# float64 values of the gathers (about seven 8-byte arrays).
_BYTES_PER_PAIR = 56


def k_reciprocal_rerank(query_features, gallery_features, *, k1=20, k2=6, lambda_value=0.3,
                        memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES):
  """Re-ranked distances d* = (1 - lambda) d_J + lambda d (Zhong et al. 2017; method.md 7.1).

  With x the query and gallery features stacked (N = num_query + num_gallery items):
    d[i, j] = (|x_j|^2 + |x_i|^2 - 2 x_j.x_i) / max_m d_raw[m, i]   (squared Euclidean, each
      row divided by its item's largest distance, as in the classic code);
    R(i, k) = {j in N(i, k): i in N(j, k)}, N(i, k) the k + 1 nearest items (self included);
    R*(i) = R(i, k1) plus every R(c, round(k1/2)), c in R(i, k1), that shares more than two
      thirds of its items with R(i, k1);
    V[i, j] = exp(-d[i, j]) / sum_{m in R*(i)} exp(-d[i, m]) for j in R*(i), else 0;
    V <- mean of V over the k2 nearest items of each i (query expansion, skipped if k2 == 1);
    d_J[i, j] = 1 - S / (2 - S),  S = sum_k min(V[i, k], V[j, k]).

  Args:
    query_features: [num_query, dim] float features (unit norm in this project's evaluation).
    gallery_features: [num_gallery, dim] float features.
    k1: k-reciprocal neighbourhood size, >= 1 (20 in the paper and the baseline).
    k2: query-expansion size, >= 1 (6).
    lambda_value: weight of the original distance, in [0, 1] (0.3).
    memory_budget_bytes: approximate working memory of the blocked steps.

  Returns:
    [num_query, num_gallery] float32 re-ranked distances, lower is closer.

  Raises:
    ValueError: bad shapes, non-finite features, k1/k2/lambda out of range, or features whose
      distances are all zero (nothing to normalise by).
  """
  features, num_query = _validate(query_features, gallery_features, k1, k2, lambda_value)
  num_all = features.shape[0]
  original = _normalised_distances(features)
  neighbours = _nearest(original, min(max(k1 + 1, k2), num_all), memory_budget_bytes)
  rows, cols = _expanded_sets(neighbours, k1, memory_budget_bytes)
  weights = np.exp(-original[rows, cols])
  values = weights / np.bincount(rows, weights=weights, minlength=num_all)[rows].astype(
      np.float32)
  if k2 != 1:
    rows, cols, values = _query_expansion(rows, cols, values, neighbours[:, :k2], num_all)
  overlap = _jaccard_overlap(rows, cols, values, num_query, num_all, memory_budget_bytes)
  jaccard = 1 - overlap / (2 - overlap)
  final = jaccard * np.float32(1 - lambda_value) + original[:num_query, num_query:] * np.float32(
      lambda_value)
  return final.astype(np.float32, copy=False)


def _normalised_distances(features):
  """[N, N] float32 d[i, j] = raw[j, i] / max_m raw[m, i], raw the squared distances."""
  gram = features @ features.T
  gram *= np.float32(-2.0)
  squares = np.square(features).sum(axis=1)
  raw = squares[:, None] + squares[None, :]
  raw += gram  # (|x_i|^2 + |x_j|^2) - 2 x_i.x_j, the classic evaluation order
  del gram
  column_max = raw.max(axis=0)
  if np.isnan(raw).any() or not np.all(column_max > 0):
    raise ValueError("k_reciprocal_rerank: the squared distances are NaN or all zero for some "
                     "item (identical or overflowing features); check the embeddings.")
  normalised = np.ascontiguousarray(raw.T)
  del raw
  normalised /= column_max[:, None]
  return normalised


def _nearest(distances, count, memory_budget_bytes):
  """[N, count] indices of each row's nearest items by (distance, index), nearest first."""
  num_rows, num_cols = distances.shape
  block = max(1, memory_budget_bytes // (16 * num_cols))
  columns = np.arange(num_cols, dtype=np.uint64)
  result = np.empty((num_rows, count), np.int64)
  for start in range(0, num_rows, block):
    keys = float_sort_keys(distances[start:start + block]).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= columns  # unique keys: ties broken by column index
    if count < num_cols:
      keys = np.partition(keys, count - 1, axis=1)[:, :count]
    keys.sort(axis=1)
    result[start:start + block] = keys & np.uint64(0xFFFFFFFF)
  return result


def _reciprocal(neighbours, k):
  """k-reciprocal sets for all items: (candidates [N, k+1], is_reciprocal [N, k+1] bool)."""
  forward = neighbours[:, :k + 1]
  backward = neighbours[forward, :k + 1]  # [N, k+1, k+1]
  items = np.arange(neighbours.shape[0])[:, None, None]
  return forward, (backward == items).any(axis=-1)


def _expanded_sets(neighbours, k1, memory_budget_bytes):
  """(rows, cols) of the expanded sets R*(i), sorted by row then column, no duplicates."""
  num_all = neighbours.shape[0]
  forward, is_reciprocal = _reciprocal(neighbours, k1)
  half_forward, half_reciprocal = _reciprocal(neighbours, int(np.around(k1 / 2)))
  width, half_width = forward.shape[1], half_forward.shape[1]
  block = max(1, memory_budget_bytes // (2 * width * half_width * width))
  accepted = np.empty_like(is_reciprocal)
  for start in range(0, num_all, block):
    own, own_ok = forward[start:start + block], is_reciprocal[start:start + block]
    members, members_ok = half_forward[own], half_reciprocal[own]  # [B, k1+1, kh+1]
    in_own = ((members[..., None] == own[:, None, None, :]) & own_ok[:, None, None, :]).any(-1)
    overlap = (in_own & members_ok).sum(axis=-1)
    # Same float expression as the classic `len(...) > 2 / 3 * len(candidate set)`.
    accepted[start:start + block] = own_ok & (overlap > 2 / 3 * members_ok.sum(axis=-1))
  owner = np.arange(num_all)
  expansion = accepted[:, :, None] & half_reciprocal[forward]  # [N, k1+1, kh+1]
  rows = np.concatenate([np.broadcast_to(owner[:, None], forward.shape)[is_reciprocal],
                         np.broadcast_to(owner[:, None, None], expansion.shape)[expansion]])
  cols = np.concatenate([forward[is_reciprocal], half_forward[forward][expansion]])
  unique = np.unique(rows * num_all + cols)
  return unique // num_all, unique % num_all


def _query_expansion(rows, cols, values, expansion_neighbours, num_all):
  """Sparse V_qe[i] = mean over t of V[expansion_neighbours[i, t]] (rows sorted)."""
  row_length = np.bincount(rows, minlength=num_all)
  row_start = np.cumsum(row_length) - row_length
  source = expansion_neighbours.reshape(-1)
  length = row_length[source]
  owner = np.repeat(np.repeat(np.arange(num_all), expansion_neighbours.shape[1]), length)
  entry = (np.repeat(row_start[source] - (np.cumsum(length) - length), length)
           + np.arange(length.sum()))
  unique, inverse = np.unique(owner * num_all + cols[entry], return_inverse=True)
  mean = np.bincount(inverse, weights=values[entry]) / expansion_neighbours.shape[1]
  return unique // num_all, unique % num_all, mean.astype(np.float32)


def _jaccard_overlap(rows, cols, values, num_query, num_all, memory_budget_bytes):
  """[num_query, num_gallery] float32 S[i, j] = sum_k min(V[i, k], V[num_query + j, k])."""
  num_gallery = num_all - num_query
  in_gallery = rows >= num_query
  # Gallery entries grouped by column (k): the inverted index of the classic code.
  by_column = np.argsort(cols[in_gallery], kind="stable")
  gallery_item = rows[in_gallery][by_column] - num_query
  gallery_value = values[in_gallery][by_column]
  column_length = np.bincount(cols[in_gallery], minlength=num_all)
  column_start = np.cumsum(column_length) - column_length
  query_entries = np.flatnonzero(rows < num_query)
  pairs = column_length[cols[query_entries]]
  overlap = np.zeros((num_query, num_gallery), np.float32)
  # Blocks of whole queries whose pairs fit the budget (rows are sorted, so queries contiguous).
  pair_end = np.cumsum(pairs)
  entry_start = 0
  while entry_start < query_entries.size:
    spent = pair_end[entry_start - 1] if entry_start else 0
    stop = max(entry_start + 1, int(np.searchsorted(
        pair_end, spent + memory_budget_bytes // _BYTES_PER_PAIR, "right")))
    first_query, last_query = rows[query_entries[entry_start]], rows[query_entries[stop - 1]]
    stop = int(np.searchsorted(rows[query_entries], last_query, "right"))
    block = query_entries[entry_start:stop]
    count = pairs[entry_start:stop]
    pair_entry = np.repeat(block, count)
    position = (np.repeat(column_start[cols[block]] - (np.cumsum(count) - count), count)
                + np.arange(count.sum()))
    minimum = np.minimum(values[pair_entry], gallery_value[position])
    target = (rows[pair_entry] - first_query) * num_gallery + gallery_item[position]
    size = (last_query - first_query + 1) * num_gallery
    overlap[first_query:last_query + 1] = np.bincount(
        target, weights=minimum, minlength=size).reshape(-1, num_gallery)
    entry_start = stop
  return overlap


def _validate(query_features, gallery_features, k1, k2, lambda_value):
  """Checks the arguments; returns ([N, dim] float32 stacked features, num_query)."""
  query = np.asarray(query_features, dtype=np.float32)
  gallery = np.asarray(gallery_features, dtype=np.float32)
  for name, array in (("query_features", query), ("gallery_features", gallery)):
    if array.ndim != 2 or array.shape[0] == 0:
      raise ValueError(f"k_reciprocal_rerank: {name} must be [num_items >= 1, dim], got shape "
                       f"{array.shape}.")
    if not np.isfinite(array).all():
      raise ValueError(f"k_reciprocal_rerank: {name} has NaN or infinite values.")
  if query.shape[1] != gallery.shape[1]:
    raise ValueError(f"k_reciprocal_rerank: feature sizes differ: query dim {query.shape[1]}, "
                     f"gallery dim {gallery.shape[1]}.")
  for name, value in (("k1", k1), ("k2", k2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"k_reciprocal_rerank: {name} must be an integer >= 1, got {value!r}.")
  if not 0.0 <= lambda_value <= 1.0:
    raise ValueError(f"k_reciprocal_rerank: lambda_value must be in [0, 1], got "
                     f"{lambda_value!r}.")
  return np.concatenate([query, gallery]), query.shape[0]
