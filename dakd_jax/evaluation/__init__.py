"""Evaluation: feature extraction, k-reciprocal re-ranking, ranking metrics, protocol runs.

The array-level building blocks are exported here (NumPy only, cheap to import):
`rank_metrics` (CMC, mAP, mINP; method.md 7.4), `k_reciprocal_rerank` (method.md 7.1),
`average_query_expansion` (fast-reid's alpha-QE, off by default) and `tpr_at_fpr` (verification
TPR at fixed FPR). Pictures from arrays are in `analysis` (matplotlib) and `activation` (JAX).
"""
from dakd_jax.evaluation.metrics import rank_metrics
from dakd_jax.evaluation.query_expansion import average_query_expansion
from dakd_jax.evaluation.rerank import k_reciprocal_rerank
from dakd_jax.evaluation.verification import tpr_at_fpr

__all__ = ["rank_metrics", "k_reciprocal_rerank", "average_query_expansion", "tpr_at_fpr"]
