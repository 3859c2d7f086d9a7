"""What an evaluation leaves behind: tables, results.json, features.npz, pictures, report.md.

Last stop of evaluation in the data flow: the evaluator's results (and the embeddings it made)
come in; text for the terminal and files for the workdir go out. Every table and file names its
protocol: dataset, settings, trials, re-ranking and flip (style.md, "every evaluation report
names its protocol").
"""
from __future__ import annotations

import json
import os

import numpy as np

from dakd_jax.data import prepare
from dakd_jax.errors import DatasetError
from dakd_jax.evaluation import metrics as metrics_lib
from dakd_jax.evaluation import pictures
from dakd_jax.evaluation import plots
from dakd_jax.evaluation import verification

REPORTED_RANKS = (1, 5, 10, 20)
TABLE_WIDTH = 80  # characters: a table fits a plain terminal
_NUMBER_WIDTH = 7


def format_table(results: dict, *, title: str = "") -> str:
  """A plain-text table of at most 80 columns: one row per setting, Rank-1/5/10/20, mAP, mINP in
  percent, number of trials. A setting name too long for its column gets a line of its own."""
  columns = [f"R{r}" for r in REPORTED_RANKS] + ["mAP", "mINP", "trials"]
  name_width = TABLE_WIDTH - _NUMBER_WIDTH * len(columns)
  header = f"{'setting':<{name_width}}" + "".join(f"{c:>{_NUMBER_WIDTH}}" for c in columns)
  lines = [title] if title else []
  lines += [header, "-" * len(header)]
  for name, setting in results.items():
    mean = setting["mean"]
    cmc = mean["cmc"]
    numbers = [f"{100 * cmc[r - 1]:.2f}" if r <= len(cmc) else "-" for r in REPORTED_RANKS]
    numbers += [f"{100 * mean['mAP']:.2f}", f"{100 * mean['mINP']:.2f}",
                str(len(setting["trials"]))]
    row = "".join(f"{n:>{_NUMBER_WIDTH}}" for n in numbers)
    if len(name) > name_width - 1:
      lines += [name, " " * name_width + row]
    else:
      lines.append(f"{name:<{name_width}}{row}")
  return "\n".join(lines)


def seed_band(results_by_seed: dict) -> dict:
  """Per setting: each seed's R1, mAP, mINP and their mean and (sample) standard deviation.

  results_by_seed: {seed: results of one evaluation ({setting: {'mean': ...}})}.
  Returns {setting: {'seeds': {seed: {'R1', 'mAP', 'mINP'}}, 'mean': {...}, 'std': {...}}},
  fractions; the std of one seed is 0.
  """
  band = {}
  for seed, results in results_by_seed.items():
    for setting, values in results.items():
      mean = values["mean"]
      band.setdefault(setting, {"seeds": {}})["seeds"][seed] = {
          "R1": mean["cmc"][0], "mAP": mean["mAP"], "mINP": mean["mINP"]}
  for entry in band.values():
    numbers = {name: np.array([s[name] for s in entry["seeds"].values()])
               for name in ("R1", "mAP", "mINP")}
    entry["mean"] = {name: float(v.mean()) for name, v in numbers.items()}
    entry["std"] = {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                    for name, v in numbers.items()}
  return band


def format_seed_band(band: dict, kind: str = "seed") -> str:
  """Per setting: one line per seed (or trial: `kind`), then mean +- std (percent), at most 80
  columns."""
  lines = []
  for setting, entry in band.items():
    lines += [setting, f"  {kind:<8}{'R1':>18}{'mAP':>18}{'mINP':>18}"]
    for seed, values in entry["seeds"].items():
      lines.append(f"  {seed!s:<8}" + "".join(f"{100 * values[n]:>18.2f}"
                                               for n in ("R1", "mAP", "mINP")))
    spread = [f"{100 * entry['mean'][n]:.2f} +- {100 * entry['std'][n]:.2f}"
              for n in ("R1", "mAP", "mINP")]
    lines.append(f"  {'mean+-sd':<8}" + "".join(f"{text:>18}" for text in spread))
  count = len(next(iter(band.values()))["seeds"])
  return "\n".join([f"{kind} band over {count} {kind}s (percent, each {kind} the mean over its "
                    "gallery trials):"] + lines)


