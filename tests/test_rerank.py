"""Tests for dakd_jax.evaluation.rerank.k_reciprocal_rerank (method.md 7.1).

`classic_rerank` re-states the classic k-reciprocal re-ranking loop by loop (per item, per
candidate, per query and non-zero column), in float32 with a stable argsort for the
neighbour lists: the tie rule the vectorised version documents.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from dakd_jax.evaluation import k_reciprocal_rerank


def classic_rerank(query, gallery, k1, k2, lambda_value):
  """Returns (re-ranked [num_query, num_gallery] distances, number of accepted expansions)."""
  features = np.concatenate([query, gallery]).astype(np.float32)
  query_num, all_num = len(query), len(features)
  squares = np.square(features).sum(axis=1)
  original_dist = (squares[:, None] + squares[None, :]) - 2 * (features @ features.T)
  original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
  initial_rank = np.argsort(original_dist, axis=1, kind="stable")
  V = np.zeros_like(original_dist, dtype=np.float32)
  num_expansions = 0
  for i in range(all_num):
    forward = initial_rank[i, :k1 + 1]
    backward = initial_rank[forward, :k1 + 1]
    k_reciprocal = forward[np.where(backward == i)[0]]
    expansion = k_reciprocal
    for candidate in k_reciprocal:
      half = int(np.around(k1 / 2))
      candidate_forward = initial_rank[candidate, :half + 1]
      candidate_backward = initial_rank[candidate_forward, :half + 1]
      candidate_set = candidate_forward[np.where(candidate_backward == candidate)[0]]
      if len(np.intersect1d(candidate_set, k_reciprocal)) > 2 / 3 * len(candidate_set):
        expansion = np.append(expansion, candidate_set)
        num_expansions += len(np.setdiff1d(candidate_set, k_reciprocal)) > 0
    expansion = np.unique(expansion)
    weight = np.exp(-original_dist[i, expansion])
    V[i, expansion] = weight / np.sum(weight)
  original_dist = original_dist[:query_num]
  if k2 != 1:
    V_qe = np.zeros_like(V)
    for i in range(all_num):
      V_qe[i] = np.mean(V[initial_rank[i, :k2]], axis=0)
    V = V_qe
  inverted_index = [np.where(V[:, k] != 0)[0] for k in range(all_num)]
  jaccard = np.zeros_like(original_dist)
  for i in range(query_num):
    temp_min = np.zeros(all_num, np.float32)
    for k in np.where(V[i] != 0)[0]:
      temp_min[inverted_index[k]] += np.minimum(V[i, k], V[inverted_index[k], k])
    jaccard[i] = 1 - temp_min / (2 - temp_min)
  final = jaccard * (1 - lambda_value) + original_dist * lambda_value
  return final[:, query_num:], num_expansions


def clustered_features(seed, num_query=24, num_gallery=48, num_identities=8, dim=16,
                       duplicates=False):
  """Unit features around identity centres (rich k-reciprocal sets); optional exact copies."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_identities, dim))
  query = centres[rng.integers(0, num_identities, num_query)] + 0.7 * rng.normal(
      size=(num_query, dim))
  gallery = centres[rng.integers(0, num_identities, num_gallery)] + 0.7 * rng.normal(
      size=(num_gallery, dim))
  if duplicates:
    gallery[:num_gallery // 4] = gallery[num_gallery // 4:num_gallery // 2]  # tied distances
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  return query.astype(np.float32), gallery.astype(np.float32)


@pytest.mark.parametrize("k1,k2,lambda_value,duplicates", [
    (20, 6, 0.3, False), (20, 6, 0.3, True), (6, 3, 0.5, False), (4, 1, 0.2, True)])
def test_matches_classic_algorithm(k1, k2, lambda_value, duplicates):
  query, gallery = clustered_features(k1 + k2, duplicates=duplicates)
  expected, num_expansions = classic_rerank(query, gallery, k1, k2, lambda_value)
  if k1 == 20:
    assert num_expansions > 0  # the expansion step is exercised
  result = k_reciprocal_rerank(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value)
  assert result.shape == expected.shape and result.dtype == np.float32
  np.testing.assert_allclose(result, expected, rtol=0, atol=2e-6)
  # A tiny memory budget (one query / item per block) gives the same numbers.
  blocked = k_reciprocal_rerank(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value,
                                memory_budget_bytes=1)
  np.testing.assert_allclose(blocked, result, rtol=0, atol=1e-7)


def test_lambda_one_is_the_normalised_distance():
  # d[i, j] = |q_i - g_j|^2 / max over all items m of |x_m - q_i|^2, worked out in float64.
  query, gallery = clustered_features(11)
  stacked = np.concatenate([query, gallery]).astype(np.float64)
  to_query = ((query[:, None, :].astype(np.float64) - stacked[None]) ** 2).sum(-1)
  expected = (((query[:, None, :] - gallery[None, :, :]).astype(np.float64) ** 2).sum(-1)
              / to_query.max(axis=1, keepdims=True))
  result = k_reciprocal_rerank(query, gallery, lambda_value=1.0)
  np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5)


def test_jaccard_part_is_symmetric_in_query_and_gallery():
  # With lambda = 0 only the Jaccard distance is left, and it is symmetric in (i, j).
  query, gallery = clustered_features(12, num_query=30, num_gallery=30)
  forward = k_reciprocal_rerank(query, gallery, lambda_value=0.0)
  backward = k_reciprocal_rerank(gallery, query, lambda_value=0.0)
  np.testing.assert_allclose(forward, backward.T, rtol=0, atol=1e-6)
  assert np.all((forward >= 0) & (forward <= 1))


def test_gallery_permutation_permutes_columns():
  query, gallery = clustered_features(13)
  perm = np.random.default_rng(0).permutation(len(gallery))
  result = k_reciprocal_rerank(query, gallery)
  np.testing.assert_allclose(k_reciprocal_rerank(query, gallery[perm]), result[:, perm],
                             rtol=0, atol=1e-6)


def test_jax_inputs_match_numpy():
  query, gallery = clustered_features(14)
  np.testing.assert_array_equal(
      k_reciprocal_rerank(jnp.asarray(query), jnp.asarray(gallery)),
      k_reciprocal_rerank(query, gallery))


def test_bad_inputs():
  query, gallery = clustered_features(15, num_query=4, num_gallery=6)
  cases = [
      ((query[0], gallery), {}, "query_features must be"),
      ((query, gallery[:0]), {}, "gallery_features must be"),
      ((query, gallery[:, :8]), {}, "feature sizes differ"),
      ((np.full_like(query, np.nan), gallery), {}, "NaN or infinite"),
      ((query, gallery), {"k1": 0}, "k1"),
      ((query, gallery), {"k2": 1.5}, "k2"),
      ((query, gallery), {"k1": True}, "k1"),
      ((query, gallery), {"lambda_value": 1.5}, "lambda_value"),
      ((np.ones_like(query), np.ones_like(gallery)), {}, "all zero"),
  ]
  for args, kwargs, message in cases:
    with pytest.raises(ValueError, match=message):
      k_reciprocal_rerank(*args, **kwargs)
