"""Average query expansion (alpha-QE), the `TEST.AQE` option fast-reid users know.

Optional step of evaluation, before scoring: query and gallery embeddings -> this module ->
expanded embeddings -> cosine distances -> (optional re-ranking) -> `metrics.rank_metrics`.
Off by default: none of the published VI-ReID numbers use it, so a result with it on is not
comparable with the paper and the results line must say so.

Definition (Chum et al. 2007 average QE, weighted as in Radenovic et al.'s alpha-QE): every
expanded item x is replaced by
    x' = unit( x + sum_{n in N_k(x)} w(x, n) n ),   w(x, n) = max(x.n, 0) ** alpha,
where N_k(x) are the k most similar items of the neighbour pool (ties by lower pool index),
never x itself and never a pair the protocol removes (the SYSU camera-3 / camera-2 rule). The
item's own weight is 1 (= its self-similarity ** alpha). alpha = 0 is the plain average of
x and its k neighbours.

Relation to fast-reid's `aqe(query, gallery, qe_times=1, qe_k, alpha)`: it stacks query and
gallery, takes each item's `qe_k` most similar items of the stack (itself included) and weights
them by `similarity ** alpha`. That is `pool="all", k=qe_k - 1, expand_gallery=True` here, with
three differences: fast-reid's ties follow `np.argpartition` (unspecified), a negative
similarity is not clipped (alpha = 3 keeps its sign; other alphas give NaN there), and it
ignores removed pairs. Its defaults are qe_k = 5, alpha = 3. `pool="gallery"` (the default here)
draws a query's neighbours from the gallery only: in cross-modal re-ID that is the other
modality, so the query moves towards its cross-modal neighbours rather than towards other
queries of its own modality.
"""
from __future__ import annotations

import numpy as np

from dakd_jax.evaluation.metrics import float_sort_keys

POOLS = ("gallery", "all")
DEFAULT_CHUNK_ROWS = 1024


def average_query_expansion(query, gallery, *, k=5, alpha=3.0, expand_gallery=False,
                            pool="gallery", removed=None, chunk_rows=DEFAULT_CHUNK_ROWS):
  """Expanded query (and optionally gallery) embeddings (definition in the module docstring).

  Args:
    query: [num_query, dim] float embeddings (re-normalised here; unit input is unchanged).
    gallery: [num_gallery, dim] float embeddings.
    k: neighbours per item, >= 1; fewer are used where fewer candidates exist.
    alpha: weight exponent, >= 0.
    expand_gallery: also expand the gallery (database-side augmentation). With pool="gallery"
      a gallery item's neighbours are other gallery items.
    pool: "gallery" (query neighbours from the gallery) or "all" (from queries and gallery,
      fast-reid's choice; then query and gallery items are expanded from the same pool).
    removed: optional [num_query, num_gallery] bool, True where a query-gallery pair is removed
      by the protocol (see `metrics.removed_pairs`); such pairs never expand
      each other.
    chunk_rows: rows scored at a time (memory is about chunk_rows * pool size * 24 bytes).

  Returns:
    (query', gallery'): float32 [num_query, dim] and [num_gallery, dim] unit embeddings;
    gallery' is the normalised input when expand_gallery is false.

  Raises:
    ValueError: bad shapes, non-finite or zero embeddings, k < 1, alpha < 0, unknown pool,
      a removed mask of the wrong shape.
  """
  query, gallery, removed = _validate(query, gallery, k, alpha, pool, removed, chunk_rows)
  num_query = query.shape[0]
  if pool == "gallery":
    new_query = _expand(query, gallery, k, alpha, _removed_excluded(removed), chunk_rows)
    new_gallery = (_expand(gallery, gallery, k, alpha, _self_excluded, chunk_rows)
                   if expand_gallery else gallery)
    return new_query, new_gallery
  items = np.concatenate([query, gallery])
  expanded_rows = items.shape[0] if expand_gallery else num_query
  expanded = _expand(items[:expanded_rows], items, k, alpha,
                     _stacked_excluded(num_query, removed), chunk_rows)
  new_gallery = expanded[num_query:] if expand_gallery else gallery
  return expanded[:num_query], new_gallery


# An exclusion rule maps the row range [start, stop) to (mask [stop - start, pool] bool or
# None, own [stop - start] pool column of each row itself or None): the pool columns a row may
# not take as neighbours.
def _removed_excluded(removed):
  """Query rows against the gallery pool: the protocol's removed pairs."""
  return lambda start, stop: (None if removed is None else removed[start:stop], None)