def format_verification(results: dict) -> str:
  """TPR at fixed FPR per setting (mean over trials), one line each; "" when not computed."""
  lines = []
  for name, setting in results.items():
    rates = setting["mean"].get("tpr_at_fpr")
    if rates:
      lines.append(f"{name}: " + ", ".join(f"{key} {100 * value:.2f}"
                                           for key, value in rates.items()))
  return "\n".join(["verification (percent, mean over trials):"] + lines) if lines else ""


def format_recorded(recorded: dict, results: dict) -> str:
  """The numbers an authors' checkpoint records (their own evaluation at its epoch) beside ours
  for the headline setting, so a user sees at once whether our evaluation reproduces theirs."""
  setting, values = next(iter(results.items()))
  ours = values["mean"]
  lines = [f"recorded in the file (the authors' evaluation, epoch {recorded.get('epoch', '?')}) "
           f"vs ours ({setting}):"]
  for name, theirs, mine in (("R1", (recorded.get("cmc") or [None])[0], ours["cmc"][0]),
                             ("mAP", recorded.get("mAP"), ours["mAP"]),
                             ("mINP", recorded.get("mINP"), ours["mINP"])):
    shown = "-" if theirs is None else f"{100 * theirs:.2f}"
    lines.append(f"  {name:<5} file {shown:>7}   ours {100 * mine:7.2f}")
  return "\n".join(lines)


def table_title(summary: dict) -> str:
  """The lines above a results table: what was evaluated, how its checkpoint was chosen and
  how it was scored (re-ranking, flip, query expansion: never only in the config)."""
  protocol = summary["protocol"]
  expansion = protocol.get("query_expansion") or "none"
  return (f"{protocol['dataset']} evaluation of {summary['source']} "
          f"[{summary.get('checkpoint_selection', '-')}]\nre-ranking "
          f"{'on' if protocol['rerank'] else 'off'} | flip {'on' if protocol['flip'] else 'off'}"
          f" | query expansion {expansion}")


def save_features(path: str, embeddings: np.ndarray, data: prepare.DataBundle, *,
                  source: str = "") -> str:
  """Writes the test embeddings with the test split's paths (for `eval.features`), the
  dataset's fingerprint and where the embeddings came from."""
  np.savez(path, embeddings=embeddings, paths=np.asarray(data.test_meta["path"]),
           fingerprint=np.asarray(data.fingerprint), source=np.asarray(source))
  return path


def load_saved_features(path: str, data: prepare.DataBundle) -> np.ndarray:
  """Embeddings from a features .npz written by a previous evaluation (checked by path).

  Raises DatasetError naming the file when it is not such a file or belongs to other data.
  """
  try:
    with np.load(path, allow_pickle=False) as stored:
      if "embeddings" not in stored or "paths" not in stored:
        raise DatasetError(f"{path}: expected arrays 'embeddings' and 'paths' (as written by "
                           "stage=eval into <workdir>/eval/features.npz)")
      embeddings, paths = stored["embeddings"], stored["paths"]
      fingerprint = str(stored["fingerprint"]) if "fingerprint" in stored else ""
  except (OSError, ValueError) as error:
    raise DatasetError(f"{path} is not a features .npz written by stage=eval ({error})") from None
  if paths.tolist() != list(data.test_meta["path"]):
    raise DatasetError(f"{path}: its 'paths' do not match the prepared test split of "
                       f"{data.root}; extract the features again for this dataset")
  if fingerprint and data.fingerprint and fingerprint != data.fingerprint:
    print(f"dakd_jax: warning: the dataset changed since {path} was written (fingerprint "
          f"{fingerprint} then, {data.fingerprint} now): a file or a split file differs")
  return embeddings


def write_results(path: str, report: dict) -> str:
  """Writes results.json: {'source', 'protocol', 'results'} (and whatever else `report` has)."""
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return path


