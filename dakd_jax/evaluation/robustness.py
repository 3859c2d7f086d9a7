"""Corrupted evaluation (`eval.corruption`, `eval.severity`): the benchmark's SYSU-MM01-C and
RegDB-C protocol on our evaluator, its tables and its output folders.

Data flow: the clean embeddings of stage=eval -> the visible test rows embedded again through a
`corruptions.CorruptedSource` (infrared rows kept) -> the evaluator's scoring, unchanged -> per
(corruption, severity) results -> the robustness summary (clean, the benchmark's mixed figure,
means per corruption, group and overall) -> tables, JSON and pictures in
<workdir>/eval/<output_folder(...)>/, never over the plain eval/results.json.
"""
from __future__ import annotations

import importlib.metadata

import numpy as np

from dakd_jax.evaluation import corruptions
from dakd_jax.modalities import VISIBLE_CODE

METRICS = ("R1", "mAP", "mINP")


def output_folder(corruption: str, severity: str) -> str:
  """The folder under <workdir>/eval of one corrupted evaluation: 'corrupted-fog-s3',
  'corrupted-mixed-sall', or 'robustness' for a sweep (several evaluations)."""
  if is_sweep(corruption, severity):
    return "robustness"
  return f"corrupted-{corruption}-s{severity}"


is_sweep = corruptions.is_sweep


def cells(corruption: str, severity: str) -> list[tuple[str, str]]:
  """(corruption, severity) of every evaluation the setting asks for, in table order; a sweep
  over every corruption ends with the benchmark's mixed evaluation at the same severity."""
  if not is_sweep(corruption, severity):
    return [(corruption, severity)]
  names = corruptions.CORRUPTIONS if corruption == corruptions.EVERY else (corruption,)
  levels = (tuple(str(s) for s in corruptions.SEVERITIES) if severity == corruptions.EVERY
            else (severity,))
  listed = [(name, level) for name in names for level in levels]
  if corruption == corruptions.EVERY:
    listed.append((corruptions.MIXED, severity))
  return listed


def label(corruption: str, severity: str) -> str:
  """Words for a table title: 'visible test images corrupted: fog, severity 3'."""
  if corruption == corruptions.MIXED:
    what = "one of the 20 corruptions drawn per image"
  elif corruption == corruptions.EVERY:
    what = "each of the 20 corruptions in turn (then one drawn per image)"
  else:
    what = corruption
  if severity != corruptions.EVERY:
    level = f"severity {severity}"
  elif corruption == corruptions.MIXED:
    level = "severity drawn per image (1-5)"
  else:
    level = "severities 1-5 in turn"
  return f"visible test images corrupted: {what}, {level}"


def describe(corruption: str, severity: str, seed: int) -> dict:
  """The corruption entry of results.json and report.md."""
  try:
    version = importlib.metadata.version(corruptions.LIBRARY)
  except importlib.metadata.PackageNotFoundError:
    version = None
  return {"corruption": corruption, "severity": severity, "label": label(corruption, severity),
          "corrupted_images": "visible test images (query or gallery, as the protocol uses "
                              "them); infrared images clean",
          "seed": seed, "per_image_seed": "sha256(seed, relative path)",
          "library": f"{corruptions.LIBRARY} {version}", "rain": "dakd_jax (benchmark's "
          "definition)"}


def corrupted_source(data, corruption: str, severity: str, seed: int):
  """The prepared test split with its visible images corrupted on read."""
  return corruptions.CorruptedSource(
      data.test_source, data.test_meta["path"], data.test_meta["modality"],
      corruption=corruption, severity=severity, seed=seed)


def evaluate_corrupted(evaluator, variables, clean_embeddings: np.ndarray, data,
                       corruption: str, severity: str, seed: int) -> dict:
  """The evaluator's results ({setting: {'mean', 'trials'}}) with the visible rows the protocols
  use embedded from corrupted images and the infrared rows taken from `clean_embeddings`
  ([N, D], aligned with the test split)."""
  modality = np.asarray(data.test_meta["modality"])
  rows = evaluator.needed_rows[modality[evaluator.needed_rows] == VISIBLE_CODE]
  embeddings = np.array(clean_embeddings, copy=True)
  corrupted = evaluator.embed(variables, rows=rows, source=corrupted_source(
      data, corruption, severity, seed), description=f"{corruption} s{severity}")
  embeddings[rows] = corrupted[rows]
  return evaluator.score(embeddings)


def headline(setting_results: dict) -> dict:
  """{'R1', 'mAP', 'mINP'} (fractions) of one setting's mean."""
  mean = setting_results["mean"]
  return {"R1": mean["cmc"][0], "mAP": mean["mAP"], "mINP": mean["mINP"]}


