"""Evaluation: feature extraction, k-reciprocal re-ranking, ranking metrics, protocol runs.

The two array-level building blocks are exported here (NumPy only, cheap to import):
`rank_metrics` (CMC, mAP, mINP; method.md 7.4) and `k_reciprocal_rerank` (method.md 7.1).
"""
from dakd_jax.evaluation.metrics import rank_metrics
from dakd_jax.evaluation.rerank import k_reciprocal_rerank

__all__ = ["rank_metrics", "k_reciprocal_rerank"]
