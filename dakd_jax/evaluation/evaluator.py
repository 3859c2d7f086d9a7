"""The evaluator: a dataset's protocols on a model, built once per stage, `run(variables)`.

Data flow: prepared test split -> the jitted embedding of the rows the protocols need -> per
protocol, its query and gallery embeddings (optionally average-query-expanded) -> distances
(cosine, optionally k-reciprocal re-ranked) -> `rank_metrics` with the dataset's camera rule
(and TPR at fixed FPR) -> trials of a setting averaged. The protocol rows are looked up once,
when the evaluator is built; training-time evaluation and `stage=eval` use the same object, so
they cannot disagree about what a number means. `Evaluator.on_validation` scores held-out
training identities instead (checkpoint selection without the test split).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from dakd_jax.data import dataset_files
from dakd_jax.data import prepare
from dakd_jax.data import protocols as protocols_lib
from dakd_jax.data.records import CameraRule
from dakd_jax.errors import ConfigError
from dakd_jax.evaluation import extract
from dakd_jax.evaluation import metrics as metrics_lib
from dakd_jax.evaluation import query_expansion
from dakd_jax.evaluation import verification
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE

VALIDATION = "validation"  # the variant naming the validation protocol


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """How embeddings are made and scored (config `eval.*`).

  batch_size: images per extraction batch (divisible by the device count).
  use_flip: average the embeddings of each image and its mirror.
  rerank: k-reciprocal re-ranking (k1 20, k2 6, lambda 0.3; method.md 7.1).
  max_rank: length of the CMC curve.
  show_progress: progress bars while embedding.
  query_expansion: average query expansion (`query_expansion.average_query_expansion`) with
    aqe_k neighbours and weight exponent aqe_alpha, before the distances.
  tpr_fprs: false-positive rates for TPR at fixed FPR (`verification.tpr_at_fpr`); () skips.
  """
  batch_size: int = 64
  use_flip: bool = False
  rerank: bool = False
  max_rank: int = 20
  show_progress: bool = True
  query_expansion: bool = False
  aqe_k: int = 5
  aqe_alpha: float = 3.0
  tpr_fprs: tuple[float, ...] = ()

  def describe(self) -> dict:
    """What every results line states beside its numbers."""
    return {"rerank": self.rerank, "flip": self.use_flip,
            "query_expansion": (f"average, k={self.aqe_k}, alpha={self.aqe_alpha}"
                                if self.query_expansion else False)}

  def short(self) -> str:
    """The same in a few words, for a table's title line."""
    expansion = f"AQE k={self.aqe_k}" if self.query_expansion else "no query expansion"
    rerank, flip = ("on" if self.rerank else "off"), ("on" if self.use_flip else "off")
    return f"re-ranking {rerank}, flip {flip}, {expansion}"


def score_distances(query: np.ndarray, gallery: np.ndarray, rerank: bool) -> np.ndarray:
  """[Q, G] distances, lower is closer: -cosine of unit rows, or re-ranked (method.md 7.1)."""
  if rerank:
    from dakd_jax.evaluation import rerank as rerank_lib  # Only when asked for.
    return rerank_lib.k_reciprocal_rerank(query, gallery)
  return -(query @ gallery.T)


