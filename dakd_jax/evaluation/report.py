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
from dakd_jax.evaluation import pictures
from dakd_jax.evaluation import plots

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


def table_title(source: str, protocol: dict) -> str:
  """The line above a results table: what was evaluated and how it was scored."""
  return (f"{protocol['dataset']} evaluation of {source} | re-ranking "
          f"{'on' if protocol['rerank'] else 'off'}, flip {'on' if protocol['flip'] else 'off'}")


def save_features(path: str, embeddings: np.ndarray, data: prepare.DataBundle) -> str:
  """Writes the test embeddings with the test split's paths (for `eval.features`)."""
  np.savez(path, embeddings=embeddings, paths=np.asarray(data.test_meta["path"]))
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
  except (OSError, ValueError) as error:
    raise DatasetError(f"{path} is not a features .npz written by stage=eval ({error})") from None
  if paths.tolist() != list(data.test_meta["path"]):
    raise DatasetError(f"{path}: its 'paths' do not match the prepared test split of "
                       f"{data.root}; extract the features again for this dataset")
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


def write_report(workdir: str, config: dict, report: dict, picture_paths: dict) -> str:
  """Writes <workdir>/report.md: config summary, checkpoint, protocol, metrics table, pictures.

  Args:
    config: the evaluating command's resolved config as a plain dict.
    report: the results.json dict ({'source', 'protocol', 'results'}).
    picture_paths: {caption: PNG path}; linked relative to the workdir, in this order.
  Returns: the report's path.
  """
  lines = ["# DAKD run report", "", f"Workdir: `{os.path.abspath(workdir)}`", "", "## Config", "",
           "| field | value |", "|---|---|"]
  lines += [f"| `{field}` | `{_dotted(config, field)}` |" for field in REPORT_CONFIG_FIELDS]
  lines += ["", "Full resolved config: `eval/config.json`.", "", "## Checkpoint", "",
            f"`{report['source']}`", "", "## Protocol", ""]
  lines += [f"- {key}: {value}" for key, value in report["protocol"].items()]
  lines += ["", "## Metrics", "", "Percent, mean over trials.", "", "```",
            format_table(report["results"]), "```", "", "## Pictures", ""]
  for caption, path in picture_paths.items():
    relative = os.path.relpath(path, workdir).replace(os.sep, "/")
    lines += [f"### {caption}", "", f"![{caption}]({relative})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def write_run_pictures(workdir: str, data: prepare.DataBundle, embeddings: np.ndarray,
                       rows: dict, report: dict, *, top_k: int, num_queries: int,
                       seed: int) -> dict:
  """stage=eval's pictures in <workdir>/eval: CMC plot, training curves (from the stages'
  metrics.jsonl), one ranked-result picture per setting (its first trial). Returns
  {caption: path}."""
  out_dir = os.path.join(workdir, "eval")
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
    paths[caption] = pictures.ranked_picture(
        data.test_source, data.test_meta, embeddings, query_rows, gallery_rows,
        os.path.join(out_dir, f"ranked_{setting.replace('/', '_')}.png"),
        rule=data.spec.metric_rule, top_k=top_k, num_queries=num_queries, seed=seed,
        title=f"{protocol.name}: query | top-{top_k} (green = same identity, red = other)"
    )["path"]
  return paths
