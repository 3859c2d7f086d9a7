"""Cross-modal evaluation: embeddings of the prepared test split -> protocols -> tables.

`evaluate_embeddings` is the protocol engine (method.md 7): for every protocol it picks query and
gallery rows by file path, scores them by cosine similarity (optionally k-reciprocal re-ranked)
and computes CMC/mAP/mINP; trials of one setting are averaged. `evaluate_stage` is the
`stage=eval` entry point; `evaluate_during_training` is the loop's periodic evaluation.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import ml_collections
import numpy as np

from dakd_jax.data import prepare
from dakd_jax.data import protocols as protocols_lib
from dakd_jax.evaluation import extract
from dakd_jax.evaluation import metrics as metrics_lib

SHOTS = {"single": 1, "multi": 10}
REPORTED_RANKS = (1, 5, 10, 20)


def evaluation_protocols(config: ml_collections.ConfigDict, *,
                         during_training: bool = False) -> list[protocols_lib.Protocol]:
  """The protocols of config.eval (the lighter training-time subset when during_training)."""
  if config.data.dataset == "sysu_mm01":
    modes = config.eval.training_modes if during_training else config.eval.modes
    shots = ("single",) if during_training else config.eval.shots
    return protocols_lib.sysu_protocols(modes, [SHOTS[s] for s in shots],
                                        range(config.eval.num_trials))
  directions = ("visible_to_thermal",) if during_training else config.eval.directions
  return protocols_lib.regdb_protocols(config.data.trial, directions)


def protocol_rows(data: prepare.DataBundle,
                  protocols: Iterable[protocols_lib.Protocol]) -> dict:
  """protocol -> (query rows, gallery rows) into the prepared test split."""
  rows = {}
  for protocol in protocols:
    if protocol not in data.protocol_rows_cache:
      query, gallery = protocols_lib.query_gallery(protocol, data.root)
      data.protocol_rows_cache[protocol] = (
          np.array([data.test_index_of(r) for r in query]),
          np.array([data.test_index_of(r) for r in gallery]))
    rows[protocol] = data.protocol_rows_cache[protocol]
  return rows


def _score(query: np.ndarray, gallery: np.ndarray, rerank: bool) -> np.ndarray:
  if rerank:
    from dakd_jax.evaluation import rerank as rerank_lib  # Only when asked for.
    return rerank_lib.k_reciprocal_rerank(query, gallery)
  return -(query @ gallery.T)  # Cosine of unit vectors; lower is closer.


def evaluate_embeddings(embeddings: np.ndarray, data: prepare.DataBundle,
                        rows: dict, *, rerank: bool, max_rank: int) -> dict:
  """Metrics per setting: {'setting': {'mean': {...}, 'trials': [{...}, ...]}}.

  embeddings: [N_test, D] unit rows, aligned with the prepared test split; rows of protocols
  not in `rows`' needed set may be anything. Metrics are fractions in [0, 1].
  """
  meta = data.test_meta
  results: dict = {}
  for protocol, (query_rows, gallery_rows) in rows.items():
    distmat = _score(embeddings[query_rows], embeddings[gallery_rows], rerank)
    scores = metrics_lib.rank_metrics(
        distmat, meta["identity"][query_rows], meta["identity"][gallery_rows],
        meta["camera"][query_rows], meta["camera"][gallery_rows],
        protocol="sysu" if protocol.dataset == "sysu_mm01" else "regdb", max_rank=max_rank)
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


def format_table(results: dict, *, title: str = "") -> str:
  """A plain-text table: one row per setting, Rank-1/5/10/20, mAP, mINP in percent."""
  header = f"{'setting':<36}" + "".join(f"{'R' + str(r):>8}" for r in REPORTED_RANKS) + \
      f"{'mAP':>8}{'mINP':>8}{'trials':>8}"
  lines = [title] if title else []
  lines += [header, "-" * len(header)]
  for name, setting in results.items():
    mean = setting["mean"]
    cmc = mean["cmc"]
    ranks = "".join(f"{100 * cmc[r - 1]:8.2f}" if r <= len(cmc) else f"{'-':>8}"
                    for r in REPORTED_RANKS)
    lines.append(f"{name:<36}{ranks}{100 * mean['mAP']:8.2f}{100 * mean['mINP']:8.2f}"
                 f"{len(setting['trials']):8d}")
  return "\n".join(lines)


def embed_test_rows(config, model, variables, data, mesh, needed_rows: np.ndarray,
                    description: str = "test features") -> np.ndarray:
  """[N_test, D] embeddings, filled only at `needed_rows` (zeros elsewhere)."""
  from dakd_jax.train import centres  # The cached embed functions live there.
  embed_fn = centres.embed_function(model, use_flip=config.eval.flip)
  values = extract.extract_embeddings(
      embed_fn, variables, data.test_source, needed_rows, data.test_meta["modality"],
      batch_size=config.eval.batch_size, mesh=mesh, description=description,
      show_progress=config.log.progress)
  embeddings = np.zeros((len(data.test_meta["label"]), values.shape[1]), np.float32)
  embeddings[needed_rows] = values
  return embeddings


def needed(rows: dict) -> np.ndarray:
  """Sorted union of every protocol's query and gallery rows."""
  return np.unique(np.concatenate([np.concatenate(pair) for pair in rows.values()]))