def ranks_a_gallery_can_fill(rule: CameraRule, gallery_identities: np.ndarray) -> int:
  """The longest CMC a gallery supports: distinct identities where the ranking is collapsed to
  identities (SYSU-MM01 and LLCM rules), else the number of gallery images."""
  if rule.distinct_identity_cmc:
    return len(np.unique(gallery_identities))
  return len(gallery_identities)


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
  with dataset_files.listings_read_once():  # Every trial lists the same folders.
    for protocol in protocols:
      query, gallery = protocols_lib.query_gallery(protocol, data.root)
      rows[protocol] = (np.array([data.test_index_of(r) for r in query]),
                        np.array([data.test_index_of(r) for r in gallery]))
      fill = ranks_a_gallery_can_fill(data.spec.camera_rule, identity[rows[protocol][1]])
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
               protocols: Iterable[protocols_lib.Protocol], settings: EvalSettings, mesh, *,
               split: str = "test", rows: dict | None = None):
    """Looks up every protocol's query and gallery rows (reading the dataset's file lists).

    split: "test", or "val" with `rows` given ({protocol: (query rows, gallery rows)} of the
    validation split, see `on_validation`).
    Raises:
      DatasetError: a protocol's files are missing or not in the prepared split.
      ConfigError: settings.max_rank is longer than a protocol's gallery can fill.
    """
    self.data = data
    self.settings = settings
    self.mesh = mesh
    self.split = split
    self.source = data.test_source if split == "test" else data.val_source
    self.meta = data.test_meta if split == "test" else data.val_meta
    self.protocols = tuple(protocols)
    self.rows = rows if rows is not None else lookup_rows(data, self.protocols,
                                                          settings.max_rank)
    self.needed_rows = np.unique(np.concatenate(
        [np.concatenate(pair) for pair in self.rows.values()]))
    self._embed_fn = extract.embed_function(model, use_flip=settings.use_flip)

  @classmethod
  def on_validation(cls, model, data: prepare.DataBundle, settings: EvalSettings,
                    mesh) -> "Evaluator":
    """An evaluator of the held-out validation identities (data.val_*): every infrared image
    against every visible one, with the dataset's camera rule, one trial. Only for choosing a
    checkpoint: its CMC is cut to what the small gallery fills."""
    if data.val_meta is None:
      raise ConfigError("checkpoint.select=val needs the validation split; the data was "
                        "prepared without it")
    modality = np.asarray(data.val_meta["modality"])
    query, gallery = (np.flatnonzero(modality == INFRARED_CODE),
                      np.flatnonzero(modality == VISIBLE_CODE))
    protocol = protocols_lib.Protocol(data.dataset, 0, direction="infrared_to_visible",
                                      variant=VALIDATION)
    fill = ranks_a_gallery_can_fill(data.spec.camera_rule, data.val_meta["identity"][gallery])
    settings = dataclasses.replace(settings, max_rank=min(settings.max_rank, fill), tpr_fprs=())
    return cls(model, data, [protocol], settings, mesh, split="val",
               rows={protocol: (query, gallery)})

  def embed(self, variables, rows: np.ndarray | None = None,
            description: str = "test features", source=None) -> np.ndarray:
    """[N, D] unit embeddings aligned with the evaluated split, filled at `rows` (default: the
    rows the protocols need), zeros elsewhere. `variables` replicated on the mesh. `source`
    replaces the split's records (same rows), e.g. a `corruptions.CorruptedSource` of it."""
    rows = self.needed_rows if rows is None else np.asarray(rows)
    values = extract.extract_embeddings(
        self._embed_fn, variables, self.source if source is None else source, rows,
        self.meta["modality"],
        batch_size=self.settings.batch_size, mesh=self.mesh,
        description=description, show_progress=self.settings.show_progress)
    embeddings = np.zeros((len(self.meta["label"]), values.shape[1]), np.float32)
    embeddings[rows] = values
    return embeddings

  def score(self, embeddings: np.ndarray, *, rerank: bool | None = None) -> dict:
    """Metrics per setting: {'setting': {'mean': {...}, 'trials': [{...}, ...]}}.

    embeddings: [N, D] unit rows aligned with the evaluated split (only the protocols' rows are
    read). Metrics are fractions in [0, 1]; each trial also records its query and gallery sizes
    and, with settings.tpr_fprs, 'tpr_at_fpr' ({"TPR@FPR=0.0001": ...}).
    """
    rerank = self.settings.rerank if rerank is None else rerank
    results: dict = {}
    for protocol, (query_rows, gallery_rows) in self.rows.items():
      trial = self._score_protocol(embeddings, protocol, query_rows, gallery_rows, rerank)
      results.setdefault(protocol.setting, {"trials": []})["trials"].append(trial)
    for setting in results.values():
      trials = setting["trials"]
      setting["mean"] = {
          "cmc": np.mean([t["cmc"] for t in trials], axis=0).tolist(),
          "mAP": float(np.mean([t["mAP"] for t in trials])),
          "mINP": float(np.mean([t["mINP"] for t in trials]))}
      if "tpr_at_fpr" in trials[0]:
        setting["mean"]["tpr_at_fpr"] = {
            name: float(np.mean([t["tpr_at_fpr"][name] for t in trials]))
            for name in trials[0]["tpr_at_fpr"]}
    return results

  def _score_protocol(self, embeddings, protocol, query_rows, gallery_rows, rerank) -> dict:
    meta, rule = self.meta, self.data.spec.camera_rule
    identity, camera = np.asarray(meta["identity"]), np.asarray(meta["camera"])
    query, gallery = embeddings[query_rows], embeddings[gallery_rows]
    needs_mask = self.settings.query_expansion or self.settings.tpr_fprs
    removed = metrics_lib.removed_pairs(
        rule, identity[query_rows], camera[query_rows], identity[gallery_rows],
        camera[gallery_rows]) if needs_mask else None
    if self.settings.query_expansion:
      query, gallery = query_expansion.average_query_expansion(
          query, gallery, k=self.settings.aqe_k, alpha=self.settings.aqe_alpha, removed=removed)
    distances = score_distances(query, gallery, rerank)
    scores = metrics_lib.rank_metrics(
        distances, identity[query_rows], identity[gallery_rows], camera[query_rows],
        camera[gallery_rows], protocol=rule, max_rank=self.settings.max_rank)
    trial = {"trial": protocol.trial, "cmc": np.asarray(scores["cmc"]).tolist(),
             "mAP": float(scores["mAP"]), "mINP": float(scores["mINP"]),
             "num_query": len(query_rows), "num_gallery": len(gallery_rows)}
    if self.settings.tpr_fprs:
      verified = verification.tpr_at_fpr(distances, identity[query_rows],
                                         identity[gallery_rows], fprs=self.settings.tpr_fprs,
                                         removed=removed)
      trial["tpr_at_fpr"] = {name: float(value) for name, value in verified["summary"].items()}
    return trial

  def run(self, variables) -> dict:
    """Embeds the needed rows with `variables` and scores every protocol (see `score`)."""
    return self.score(self.embed(variables))


def headline(results: dict) -> dict:
  """The first setting's mean: rank1, mAP, mINP (what checkpoints are ranked by)."""
  mean = next(iter(results.values()))["mean"]
  return {"rank1": mean["cmc"][0], "mAP": mean["mAP"], "mINP": mean["mINP"]}