REPORT_CONFIG_FIELDS = ("stage", "seed", "mask_threshold", "data.dataset", "data.root",
                        "data.image_height", "data.image_width", "model.depth", "model.width",
                        "model.modality_specific_stem", "teacher.epochs", "distill.epochs",
                        "distill.ablation", "eval.rerank", "eval.flip")


def _dotted(tree: dict, field: str):
  for part in field.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return "-"
    tree = tree[part]
  return tree


def write_report(workdir: str, config: dict, report: dict, picture_paths: dict, *,
                 path: str | None = None, evaluations: list[str] | None = None,
                 extra_markdown: str = "") -> str:
  """Writes the run report (default <workdir>/report.md): config summary, checkpoint,
  protocol, metrics table, the workdir's evaluations, provenance, pictures.

  Args:
    config: the evaluating command's resolved config as a plain dict.
    report: the results.json dict ({'source', 'protocol', 'results'}; a corrupted evaluation's
      'corruption' and the 'provenance' are stated when present; 'results' may be absent).
    picture_paths: {caption: PNG path}; linked relative to the report, in this order.
    path: where the report goes (`evaluations.report_path`); its folder holds config.json.
    evaluations: markdown lines listing the workdir's evaluations (`evaluations.format_index`).
    extra_markdown: more tables, placed after the metrics.
  Returns: the report's path.
  """
  path = path or os.path.join(workdir, "report.md")
  here = os.path.dirname(path)
  config_file = os.path.relpath(
      os.path.join(workdir, "eval", "config.json") if here == workdir
      else os.path.join(here, "config.json"), here).replace(os.sep, "/")
  lines = ["# DAKD run report", "", f"Workdir: `{os.path.abspath(workdir)}`", "", "## Config", "",
           "| field | value |", "|---|---|"]
  lines += [f"| `{field}` | `{_dotted(config, field)}` |" for field in REPORT_CONFIG_FIELDS]
  lines += ["", f"Full resolved config: `{config_file}`.", "", "## Checkpoint", "",
            f"`{report['source']}`", "",
            f"Selected by: {report.get('checkpoint_selection', '-')}.", ""]
  if report.get("training_set"):
    lines += [f"Training set: {report['training_set']}.", ""]
  lines += [f"Dataset fingerprint: `{report.get('data_fingerprint', '-')}`.", "",
            "## Protocol", ""]
  lines += [f"- {key}: {value}" for key, value in report["protocol"].items()]
  if report.get("corruption"):
    lines += ["", "## Corruption", ""]
    lines += [f"- {key}: {value}" for key, value in report["corruption"].items()]
  lines += ["", "## Metrics", "", "Percent, mean over trials.", ""]
  for title, results in (("", report.get("results")), ("Clean images", report.get(
      "clean_results") if report.get("corruption") else None)):
    if results:
      lines += ([f"{title}:", ""] if title else []) + ["```", format_table(results), "```", ""]
  if extra_markdown:
    lines += [extra_markdown, ""]
  if evaluations:
    lines += ["## Evaluations in this workdir", ""] + evaluations + [""]
  if report.get("provenance"):
    lines += ["## Provenance", "", "```", json.dumps(report["provenance"], indent=2), "```", ""]
  lines += ["## Pictures", ""]
  for caption, picture in picture_paths.items():
    relative = os.path.relpath(picture, here).replace(os.sep, "/")
    lines += [f"### {caption}", "", f"![{caption}]({relative})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def write_run_pictures(workdir: str, data: prepare.DataBundle, embeddings: np.ndarray,
                       rows: dict, report: dict, *, top_k: int, num_queries: int,
                       seed: int, out_dir: str | None = None) -> dict:
  """stage=eval's pictures in `out_dir` (default <workdir>/eval): CMC plot, training curves
  (from the stages' metrics.jsonl), one ranked-result picture per setting (its first trial).
  Returns {caption: path}."""
  out_dir = out_dir or os.path.join(workdir, "eval")
  paths = {"CMC curves": plots.cmc_plot(report["results"], os.path.join(out_dir, "cmc.png"))}
  logs = {stage: plots.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
          for stage in ("pretrain", "teacher", "student")}
  curves = plots.training_curves_plot(logs, os.path.join(out_dir, "training_curves.png"))
  if curves:
    paths["Training curves"] = curves
  first_trials = {}
  for protocol, pair in rows.items():
    first_trials.setdefault(protocol.setting, (protocol, pair))
  for setting, (protocol, (query_rows, gallery_rows)) in first_trials.items():
    caption = f"Ranked results: {protocol.name}"
    parts = pictures.ranked_picture(
        data.test_source, data.test_meta, embeddings, query_rows, gallery_rows,
        os.path.join(out_dir, f"ranked_{setting.replace('/', '_')}.png"),
        rule=data.spec.camera_rule, top_k=top_k, num_queries=num_queries, seed=seed,
        title=f"{protocol.name}: query | top-{top_k} (green = same identity, red = other)"
    )["paths"]
    for number, part in enumerate(parts):
      paths[caption + (f" ({number + 1}/{len(parts)})" if len(parts) > 1 else "")] = part
  return paths


