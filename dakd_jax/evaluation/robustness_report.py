"""stage=eval with `eval.corruption`: runs the corrupted evaluations and writes what they leave.

Called by `stages.evaluate_stage` once the clean embeddings and results exist. One corrupted
evaluation (a corruption at a severity, or the benchmark's mixed draw) writes
<workdir>/eval/corrupted-<name>-s<severity>/{results.json, report.md, corruption_sheet.png}; a
sweep (`all`) writes <workdir>/eval/robustness/{results.json, robustness.md, report.md,
corruption_sheet.png, severity.png}; stages.evaluate_stage adds config.json to either. The
plain eval/results.json is never touched. Every table, results.json and report.md names the
corruption and severity. A sweep rewrites its results.json after every evaluation
('complete': false until the last), so a crash keeps what was measured.
"""
from __future__ import annotations

import os

import ml_collections

from dakd_jax import errors
from dakd_jax.evaluation import corruptions
from dakd_jax.evaluation import evaluations
from dakd_jax.evaluation import report
from dakd_jax.evaluation import robustness


def is_requested(config: ml_collections.ConfigDict) -> bool:
  """Whether config.eval asks for a corrupted evaluation."""
  return config.eval.corruption != "none"


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses, before anything is extracted, a corrupted evaluation without its extra (the
  config's own checks are `config.validate`'s)."""
  del config  # Every corrupted evaluation needs the same packages.
  corruptions.load_library()


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """<workdir>/eval/<tag>: the evaluation's tag (`evaluations.evaluation_tag`: the checkpoint
  and the scoring settings when they are not the default) ending in
  `robustness.output_folder(eval.corruption, eval.severity)`, e.g. 'corrupted-fog-s3' or
  'teacher-rerank-robustness', so corrupted evaluations of other checkpoints or settings never
  replace each other."""
  tag = evaluations.evaluation_tag(config, workdir)
  folder = robustness.output_folder(config.eval.corruption, config.eval.severity)
  return evaluations.evaluation_dir(workdir, f"{tag}-{folder}" if tag else folder)


def run(config: ml_collections.ConfigDict, workdir: str, data, evaluator, variables,
        clean_embeddings, clean_summary: dict, *, is_main: bool = True) -> dict:
  """Evaluates every (corruption, severity) the config asks for and writes the outputs.

  clean_summary: the summary stage=eval would write for the clean images (source, protocol,
  results, provenance, ...). Returns the corrupted summary (a single evaluation's or the
  sweep's), as written to its results.json.
  """
  corruption, severity = config.eval.corruption, config.eval.severity
  out_dir = output_dir(config, workdir)
  listed = robustness.cells(corruption, severity)
  labelled = {**clean_summary, "corruption": robustness.describe(corruption, severity,
                                                                 config.seed),
              "clean_results": clean_summary["results"]}
  swept = {key: value for key, value in labelled.items() if key != "results"}
  evaluated = []
  for number, (name, level) in enumerate(listed, start=1):
    results = robustness.evaluate_corrupted(evaluator, variables, clean_embeddings, data, name,
                                            level, config.seed)
    evaluated.append({"corruption": name, "severity": level, "results": results})
    if is_main and len(listed) > 1:
      first = next(iter(results.values()))
      print(f"dakd_jax: robustness {number}/{len(listed)}: {name} severity {level}: "
            f"R1 {100 * first['mean']['cmc'][0]:.2f} mAP {100 * first['mean']['mAP']:.2f}",
            flush=True)
      with errors.writing(f"corrupted evaluation results in {out_dir}"):
        os.makedirs(out_dir, exist_ok=True)
        report.write_results(os.path.join(out_dir, "results.json"), {
            **swept, "complete": number == len(listed), "evaluations": evaluated})
  if robustness.is_sweep(corruption, severity):
    summary = {**swept, "complete": True, "evaluations": evaluated,
               "robustness": robustness.summarize(clean_summary["results"], evaluated)}
  else:
    summary = {**labelled, "results": evaluated[0]["results"]}
  if is_main:
    with errors.writing(f"corrupted evaluation results in {out_dir}"):
      os.makedirs(out_dir, exist_ok=True)
      report.write_results(os.path.join(out_dir, "results.json"), summary)
      _print_and_write_tables(config, workdir, out_dir, data, summary)
  return summary


def _print_and_write_tables(config, workdir: str, out_dir: str, data, summary: dict) -> None:
  title = f"{report.table_title(summary)}\n{summary['corruption']['label']}"
  if "robustness" not in summary:
    print("\n" + report.format_table(summary["results"], title=title))
    paths = {}
    if config.eval.pictures:
      paths = _write_pictures(data, summary, out_dir, config.seed)
    report.write_report(workdir, config.to_dict(), summary, paths,
                        path=os.path.join(out_dir, "report.md"))
    print(f"dakd_jax: corrupted evaluation in {out_dir}")
    return
  first_setting, first = next(iter(summary["robustness"].items()))
  print("\n" + robustness.format_summary(first_setting, first, title=title))
  tables = robustness.format_markdown(summary["robustness"])
  with open(os.path.join(out_dir, "robustness.md"), "w") as f:
    f.write(f"# Robustness\n\n{title}\n\nPercent, mean over trials.\n\n{tables}")
  paths = _write_pictures(data, summary, out_dir, config.seed) if config.eval.pictures else {}
  report.write_report(workdir, config.to_dict(), summary, paths,
                      path=os.path.join(out_dir, "report.md"), extra_markdown=tables)
  print(f"dakd_jax: robustness tables in {out_dir} (robustness.md, results.json)")


def _write_pictures(data, summary: dict, out_dir: str, seed: int) -> dict:
  from dakd_jax.evaluation import robustness_pictures  # matplotlib only when drawing.
  paths = {"Every corruption at severities 1, 3, 5": robustness_pictures.write_corruption_sheet(
      data, os.path.join(out_dir, "corruption_sheet.png"), seed)}
  if "robustness" in summary:
    setting, entry = next(iter(summary["robustness"].items()))
    if entry["cells"]:
      paths[f"Rank-1 against severity ({setting})"] = robustness_pictures.write_severity_plot(
          setting, entry, os.path.join(out_dir, "severity.png"))
  return paths

