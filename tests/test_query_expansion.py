"""Tests for dakd_jax.evaluation.query_expansion.average_query_expansion.

`slow_expansion` re-states the definition item by item: candidates sorted by (-similarity,
index) in Python, self and removed pairs skipped, weights max(s, 0) ** alpha, float64.
"""
import numpy as np
import pytest

from dakd_jax.evaluation.query_expansion import average_query_expansion


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def slow_expansion(query, gallery, k, alpha, expand_gallery, pool, removed):
  query, gallery = unit(np.float64(query)), unit(np.float64(gallery))
  num_query = len(query)
  items = np.concatenate([query, gallery])
  if removed is None:
    removed = np.zeros((num_query, len(gallery)), bool)

  def forbidden(row, column):
    """row, column: indices into the stacked [query; gallery] items."""
    if row == column:
      return True
    if row < num_query <= column:
      return removed[row, column - num_query]
    if column < num_query <= row:
      return removed[column, row - num_query]
    return False

  def expand(row, candidates):
    ranked = sorted((-float(items[row] @ items[c]), c) for c in candidates
                    if not forbidden(row, c))
    total = items[row].copy()
    for negative_similarity, c in ranked[:k]:
      total += max(-negative_similarity, 0.0) ** alpha * items[c]
    return total / np.linalg.norm(total)

  gallery_columns = range(num_query, len(items))
  query_pool = gallery_columns if pool == "gallery" else range(len(items))
  new_query = np.array([expand(q, query_pool) for q in range(num_query)])
  if not expand_gallery:
    return new_query, gallery
  gallery_pool = gallery_columns if pool == "gallery" else range(len(items))
  return new_query, np.array([expand(g, gallery_pool) for g in gallery_columns])


def clustered(seed, num_query=13, num_gallery=21, dim=6, num_identities=4):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_identities, dim))
  query = centres[rng.integers(0, num_identities, num_query)] + 0.6 * rng.normal(
      size=(num_query, dim))
  gallery = centres[rng.integers(0, num_identities, num_gallery)] + 0.6 * rng.normal(
      size=(num_gallery, dim))
  return unit(query).astype(np.float32), unit(gallery).astype(np.float32)


@pytest.mark.parametrize("pool", ["gallery", "all"])
@pytest.mark.parametrize("expand_gallery", [False, True])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (4, 3.0), (5, 0.0), (30, 1.5)])
def test_matches_slow_reference(pool, expand_gallery, k, alpha):
  query, gallery = clustered(k)
  removed = np.random.default_rng(k + 100).random((len(query), len(gallery))) < 0.3
  for mask in (None, removed):
    got = average_query_expansion(query, gallery, k=k, alpha=alpha, pool=pool,
                                  expand_gallery=expand_gallery, removed=mask, chunk_rows=4)
    expected = slow_expansion(query, gallery, k, alpha, expand_gallery, pool, mask)
    for g, e in zip(got, expected):
      assert g.dtype == np.float32
      np.testing.assert_allclose(g, e, atol=2e-6)


def test_ties_take_the_lower_index_and_removed_pairs_are_skipped():
  # Gallery 0 and 2 have the same similarity to the query (cos 45 degrees) but differ.
  query = np.array([[1.0, 0.0, 0.0]], np.float32)
  gallery = unit(np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])).astype(
      np.float32)
  new_query, _ = average_query_expansion(query, gallery, k=1, alpha=1.0)
  # By hand: q + cos45 * g0 = (1 + 0.5, 0.5, 0), normalised; g2 would give (1.5, 0, 0.5).
  np.testing.assert_allclose(new_query[0], unit(np.array([[1.5, 0.5, 0.0]]))[0], atol=1e-6)
  removed = np.array([[True, False, False]])
  new_query, _ = average_query_expansion(query, gallery, k=1, alpha=1.0, removed=removed)
  np.testing.assert_allclose(new_query[0], unit(np.array([[1.5, 0.0, 0.5]]))[0], atol=1e-6)
  # Removing both leaves gallery 1 (similarity 0): weight 0 ** 1 = 0, the query is unchanged.
  removed = np.array([[True, False, True]])
  new_query, _ = average_query_expansion(query, gallery, k=1, alpha=1.0, removed=removed)
  np.testing.assert_allclose(new_query[0], query[0], atol=1e-7)
  # alpha = 0 is the plain average: q + g0 + g1 + g2 with k = 3.
  new_query, _ = average_query_expansion(query, gallery, k=3, alpha=0.0)
  np.testing.assert_allclose(new_query[0], unit(query + gallery.sum(0, keepdims=True))[0],
                             atol=1e-6)


def test_every_candidate_removed_leaves_the_query_unchanged():
  query, gallery = clustered(3)
  removed = np.zeros((len(query), len(gallery)), bool)
  removed[2] = True
  new_query, new_gallery = average_query_expansion(query, gallery, k=3, removed=removed)
  np.testing.assert_allclose(new_query[2], query[2], atol=1e-6)
  assert not np.allclose(new_query[0], query[0], atol=1e-3)  # others are expanded
  np.testing.assert_allclose(new_gallery, gallery, atol=1e-7)  # only re-normalised


def test_gallery_permutation_only_permutes_the_expanded_gallery():
  query, gallery = clustered(5)
  perm = np.random.default_rng(0).permutation(len(gallery))
  q1, g1 = average_query_expansion(query, gallery, k=3, expand_gallery=True)
  q2, g2 = average_query_expansion(query, gallery[perm], k=3, expand_gallery=True)
  np.testing.assert_allclose(q1, q2, atol=1e-6)
  np.testing.assert_allclose(g1[perm], g2, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"alpha": -1.0}, "alpha must be >= 0"),
    ({"pool": "queries"}, "pool='queries'"),
    ({"removed": np.zeros((2, 2), bool)}, "removed must be a bool"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
  query, gallery = clustered(1)
  with pytest.raises(ValueError, match=message):
    average_query_expansion(query, gallery, **kwargs)
  with pytest.raises(ValueError, match="row 1 is zero"):
    average_query_expansion(np.array([[1.0, 0.0], [0.0, 0.0]]), np.eye(2))