class _SplitImages:
  """A prepared split's images as a sequence: images[i] is uint8 [H, W, 3] (read on demand)."""

  def __init__(self, source):
    self._source = source

  def __getitem__(self, index):
    return self._source[int(index)]["image"]

  def __len__(self):
    return len(self._source)


def write_analysis_pictures(workdir: str, data: prepare.DataBundle, embeddings: np.ndarray,
                            rows: dict, *, method: str, seed: int, max_identities: int,
                            num_queries: int, top_k: int, model=None, variables=None,
                            out_dir: str | None = None) -> dict:
  """eval.analysis pictures in `out_dir` (default <workdir>/eval): a 2-D map of the test
  embeddings (colour = identity, marker = modality), distance histograms (same / other
  identity, within / across modalities), the ROC of the first setting's first trial and, given
  the model and its variables, activation maps of its queries and their top matches. Returns
  {caption: path}."""
  from dakd_jax.evaluation import activation  # Deferred: JAX, only for these pictures.
  from dakd_jax.evaluation import analysis
  out_dir = out_dir or os.path.join(workdir, "eval")
  meta = data.test_meta
  identity, camera = np.asarray(meta["identity"]), np.asarray(meta["camera"])
  modality = np.asarray(meta["modality"])
  paths = {
      "Embedding map": analysis.embedding_picture(
          embeddings, identity, modality, os.path.join(out_dir, "analysis_embedding_map.png"),
          method=method, seed=seed, max_identities=max_identities)["path"],
      "Distance histograms": analysis.distance_histograms(
          embeddings, identity, modality,
          os.path.join(out_dir, "analysis_distances.png"))["path"]}
  protocol, (query_rows, gallery_rows) = next(iter(rows.items()))
  rule = data.spec.camera_rule
  removed = metrics_lib.removed_pairs(rule, identity[query_rows], camera[query_rows],
                                      identity[gallery_rows], camera[gallery_rows])
  distances = -(embeddings[query_rows] @ embeddings[gallery_rows].T)
  curve = verification.roc_curve(distances, identity[query_rows], identity[gallery_rows],
                                 removed=removed)
  points = verification.tpr_at_fpr(distances, identity[query_rows], identity[gallery_rows],
                                    removed=removed)
  paths[f"ROC: {protocol.name}"] = analysis.roc_picture(
      {protocol.setting: curve}, os.path.join(out_dir, "analysis_roc.png"),
      points={protocol.setting: points}, title=f"ROC: {protocol.name}")["path"]
  if model is not None and variables is not None:
    chosen = pictures.pick_queries(len(query_rows), num_queries, seed)
    grad_cam = activation.make_grad_cam(activation.make_model_forward(model))
    paths[f"Activation maps: {protocol.name}"] = activation.activation_picture(
        grad_cam, variables, _SplitImages(data.test_source), modality, embeddings,
        np.asarray(query_rows)[chosen], gallery_rows,
        os.path.join(out_dir, "analysis_activation.png"), identities=identity,
        removed=removed[chosen], top_k=top_k,
        title=f"{protocol.name}: gradient-weighted activation of each image's score")["path"]
  return paths
