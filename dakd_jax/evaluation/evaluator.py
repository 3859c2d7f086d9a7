"""The evaluator: a dataset's protocols on a model, built once per stage, `run(variables)`.

Data flow: prepared test split -> the jitted embedding of the rows the protocols need -> per
protocol, cosine distances of its query and gallery rows (optionally k-reciprocal re-ranked) ->
`rank_metrics` with the dataset's camera rule -> trials of a setting averaged. The protocol rows
are looked up once, when the evaluator is built; training-time evaluation and `stage=eval` use
the same object, so they cannot disagree about what a number means.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from dakd_jax.data import prepare
from dakd_jax.data import protocols as protocols_lib
from dakd_jax.errors import ConfigError
from dakd_jax.evaluation import extract
from dakd_jax.evaluation import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How embeddings are made and scored (config `eval.*`).

  batch_size: images per extraction batch (divisible by the device count).
  use_flip: average the embeddings of each image and its mirror.
  rerank: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3; method.md 7.1).
  max_rank: length of the CMC curve.
  show_progress: progress bars while embedding.
  """
  batch_size: int = 64
  use_flip: bool = False
  rerank: bool = False
  max_rank: int = 20
  show_progress: bool = True

  def describe(self) -> dict:
    """What every results line states beside its numbers."""
    return {"rerank": self.rerank, "flip": self.use_flip}


def score_distances(query: np.ndarray, gallery: np.ndarray, rerank: bool) -> np.ndarray:
  """[Q, G] distances, lower is closer: -cosine of unit rows, or re-ranked (method.md 7.1)."""
  if rerank:
    from dakd_jax.evaluation import rerank as rerank_lib  # Only when asked for.
    return rerank_lib.k_reciprocal_rerank(query, gallery)
  return -(query @ gallery.T)


def ranks_a_gallery_can_fill(rule: str, gallery_identities: np.ndarray) -> int:
  """The longest CMC a gallery supports: distinct identities where the ranking is collapsed to
  identities (SYSU-MM01 and LLCM rules), else the number of gallery images."""
  return len(np.unique(gallery_identities)) if rule in ("sysu", "llcm") else len(
      gallery_identities)


def lookup_rows(data: prepare.DataBundle, protocols: Iterable[protocols_lib.Protocol],
                max_rank: int) -> dict:
  """{protocol: (query rows int [Q], gallery rows int [G])} in the prepared test split.

  Cheap (file lists only, no image), so stages call it at start-up to refuse early what an
  evaluation would refuse after training.
  Raises:
    DatasetError: a protocol's files are missing or not in the prepared split.
    ConfigError: `max_rank` is longer than a protocol's gallery can fill.
  """
  rows = {}
  identity = data.test_meta["identity"]
  for protocol in protocols:
    query, gallery = protocols_lib.query_gallery(protocol, data.root)
    rows[protocol] = (np.array([data.test_index_of(r) for r in query]),
                      np.array([data.test_index_of(r) for r in gallery]))
    fill = ranks_a_gallery_can_fill(data.spec.metric_rule, identity[rows[protocol][1]])
    if max_rank > fill:
      raise ConfigError(
          f"config.eval.max_rank = {max_rank} is longer than the gallery of {protocol.name} "
          f"can fill ({fill} ranks); use --config.eval.max_rank={fill} or less")
  return rows


class Evaluator:
  """A dataset's protocols on the prepared test split, with one jitted embedding.

  Build once per stage; `run(variables)` embeds the rows the protocols need and scores them.
  """

  def __init__(self, model, data: prepare.DataBundle,
               protocols: Iterable[protocols_lib.Protocol], settings: EvalSettings, mesh):
    """Looks up every protocol's query and gallery rows (reading the dataset's file lists).

    Raises:
      DatasetError: a protocol's files are missing or not in the prepared split.
      ConfigError: settings.max_rank is longer than a protocol's gallery can fill.
    """
    self.data = data
    self.settings = settings
    self.mesh = mesh
    self.protocols = tuple(protocols)
    self.rows = lookup_rows(data, self.protocols, settings.max_rank)
    self.needed_rows = np.unique(np.concatenate(
        [np.concatenate(pair) for pair in self.rows.values()]))
    self._embed_fn = extract.embed_function(model, use_flip=settings.use_flip)

  def embed(self, variables, rows: np.ndarray | None = None,
            description: str = "test features") -> np.ndarray:
    """[N_test, D] unit embeddings aligned with the test split, filled at `rows` (default: the
    rows the protocols need), zeros elsewhere. `variables` replicated on the mesh."""
    rows = self.needed_rows if rows is None else np.asarray(rows)
    values = extract.extract_embeddings(
        self._embed_fn, variables, self.data.test_source, rows,
        self.data.test_meta["modality"], batch_size=self.settings.batch_size, mesh=self.mesh,
        description=description, show_progress=self.settings.show_progress)
    embeddings = np.zeros((len(self.data.test_meta["label"]), values.shape[1]), np.float32)
    embeddings[rows] = values
    return embeddings

  def score(self, embeddings: np.ndarray, *, rerank: bool | None = None) -> dict:
    """Metrics per setting: {'setting': {'mean': {...}, 'trials': [{...}, ...]}}.

    embeddings: [N_test, D] unit rows aligned with the test split (only the protocols' rows are
    read). Metrics are fractions in [0, 1]; each trial also records its query and gallery sizes.
    """
    rerank = self.settings.rerank if rerank is None else rerank
    meta = self.data.test_meta
    results: dict = {}
    for protocol, (query_rows, gallery_rows) in self.rows.items():
      distances = score_distances(embeddings[query_rows], embeddings[gallery_rows], rerank)
      scores = metrics_lib.rank_metrics(
          distances, meta["identity"][query_rows], meta["identity"][gallery_rows],
          meta["camera"][query_rows], meta["camera"][gallery_rows],
          protocol=self.data.spec.metric_rule, max_rank=self.settings.max_rank)
      trial = {"trial": protocol.trial, "cmc": np.asarray(scores["cmc"]).tolist(),
               "mAP": float(scores["mAP"]), "mINP": float(scores["mINP"]),
               "num_query": len(query_rows), "num_gallery": len(gallery_rows)}
      results.setdefault(protocol.setting, {"trials": []})["trials"].append(trial)
    for setting in results.values():
      trials = setting["trials"]
      setting["mean"] = {
          "cmc": np.mean([t["cmc"] for t in trials], axis=0).tolist(),
          "mAP": float(np.mean([t["mAP"] for t in trials])),
          "mINP": float(np.mean([t["mINP"] for t in trials]))}
    return results

  def run(self, variables) -> dict:
    """Embeds the needed rows with `variables` and scores every protocol (see `score`)."""
    return self.score(self.embed(variables))


def headline(results: dict) -> dict:
  """The first setting's mean: rank1, mAP, mINP (what checkpoints are ranked by)."""
  mean = next(iter(results.values()))["mean"]
  return {"rank1": mean["cmc"][0], "mAP": mean["mAP"], "mINP": mean["mINP"]}