def _mean(rows: list[dict]) -> dict:
  return {metric: float(np.mean([row[metric] for row in rows])) for metric in METRICS}


def summarize(clean: dict, evaluated: list[dict]) -> dict:
  """Per setting: 'clean', 'mixed' (the benchmark's "Corruption Eval." figure, when evaluated),
  'cells' {corruption: {severity: metrics}}, 'corruption_mean' {corruption: metrics},
  'group_mean' {group: metrics} and 'mean' over every named (corruption, severity) cell.

  clean: the evaluator's clean results; evaluated: [{'corruption', 'severity', 'results'}].
  Metrics are {'R1', 'mAP', 'mINP'} fractions; means are plain means over cells.
  """
  summary = {}
  for setting in clean:
    entry = {"clean": headline(clean[setting]), "cells": {}}
    for cell in evaluated:
      metrics = headline(cell["results"][setting])
      if cell["corruption"] == corruptions.MIXED:
        entry["mixed"] = metrics
      else:
        entry["cells"].setdefault(cell["corruption"], {})[cell["severity"]] = metrics
    named = entry["cells"]
    entry["corruption_mean"] = {name: _mean(list(by_level.values()))
                                for name, by_level in named.items()}
    entry["group_mean"] = {
        group: _mean([m for name in members if name in named for m in named[name].values()])
        for group, members in corruptions.GROUPS.items()
        if any(name in named for name in members)}
    if named:
      entry["mean"] = _mean([m for by_level in named.values() for m in by_level.values()])
    summary[setting] = entry
  return summary


def _numbers(metrics: dict | None, names=METRICS) -> str:
  return "".join(f"{'-' if metrics is None else f'{100 * metrics[n]:.2f}':>7}" for n in names)


def format_summary(setting: str, entry: dict, *, title: str = "") -> str:
  """A plain-text table (80 columns) of one setting: per corruption its rank-1 at each severity
  evaluated and its mean R1/mAP/mINP; then groups, the overall mean, the mixed figure, clean."""
  levels = sorted({level for by_level in entry["cells"].values() for level in by_level})
  header = f"{'corruption':<24}" + "".join(f"{'R1 s' + level:>7}" for level in levels)
  header += f"{'| R1':>7}{'mAP':>7}{'mINP':>7}"
  lines = ([title] if title else []) + [
      setting, "percent; R1 sN = rank-1 at severity N; R1, mAP, mINP = mean over severities",
      header, "-" * len(header)]
  pad = " " * 7 * len(levels)
  for name, by_level in entry["cells"].items():
    ranks = "".join(f"{100 * by_level[level]['R1']:>7.2f}" if level in by_level else f"{'-':>7}"
                    for level in levels)
    lines.append(f"{name:<24}{ranks}{_numbers(entry['corruption_mean'][name])}")
  for group, metrics in entry["group_mean"].items():
    lines.append(f"{'group ' + group:<24}{pad}{_numbers(metrics)}")
  if "mean" in entry:
    lines.append(f"{'mean of all cells':<24}{pad}{_numbers(entry['mean'])}")
  if "mixed" in entry:
    lines.append(f"{'mixed (benchmark figure)':<24}{pad}{_numbers(entry['mixed'])}")
  lines.append(f"{'clean':<24}{pad}{_numbers(entry['clean'])}")
  return "\n".join(lines)


def format_markdown(summary: dict) -> str:
  """Every setting's full table in Markdown: one row per (corruption, severity) with
  R1/mAP/mINP, then the means, the mixed figure and the clean numbers."""
  lines = []
  for setting, entry in summary.items():
    lines += [f"### {setting}", "", "| corruption | severity | R1 | mAP | mINP |",
              "|---|---|---|---|---|"]
    row = "| {} | {} | {:.2f} | {:.2f} | {:.2f} |"
    for name, by_level in entry["cells"].items():
      for level, metrics in by_level.items():
        lines.append(row.format(name, level, *(100 * metrics[m] for m in METRICS)))
    for group, metrics in entry["group_mean"].items():
      lines.append(row.format(f"group {group} (mean)", "-", *(100 * metrics[m] for m in METRICS)))
    for key, name in (("mean", "all cells (mean)"), ("mixed", "mixed (benchmark figure)"),
                      ("clean", "clean")):
      if key in entry:
        lines.append(row.format(name, "-" if key != "mixed" else "per image",
                                *(100 * entry[key][m] for m in METRICS)))
    lines.append("")
  return "\n".join(lines)
