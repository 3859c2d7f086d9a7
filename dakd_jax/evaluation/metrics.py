"""Cross-modal re-ID ranking metrics: CMC, mAP and mINP (method.md section 7.4).

Last step of evaluation: embeddings -> distance matrix -> (optional k-reciprocal re-ranking,
`rerank.py`) -> `rank_metrics` -> report. It reproduces the AGW baseline's `eval_sysu` and
`eval_regdb` and the LLCM reference's `eval_llcm` without a per-query Python loop, in bounded
memory (chunks of queries). What differs between datasets is the dataset's `CameraRule`
(`dakd_jax.data.records`, declared in each dataset's module): the gallery images a query never
sees (SYSU's camera filter, LLCM's same-identity same-camera filter) and whether CMC counts
distinct identities; nothing here names a dataset.

Tie rule: the baseline ranks with `np.argsort(distmat, axis=1)` (introsort, not stable), so its
order among equal distances is unspecified. Here equal distances are ranked by gallery index
(the order of a stable argsort), which is deterministic; -0.0 and +0.0 are equal.
"""
from __future__ import annotations

import numpy as np

from dakd_jax.data import specs
from dakd_jax.data.records import CameraRule

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
# Peak working bytes of one chunk, per distmat element: uint32 keys (4), match mask (1), a
# sorted copy (4) and the row-tagged uint64 copy (8), temporaries (3); per true match: its
# row, column, key, position, rank order, j and p (~64).
_BYTES_PER_ELEMENT = 20
_BYTES_PER_MATCH = 64
# Key of a filtered gallery image: above every finite or infinite distance's key (NaN is
# rejected), so filtered images rank after all kept ones and never precede a match.
_REMOVED_KEY = np.uint32(0xFFFFFFFF)


def rank_metrics(distmat, query_ids, gallery_ids, query_cams=None, gallery_cams=None, *,
                 protocol, max_rank=20, query_chunk_size=None,
                 memory_budget_bytes=DEFAULT_MEMORY_BUDGET_BYTES):
  """CMC, mAP and mINP of a cross-modal retrieval (method.md 7.4, llcm.md 3.3; the references'
  `eval_sysu`, `eval_regdb`, `eval_llcm`).

  Each query's gallery is ranked by increasing distance (ties by gallery index), without the
  images the camera rule removes (SYSU: camera-2 images for camera-3 queries; LLCM: images with
  the query's identity and camera number; RegDB: none). With `p_1 < ... < p_G` the 1-based
  positions of the G true matches in the kept ranking:
    AP = (1/G) sum_j j / p_j,   INP = G / p_G,
    CMC@k = fraction of valid queries whose first-hit rank r <= k, where r = p_1 or, under a
      rule with distinct_identity_cmc (SYSU, LLCM), the position of the query identity in the
      kept ranked list collapsed to distinct identities (first occurrence kept), as in the
      references.
  Queries with no true match left are not valid and are left out of every average.
  CMC always has `max_rank` entries: where the baseline would clamp `max_rank` to the gallery
  size (or fail on SYSU when fewer distinct identities are kept), the curve is continued with
  its final value (every valid query is found by the last rank, so that value is 1).

  Args:
    distmat: [num_query, num_gallery] distances, lower is closer; NumPy (memmap is fine: only a
      chunk of rows is read at a time) or JAX array; float16/32 are fastest, float64 and
      integer dtypes are ranked through a stable argsort first. NaN is rejected.
    query_ids, gallery_ids: [num_query] / [num_gallery] identity labels (any comparable type).
    query_cams, gallery_cams: [num_query] / [num_gallery] integer cameras as on disk (SYSU
      1..6, LLCM 1..9). Required where the rule reads cameras; optional and ignored elsewhere.
    protocol: a `CameraRule` (a dataset spec's `camera_rule`) or its name ("sysu", "regdb",
      "llcm", or a dataset name such as "sysu_mm01").
    max_rank: length of the CMC curve, >= 1.
    query_chunk_size: queries per chunk; None picks it from `memory_budget_bytes`.
    memory_budget_bytes: approximate working memory per chunk beyond the input.

  Returns:
    {"cmc": float64 [max_rank] in [0, 1], "mAP": float, "mINP": float,
     "num_valid_queries": int}.

  Raises:
    ValueError: bad shapes, protocol, max_rank, chunk size, NaN distances, missing cameras
      (SYSU, LLCM), or no valid query at all (the baseline asserts on that too).
    TypeError: a distmat that is not real-valued numbers.
  """
  distmat, query_codes, gallery_codes, rule = _validate(
      distmat, query_ids, gallery_ids, query_cams, gallery_cams, protocol, max_rank,
      query_chunk_size)
  layout = _gallery_layout(gallery_codes, gallery_cams, rule)
  query_cams = np.asarray(query_cams) if rule.needs_cameras else None
  parts = []
  for start, stop in _chunk_bounds(query_codes, gallery_codes, query_chunk_size,
                                   memory_budget_bytes):
    parts.append(_chunk_stats(
        distmat[start:stop], start, query_codes[start:stop],
        None if query_cams is None else query_cams[start:stop], layout, memory_budget_bytes))
  first_rank, average_precision, inverse_precision, num_matches = (
      np.concatenate(column) for column in zip(*parts))
  valid = num_matches > 0
  num_valid = int(valid.sum())
  if num_valid == 0:
    raise ValueError("rank_metrics: no query has a true match in its (filtered) gallery; check "
                     "that query_ids and gallery_ids use the same identity labels.")
  hits = np.bincount(np.minimum(first_rank[valid], max_rank + 1), minlength=max_rank + 2)
  cmc = np.cumsum(hits)[1:max_rank + 1] / num_valid
  return {"cmc": cmc.astype(np.float64),
          "mAP": float(average_precision[valid].mean()),
          "mINP": float(inverse_precision[valid].mean()),
          "num_valid_queries": num_valid}