def _self_excluded(start, stop):
  """Gallery rows against the gallery pool: each row's own column."""
  return None, np.arange(start, stop)


def _stacked_excluded(num_query, removed):
  """Rows of the stacked [query; gallery] pool: self, plus removed pairs in both directions."""
  def excluded(start, stop):
    rows = np.arange(start, stop)
    if removed is None:
      return None, rows
    mask = np.zeros((stop - start, num_query + removed.shape[1]), bool)
    is_query = rows < num_query
    mask[is_query, num_query:] = removed[rows[is_query]]
    mask[~is_query, :num_query] = removed[:, rows[~is_query] - num_query].T
    return mask, rows
  return excluded


def _expand(rows, pool, k, alpha, excluded, chunk_rows):
  """unit(row + sum of its k best pool neighbours weighted by max(sim, 0) ** alpha), per row."""
  result = np.empty_like(rows)
  columns = np.arange(pool.shape[0], dtype=np.uint64)
  for start in range(0, rows.shape[0], chunk_rows):
    stop = min(start + chunk_rows, rows.shape[0])
    similarity = rows[start:stop] @ pool.T
    mask, own = excluded(start, stop)
    allowed = np.ones(similarity.shape, bool) if mask is None else ~mask
    if own is not None:
      allowed[np.arange(stop - start), own] = False
    neighbours = _top_k(np.where(allowed, similarity, -np.inf), k, columns)
    chosen = np.take_along_axis(similarity, neighbours, axis=1)
    # Rows with fewer than k candidates pick excluded columns last; they weigh nothing.
    is_allowed = np.take_along_axis(allowed, neighbours, axis=1)
    weights = np.where(is_allowed, np.maximum(chosen, 0.0) ** np.float32(alpha), 0.0)
    expanded = rows[start:stop] + np.einsum("rk,rkd->rd", weights.astype(np.float32),
                                            pool[neighbours])
    result[start:stop] = _unit(expanded)
  return result


def _top_k(scores, k, columns):
  """[rows, min(k, pool)] pool indices of the largest scores, ties by lower index, best first."""
  count = min(k, scores.shape[1])
  keys = float_sort_keys(-scores).astype(np.uint64)  # ascending key = descending score
  keys <<= np.uint64(32)
  keys |= columns
  if count < scores.shape[1]:
    keys = np.partition(keys, count - 1, axis=1)[:, :count]
  keys.sort(axis=1)
  return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)


def _unit(features):
  return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def _validate(query, gallery, k, alpha, pool, removed, chunk_rows):
  """Checks the arguments; returns unit float32 (query, gallery) and the removed mask."""
  query = np.asarray(query, dtype=np.float32)
  gallery = np.asarray(gallery, dtype=np.float32)
  for name, array in (("query", query), ("gallery", gallery)):
    if array.ndim != 2 or array.shape[0] == 0:
      raise ValueError(f"average_query_expansion: {name} must be [num_items >= 1, dim], got "
                       f"shape {array.shape}.")
    norms = np.linalg.norm(array, axis=1)
    if not np.all(np.isfinite(norms) & (norms > 0)):
      raise ValueError(f"average_query_expansion: {name} row "
                       f"{int(np.flatnonzero(~(np.isfinite(norms) & (norms > 0)))[0])} is zero "
                       "or not finite; check the embeddings.")
  if query.shape[1] != gallery.shape[1]:
    raise ValueError(f"average_query_expansion: feature sizes differ: query dim "
                     f"{query.shape[1]}, gallery dim {gallery.shape[1]}.")
  for name, value in (("k", k), ("chunk_rows", chunk_rows)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"average_query_expansion: {name} must be an integer >= 1, got "
                       f"{value!r}.")
  if not alpha >= 0:
    raise ValueError(f"average_query_expansion: alpha must be >= 0, got {alpha!r}.")
  if pool not in POOLS:
    raise ValueError(f"average_query_expansion: pool={pool!r}; expected one of {POOLS}.")
  if removed is not None:
    removed = np.asarray(removed)
    if removed.dtype != bool or removed.shape != (query.shape[0], gallery.shape[0]):
      raise ValueError(f"average_query_expansion: removed must be a bool [num_query, "
                       f"num_gallery] = [{query.shape[0]}, {gallery.shape[0]}] mask, got "
                       f"{removed.dtype} {removed.shape}.")
  return _unit(query), _unit(gallery), removed