def headline(results: dict) -> dict:
  """The first setting's mean: rank1, mAP, mINP (what checkpoints are ranked by)."""
  mean = next(iter(results.values()))["mean"]
  return {"rank1": mean["cmc"][0], "mAP": mean["mAP"], "mINP": mean["mINP"]}


def evaluate_during_training(config, data, variables, mesh, writer, step: int) -> dict:
  """Training-time evaluation (SYSU: single-shot trials of eval.training_modes; RegDB:
  visible->thermal); logs and returns the headline metrics. The best checkpoint is therefore
  chosen on the test split, as the reference does (README says so)."""
  from dakd_jax import builders
  model = builders.model_from_config(config)
  rows = protocol_rows(data, evaluation_protocols(config, during_training=True))
  embeddings = embed_test_rows(config, model, variables, data, mesh, needed(rows))
  results = evaluate_embeddings(embeddings, data, rows, rerank=False,
                                max_rank=config.eval.max_rank)
  summary = headline(results)
  writer.write_scalars(step, {f"eval_{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    print("\n" + format_table(results, title=f"[{writer.stage} step {step}] evaluation"),
          flush=True)
  return summary


def protocol_description(config: ml_collections.ConfigDict) -> dict:
  """What a report must state next to its numbers (style.md: every report names its protocol)."""
  description = {"dataset": config.data.dataset, "rerank": config.eval.rerank,
                 "flip": config.eval.flip, "embedding": "unit BNNeck feature, inference mode",
                 "similarity": "cosine"}
  if config.data.dataset == "sysu_mm01":
    description.update(modes=list(config.eval.modes), shots=list(config.eval.shots),
                       trial_seeds=list(range(config.eval.num_trials)),
                       query="all infrared test images (cameras 3, 6)")
  else:
    description.update(trial=config.data.trial, directions=list(config.eval.directions))
  return description


def load_saved_features(path: str, data: prepare.DataBundle) -> np.ndarray:
  """Embeddings from a features .npz written by a previous evaluation (checked by path)."""
  with np.load(path, allow_pickle=False) as stored:
    if "embeddings" not in stored or "paths" not in stored:
      raise ValueError(f"{path}: expected arrays 'embeddings' and 'paths' (as written by "
                       "stage=eval into <workdir>/eval/features.npz)")
    embeddings, paths = stored["embeddings"], stored["paths"]
  if paths.tolist() != data.test_meta["path"].tolist():
    raise ValueError(f"{path}: its 'paths' do not match the prepared test split of "
                     f"{data.root}; extract the features again for this dataset")
  return embeddings


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str,
                   data: prepare.DataBundle) -> dict:
  """stage=eval: every protocol of config.eval on a checkpoint (or saved features).

  Reads config.eval.features if set, else the best checkpoint of config.eval.checkpoint (default
  <workdir>/student), or the model variables file it names (`weights.save_variables` format,
  e.g. <workdir>/pretrain/backbone.npz). Prints the table and writes <workdir>/eval/results.json
  (and the test features as <workdir>/eval/features.npz for later re-evaluation); with
  config.eval.pictures also the PNGs of `viz.write_run_pictures` and <workdir>/report.md.
  """
  from dakd_jax import builders
  from dakd_jax import sharding as sharding_lib
  from dakd_jax.train import centres
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  rows = protocol_rows(data, evaluation_protocols(config))
  if config.eval.features:
    embeddings, source = load_saved_features(config.eval.features, data), config.eval.features
  else:
    mesh = sharding_lib.make_mesh()
    model = builders.model_from_config(config)
    if os.path.isfile(config.eval.checkpoint):  # A variables file, e.g. pretrain/backbone.npz.
      from dakd_jax.models import weights  # Only for this case.
      variables = weights.load_pretrained(
          builders.init_model_variables(config, model, jax.random.key(0)),
          config.eval.checkpoint, depth=config.model.depth)
      variables, source = sharding_lib.replicate(variables, mesh), config.eval.checkpoint
    else:
      variables, source = centres.restore_model_variables(
          config, model, data, config.eval.checkpoint or os.path.join(workdir, "student"), mesh,
          hint="train first (--config.stage=all) or set --config.eval.checkpoint")
    embeddings = embed_test_rows(config, model, variables, data, mesh,
                                 np.arange(len(data.test_meta["label"])))
    if jax.process_index() == 0:
      np.savez(os.path.join(out_dir, "features.npz"), embeddings=embeddings,
               paths=data.test_meta["path"])
  results = evaluate_embeddings(embeddings, data, rows, rerank=config.eval.rerank,
                                max_rank=config.eval.max_rank)
  report = {"source": source, "protocol": protocol_description(config), "results": results}
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(report, f, indent=2)
    print("\n" + format_table(results, title=f"evaluation of {source} "
                              f"(re-ranking {'on' if config.eval.rerank else 'off'})"))
    if config.eval.pictures:
      from dakd_jax import viz  # Deferred: matplotlib only when pictures are wanted.
      viz.write_run_pictures(config, workdir, data, embeddings, rows, report)
  return report