def float_sort_keys(values):
  """uint32 keys whose unsigned order is the numeric order of float16/float32 values.

  The float's bits are remapped (negatives inverted, sign bit set on the rest); -0.0 gets the
  key of +0.0, so equal values get equal keys. NaN must be excluded by the caller.

  Args:
    values: float16/float32 array of any shape (not modified).

  Returns:
    uint32 array of the same shape.
  """
  return _float32_keys_inplace(np.array(values, dtype=np.float32))


def _float32_keys_inplace(values):
  values += np.float32(0.0)  # -0.0 + 0.0 == +0.0
  keys = values.view(np.uint32)
  flip = keys >> np.uint32(31)  # 1 for negatives: invert all bits; else set the sign bit
  flip *= np.uint32(0x7FFFFFFF)
  flip |= np.uint32(0x80000000)
  keys ^= flip
  return keys


def _chunk_stats(chunk, start, query_codes, query_cams, layout, memory_budget_bytes):
  """Per-query first-hit rank, AP, INP and match count for one chunk of distmat rows.

  query_cams: [rows] cameras where the rule reads them, else None. Positions come from
  counting, in the row's sorted uint32 keys, the keys below each true match (a searchsorted over
  all rows at once), plus equal keys with a smaller gallery index.
  """
  keys = _chunk_keys(chunk, start, layout["perm"])
  num_rows = keys.shape[0]
  is_match = layout["codes"][None, :] == query_codes[:, None]
  for query_camera, removed_columns in layout["removed_by_query_camera"]:
    filtered_rows = np.flatnonzero(query_cams == query_camera)
    if filtered_rows.size and removed_columns.size:
      cells = (filtered_rows[:, None], removed_columns[None, :])
      keys[cells] = _REMOVED_KEY  # after every kept image, so never counted below a match
      is_match[cells] = False
  match_rows, match_columns = np.nonzero(is_match)
  del is_match
  if layout["same_identity_same_camera"]:
    match_rows, match_columns = _drop_same_camera(keys, match_rows, match_columns, query_cams,
                                                  layout["cams"])
  if not match_rows.size:
    empty = np.zeros(num_rows)
    return empty.astype(np.intp), empty, empty, empty.astype(np.intp)
  match_keys = keys[match_rows, match_columns]
  positions = _match_positions(keys, match_rows, match_columns, match_keys, layout["index"],
                               memory_budget_bytes)
  # Matches of each row in ranked order: j = 1..G, p = 1-based position.
  order = np.argsort(match_rows * keys.shape[1] + positions, kind="stable")
  num_matches = np.bincount(match_rows, minlength=num_rows)
  row_start = np.cumsum(num_matches) - num_matches
  j = np.arange(1, match_rows.size + 1) - np.repeat(row_start, num_matches)
  p = positions[order] + 1.0
  average_precision = (np.bincount(match_rows, weights=j / p, minlength=num_rows)
                       / np.maximum(num_matches, 1))
  valid = num_matches > 0
  first = np.zeros(num_rows, np.intp)
  last_position = np.ones(num_rows)
  first[valid] = order[row_start[valid]]
  last_position[valid] = p[row_start[valid] + num_matches[valid] - 1]
  inverse_precision = num_matches / last_position
  if layout["identity_starts"] is None:
    first_rank = np.where(valid, positions[first] + 1, 0)
  else:
    first_rank = _distinct_rank(keys, match_keys[first], match_columns[first], valid, layout)
  return first_rank, average_precision, inverse_precision, num_matches


