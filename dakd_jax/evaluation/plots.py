"""Plots of a run (matplotlib, Agg): CMC curves of the settings and training curves.

After evaluation in the data flow: `report.write_run_pictures` draws them from results.json's
numbers and the stages' metrics.jsonl logs.
"""
from __future__ import annotations

import json
import os

import numpy as np


def new_figure(rows: int = 1, columns: int = 1, size=(6.0, 4.0), dpi: int = 100):
  """(figure, axes [rows, columns]) drawn by Agg (no display needed). matplotlib's object API,
  not pyplot: a notebook's backend and open figures are left as they are, and nothing needs
  closing."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # Deferred: only when drawing.
  from matplotlib.figure import Figure
  figure = Figure(figsize=size, dpi=dpi)
  FigureCanvasAgg(figure)
  return figure, figure.subplots(rows, columns, squeeze=False)


def cmc_figure(results: dict, *, title: str = "CMC"):
  """The CMC figure of `cmc_plot`, not saved: (figure, axis, legend). The legend sits
  below the curves, outside the axes (two columns; the figure grows 0.22 inch per legend row),
  so it never hides a curve."""
  legend_rows = -(-len(results) // 2)
  figure, axes = new_figure(size=(6.0, 4.0 + 0.22 * legend_rows))
  axis = axes[0, 0]
  for name, setting in results.items():
    trials = np.array([t["cmc"] for t in setting["trials"]]) * 100
    ranks = np.arange(1, trials.shape[1] + 1)
    line, = axis.plot(ranks, np.asarray(setting["mean"]["cmc"]) * 100, marker=".",
                      label=f"{name} ({len(trials)} trial{'s' if len(trials) != 1 else ''})")
    axis.fill_between(ranks, trials.min(0), trials.max(0), color=line.get_color(), alpha=0.2)
  axis.set(xlabel="rank", ylabel="matching rate (%)", title=title, ylim=(0, 101))
  axis.set_xticks(ranks[::max(1, len(ranks) // 10)])
  axis.grid(alpha=0.3)
  legend = axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2,
                       frameon=False)
  figure.tight_layout()  # Counts the legend: the axes shrink to leave it room below.
  return figure, axis, legend


def cmc_plot(results: dict, path: str, *, title: str = "CMC") -> str:
  """CMC curves (rank 1..len) of every setting: mean over trials, min-max band shaded, the
  legend below the axes (`cmc_figure`).

  Args: results: results.json's 'results' ({setting: {'mean': {'cmc'}, 'trials': [...]}}).
  Returns: `path`, a PNG 600 pixels wide, 400 + 22 per legend row (two settings a row) high.
  """
  figure, _, _ = cmc_figure(results, title=title)
  figure.savefig(path)
  return path


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file ([] if it does not exist)."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


FEW_POINTS = 3  # evaluations per stage up to which their values are written beside them


def evaluation_axis_limits(records: list[dict]) -> tuple[tuple[float, float],
                                                          tuple[float, float]]:
  """(x limits, y limits) of a stage's evaluation panel: the whole run (step 0 to the last
  logged step) and 0..100 %, so one or two evaluations sit where they belong instead of on an
  axis stretched around a single value."""
  last = max((r.get("step", 0) for r in records), default=0)
  return (0.0, max(1.0, last) * 1.05), (0.0, 100.0)


def training_curves_plot(stage_logs: dict, path: str) -> str | None:
  """Loss terms and eval rank-1/mAP against the step, one row of two plots per stage.

  Args: stage_logs: {stage: records of its metrics.jsonl}; stages without records are skipped.
  Returns: `path`, or None when there is nothing to plot.
  """
  stages = {name: records for name, records in stage_logs.items() if records}
  if not stages:
    return None
  figure, axes = new_figure(len(stages), 2, size=(11.0, 3.5 * len(stages)))
  skip = {"step", "stage", "wall_time", "grad_norm", "lr", "learning_rate"}
  for (name, records), (loss_axis, eval_axis) in zip(stages.items(), axes):
    terms = sorted({k for r in records for k in r if k not in skip and not k.startswith("eval_")
                    and isinstance(r[k], (int, float))})
    for term in terms:
      points = [(r["step"], r[term]) for r in records if term in r]
      loss_axis.plot(*zip(*points), label=term, linewidth=2 if term == "loss" else 1)
    positive = all(r[t] > 0 for r in records for t in terms if t in r)
    loss_axis.set(title=f"{name}: logged terms", xlabel="step",
                  yscale="log" if positive else "linear")
    loss_axis.legend(fontsize=6)
    for metric in ("eval_rank1", "eval_mAP"):
      points = [(r["step"], 100 * r[metric]) for r in records if metric in r]
      if points:
        eval_axis.plot(*zip(*points), marker="o", label=metric[5:])
      if len(points) <= FEW_POINTS:  # Values written out: a lone point reads badly.
        for step, value in points:
          eval_axis.annotate(f"{value:.1f}", (step, value), textcoords="offset points",
                             xytext=(-8, 6), ha="right", fontsize=7)
    xlim, ylim = evaluation_axis_limits(records)
    eval_axis.set(title=f"{name}: evaluation (%)", xlabel="step", xlim=xlim, ylim=ylim)
    if eval_axis.get_lines():
      eval_axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path)
  return path