def _drop_same_camera(keys, match_rows, match_columns, query_cams, layout_cams):
  """The same-identity same-camera filter (LLCM): true matches from the query's own camera
  leave the ranking.

  Only true matches can share the query's identity, so the filter works on the match list
  (O(matches) memory, no second [rows, num_gallery] mask). The dropped cells get the removed key,
  after every kept image, so they neither count as matches nor precede one, and the identity's
  best kept key (`_distinct_rank`) ignores them. Returns the kept (match_rows, match_columns).
  """
  same_camera = layout_cams[match_columns] == query_cams[match_rows]
  keys[match_rows[same_camera], match_columns[same_camera]] = _REMOVED_KEY
  kept = ~same_camera
  return match_rows[kept], match_columns[kept]


def _match_positions(keys, match_rows, match_columns, match_keys, index, memory_budget_bytes):
  """0-based position of each true match in its row's ranking (value, then gallery index)."""
  num_rows, num_gallery = keys.shape
  # One sorted 1-D array for all rows: the row number above the key keeps rows apart.
  flat = np.sort(keys, axis=1).astype(np.uint64)
  flat |= np.arange(num_rows, dtype=np.uint64)[:, None] << np.uint64(32)
  targets = (match_rows.astype(np.uint64) << np.uint64(32)) | match_keys
  flat = flat.reshape(-1)
  below = np.searchsorted(flat, targets, side="left")  # the match's own key is at `below`
  after = np.minimum(below + 1, flat.size - 1)
  tied = np.flatnonzero((after > below) & (flat[after] == targets))
  del flat
  positions = below - match_rows * num_gallery
  if tied.size:
    # Rare with real features: equal distances rank by gallery index.
    block = max(1, memory_budget_bytes // (8 * num_gallery))
    for begin in range(0, tied.size, block):
      part = tied[begin:begin + block]
      same = keys[match_rows[part]] == match_keys[part, None]
      same &= index[None, :] < index[match_columns[part], None]
      positions[part] += same.sum(axis=1)
  return positions


def _distinct_rank(keys, first_keys, first_columns, valid, layout):
  """Distinct-identity CMC rank: identities ranked before the first true match, plus one."""
  starts, index = layout["identity_starts"], layout["index"]
  identity_best = np.minimum.reduceat(keys, starts, axis=1)
  rank = (identity_best < first_keys[:, None]).sum(axis=1) + 1
  # Another identity whose best key equals the first match's key comes first iff one of its
  # images with that key has a smaller gallery index (the query's own identity never does).
  tied = np.flatnonzero(valid & ((identity_best == first_keys[:, None]).sum(axis=1) > 1))
  if tied.size:
    same = keys[tied] == first_keys[tied, None]
    same &= index[None, :] < index[first_columns[tied], None]
    has_earlier = np.logical_or.reduceat(same, starts, axis=1)
    has_earlier &= identity_best[tied] == first_keys[tied, None]  # not counted above yet
    rank[tied] += has_earlier.sum(axis=1)
  return np.where(valid, rank, 0)


def _chunk_keys(chunk, start, perm):
  """uint32 sort keys [rows, num_gallery] of distmat rows, columns in `perm` order."""
  chunk = np.asarray(chunk)
  if chunk.dtype.kind == "f" and np.isnan(chunk).any():
    row = start + int(np.flatnonzero(np.isnan(chunk).any(axis=1))[0])
    raise ValueError(f"rank_metrics: distmat has NaN in query row {row}; remove or fix the "
                     "embeddings that produced it.")
  if chunk.dtype in (np.float16, np.float32):
    # Either branch makes a fresh float32 copy (memmap rows are read here).
    values = (np.array(chunk, dtype=np.float32) if perm is None
              else np.take(chunk, perm, axis=1).astype(np.float32, copy=False))
    return _float32_keys_inplace(values)
  # float64 and integers do not fit 32 bits: rank stably (ties by gallery index) first.
  order = np.argsort(chunk, axis=1, kind="stable")
  ranks = np.empty(chunk.shape, np.uint32)
  np.put_along_axis(ranks, order, np.arange(chunk.shape[1], dtype=np.uint32)[None, :], axis=1)
  return ranks if perm is None else np.take(ranks, perm, axis=1)


def _gallery_layout(gallery_codes, gallery_cams, rule: CameraRule):
  """Column layout of the keys: grouped by identity under a distinct-identity CMC (for the
  per-identity minima), else the gallery's own order.

  Returns a dict: perm (gather from distmat columns, None when already in layout order),
  index ([num_gallery] original gallery index of each layout column, the tie-break), codes
  (identity code per layout column), identity_starts (distinct-identity CMC: first column of
  each identity, else None), removed_by_query_camera ([(query camera, layout columns it never
  sees)] from the rule's camera pairs), same_identity_same_camera (the rule's flag), cams
  (camera per layout column where the rule reads cameras, else None).
  """
  num_gallery = gallery_codes.size
  perm = (np.argsort(gallery_codes, kind="stable") if rule.distinct_identity_cmc
          else np.arange(num_gallery))
  codes = gallery_codes[perm]
  cams = np.asarray(gallery_cams)[perm] if rule.needs_cameras else None
  is_grouped = bool(np.all(perm == np.arange(num_gallery)))
  return {"perm": None if is_grouped else perm, "index": perm, "codes": codes,
          "identity_starts": (np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
                              if rule.distinct_identity_cmc else None),
          "removed_by_query_camera": [(query_camera, np.flatnonzero(cams == gallery_camera))
                                      for query_camera, gallery_camera
                                      in rule.removed_camera_pairs],
          "same_identity_same_camera": rule.removes_same_identity_same_camera,
          "cams": cams}


def _chunk_bounds(query_codes, gallery_codes, query_chunk_size, memory_budget_bytes):
  """(start, stop) query ranges: fixed size if given, else within the memory budget."""
  num_query, num_gallery = query_codes.size, gallery_codes.size
  if query_chunk_size is not None:
    return [(start, min(start + query_chunk_size, num_query))
            for start in range(0, num_query, query_chunk_size)]
  if memory_budget_bytes <= 0:
    raise ValueError(f"rank_metrics: memory_budget_bytes must be > 0, got "
                     f"{memory_budget_bytes}.")
  matches = np.bincount(gallery_codes, minlength=query_codes.max() + 1)[query_codes]
  cost = np.cumsum(_BYTES_PER_ELEMENT * num_gallery + _BYTES_PER_MATCH * matches)
  bounds, start = [], 0
  while start < num_query:
    spent = cost[start - 1] if start else 0
    stop = max(start + 1, int(np.searchsorted(cost, spent + memory_budget_bytes, "right")))
    bounds.append((start, min(stop, num_query)))
    start = stop
  return bounds


def _validate(distmat, query_ids, gallery_ids, query_cams, gallery_cams, protocol, max_rank,
              query_chunk_size):
  """Checks the arguments; returns (distmat, query codes, gallery codes, the CameraRule)."""
  rule = camera_rule_of(protocol, "rank_metrics")
  if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
    raise ValueError(f"rank_metrics: max_rank must be an integer >= 1, got {max_rank!r}.")
  if query_chunk_size is not None and (
      isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, (int, np.integer))
      or query_chunk_size < 1):
    raise ValueError(f"rank_metrics: query_chunk_size must be None or an integer >= 1, got "
                     f"{query_chunk_size!r}.")
  if not isinstance(distmat, np.ndarray):
    distmat = np.asarray(distmat)  # JAX arrays and lists; a memmap stays a memmap
  if distmat.dtype.name == "bfloat16":
    distmat = distmat.astype(np.float32)  # exact; NumPy cannot sort bfloat16 itself
  if distmat.dtype.kind not in "fiu":
    raise TypeError(f"rank_metrics: distmat must hold real numbers, got dtype {distmat.dtype}.")
  if distmat.ndim != 2 or 0 in distmat.shape:
    raise ValueError(f"rank_metrics: distmat must be [num_query, num_gallery] with both > 0, "
                     f"got shape {distmat.shape}.")
  num_query, num_gallery = distmat.shape
  query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
  _check_vector("query_ids", query_ids, num_query, "rows")
  _check_vector("gallery_ids", gallery_ids, num_gallery, "columns")
  for name, cams, size, axis in (("query_cams", query_cams, num_query, "rows"),
                                 ("gallery_cams", gallery_cams, num_gallery, "columns")):
    if cams is None and rule.needs_cameras:
      raise ValueError(f"rank_metrics: protocol {rule.name!r} needs {name} (cameras as on "
                       "disk, for its camera rule).")
    if cams is not None:
      _check_vector(name, np.asarray(cams), size, axis, integer=True)
  _, codes = np.unique(np.concatenate([query_ids, gallery_ids]), return_inverse=True)
  codes = codes.astype(np.int32)
  return distmat, codes[:num_query], codes[num_query:], rule


def _check_vector(name, values, size, axis, integer=False):
  if values.ndim != 1 or values.size != size:
    raise ValueError(f"rank_metrics: {name} must be 1-D with one entry per distmat {axis} "
                     f"({size}), got shape {values.shape}.")
  if integer and values.dtype.kind not in "iu":
    raise ValueError(f"rank_metrics: {name} must hold integer camera numbers, got dtype "
                     f"{values.dtype}.")


def camera_rule_of(protocol: CameraRule | str, caller: str) -> CameraRule:
  """`protocol` as a CameraRule: itself, or the rule a name stands for (`specs.camera_rule`)."""
  if isinstance(protocol, CameraRule):
    return protocol
  try:
    return specs.camera_rule(protocol)
  except ValueError as error:
    raise ValueError(f"{caller}: protocol={protocol!r}: {error}") from None


def removed_pairs(protocol: CameraRule | str, query_ids, query_cams, gallery_ids, gallery_cams):
  """bool [Q, G]: the gallery images each query ignores under `protocol`'s camera rule (a
  CameraRule or its name; see `CameraRule.removed_pairs`), for pictures and small checks."""
  return camera_rule_of(protocol, "removed_pairs").removed_pairs(
      query_ids, query_cams, gallery_ids, gallery_cams)
