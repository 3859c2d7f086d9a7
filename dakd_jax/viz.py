"""What users look at after a run: ranked-result pictures, CMC curves, training curves, a report.

Sits after evaluation in the data flow: `evaluate.evaluate_stage` hands it the test embeddings,
the protocols' query/gallery rows and the results it just wrote; `dakd_jax/evaluation/folders.py`
uses `rank` and `draw_ranked_rows` for folders of new images. Everything here runs on the host
(NumPy, PIL, matplotlib with the Agg backend) and writes files under <workdir>/eval/.

Ranked-result picture layout (PIL, exact pixels so tests can read frames back): one row per
query; the query panel, then `QUERY_GAP` extra pixels, then the top-k gallery panels. A panel is
the image scaled by `scale` inside a `BORDER`-pixel frame (query blue, true match green, false
match red), with a caption strip of `CAPTION` pixels below it. `panel_box` gives the geometry.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

QUERY_COLOUR = (40, 90, 220)
MATCH_COLOUR = (0, 170, 0)
MISMATCH_COLOUR = (220, 0, 0)
UNKNOWN_COLOUR = (128, 128, 128)  # new images: no identity known
BORDER = 4  # frame width in pixels
GAP = 6  # between panels and between rows
QUERY_GAP = 12  # extra space between the query and its ranked list
CAPTION = 14  # caption strip below each panel
MARGIN = 8
TITLE = 18  # title strip at the top
# SYSU-MM01 filter (method.md 7.2), as in metrics.rank_metrics: camera-3 queries skip camera 2.
SYSU_FILTER = (3, 2)


def rank(query: np.ndarray, gallery: np.ndarray, *, top_k: int,
         query_cams: np.ndarray | None = None, gallery_cams: np.ndarray | None = None,
         sysu_filter: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Top-k gallery positions per query by cosine distance 1 - q.g (ties: lower index first).

  Args:
    query: float [Q, D] unit embeddings; gallery: float [G, D] unit embeddings.
    top_k: list length (>= 1); shorter galleries are padded.
    query_cams, gallery_cams: int [Q] / [G] cameras, needed when sysu_filter.
    sysu_filter: drop gallery camera 2 for camera-3 queries (the SYSU-MM01 protocol filter).
  Returns:
    (order int64 [Q, top_k] gallery positions, -1 where padded;
     distance float32 [Q, top_k], inf where padded).
  """
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  distance = 1.0 - np.asarray(query, np.float64) @ np.asarray(gallery, np.float64).T
  if sysu_filter:
    removed = ((np.asarray(query_cams) == SYSU_FILTER[0])[:, None]
               & (np.asarray(gallery_cams) == SYSU_FILTER[1])[None, :])
    distance = np.where(removed, np.inf, distance)
  order = np.argsort(distance, axis=1, kind="stable")[:, :top_k]
  values = np.take_along_axis(distance, order, axis=1)
  order = np.where(np.isfinite(values), order, -1)
  pad = top_k - order.shape[1]
  if pad > 0:
    order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    values = np.pad(values, ((0, 0), (0, pad)), constant_values=np.inf)
  return order.astype(np.int64), values.astype(np.float32)


def panel_box(row: int, column: int, image_hw: tuple[int, int], scale: int) -> tuple:
  """(left, top, right, bottom) of a panel's frame (right/bottom exclusive); column 0 = query."""
  panel_h, panel_w = image_hw[0] * scale + 2 * BORDER, image_hw[1] * scale + 2 * BORDER
  left = MARGIN + column * (panel_w + GAP) + (QUERY_GAP if column > 0 else 0)
  top = MARGIN + TITLE + row * (panel_h + CAPTION + GAP)
  return left, top, left + panel_w, top + panel_h


def draw_ranked_rows(query_images: Sequence[np.ndarray], ranked_images: Sequence[Sequence],
                     matches: np.ndarray | None, distances: np.ndarray, path: str, *,
                     query_captions: Sequence[str] | None = None, title: str = "",
                     scale: int = 2) -> str:
  """Draws the ranked-result picture (layout in the module docstring) and saves it as PNG.

  Args:
    query_images: Q uint8 [H, W, 3] images (all the same size).
    ranked_images: Q lists of k uint8 [h, w, 3] images (resized to [H, W]) or None (padding:
      empty panel, no frame).
    matches: bool [Q, k]: green frame where True, red where False; None: grey frames
      (identities unknown, e.g. folders of new images).
    distances: float [Q, k], printed as '#rank d=distance'.
  Returns: `path`.
  """
  height, width = np.asarray(query_images[0]).shape[:2]
  num_rows, top_k = np.asarray(distances).reshape(len(query_images), -1).shape
  right, bottom = panel_box(num_rows - 1, top_k, (height, width), scale)[2:]
  canvas = Image.new("RGB", (right + MARGIN, bottom + CAPTION + MARGIN), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default()
  draw.text((MARGIN, 2), title, fill=(0, 0, 0), font=font)
  for row in range(num_rows):
    caption = query_captions[row] if query_captions else "query"
    _panel(canvas, draw, font, query_images[row], panel_box(row, 0, (height, width), scale),
           QUERY_COLOUR, caption, scale)
    for column in range(top_k):
      image = ranked_images[row][column]
      if image is None:
        continue
      colour = (UNKNOWN_COLOUR if matches is None
                else MATCH_COLOUR if matches[row][column] else MISMATCH_COLOUR)
      _panel(canvas, draw, font, image, panel_box(row, column + 1, (height, width), scale),
             colour, f"#{column + 1} d={distances[row][column]:.3f}", scale)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  canvas.save(path, format="PNG")
  return path


def _panel(canvas, draw, font, image, box, colour, caption, scale):
  left, top, right, bottom = box
  draw.rectangle((left, top, right - 1, bottom - 1), fill=colour)
  size = (right - left - 2 * BORDER, bottom - top - 2 * BORDER)
  tile = Image.fromarray(np.asarray(image, np.uint8)).resize(size, Image.NEAREST)
  canvas.paste(tile, (left + BORDER, top + BORDER))
  draw.text((left, bottom + 1), caption, fill=(0, 0, 0), font=font)


def pick_queries(num_available: int, count: int, seed: int) -> np.ndarray:
  """`count` distinct positions in 0..num_available-1 (all if fewer), seeded, ascending."""
  count = min(count, num_available)
  return np.sort(np.random.default_rng(seed).choice(num_available, count, replace=False))


def ranked_picture(source, meta: dict, embeddings: np.ndarray, query_rows: np.ndarray,
                   gallery_rows: np.ndarray, path: str, *, sysu: bool, top_k: int = 10,
                   num_queries: int = 8, queries: Sequence[int] | None = None, seed: int = 0,
                   title: str = "") -> dict:
  """Ranked-result picture of one protocol (e.g. SYSU infrared -> visible, trial 0).

  Args:
    source: the prepared test split (`source[i]['image']` uint8 [H, W, 3]).
    meta: its metadata ('identity', 'camera' int arrays [N]).
    embeddings: float [N, D] unit embeddings aligned with `source`.
    query_rows, gallery_rows: int rows of the protocol (evaluate.protocol_rows).
    sysu: apply the SYSU-MM01 camera filter.
    queries: positions in query_rows to show; None = `num_queries` random ones (seeded).
  Returns:
    {'path', 'queries' [q] test rows, 'gallery' [q, k] test rows (-1 pad), 'matches' bool
     [q, k], 'distances' [q, k]}.
  """
  positions = (np.asarray(queries, np.int64) if queries is not None
               else pick_queries(len(query_rows), num_queries, seed))
  chosen = np.asarray(query_rows)[positions]
  order, distances = rank(embeddings[chosen], embeddings[gallery_rows], top_k=top_k,
                          query_cams=meta["camera"][chosen],
                          gallery_cams=meta["camera"][gallery_rows], sysu_filter=sysu)
  ranked = np.where(order >= 0, np.asarray(gallery_rows)[np.maximum(order, 0)], -1)
  identity = np.asarray(meta["identity"])
  matches = (ranked >= 0) & (identity[np.maximum(ranked, 0)] == identity[chosen][:, None])
  draw_ranked_rows(
      [source[int(r)]["image"] for r in chosen],
      [[source[int(g)]["image"] if g >= 0 else None for g in row] for row in ranked],
      matches, distances, path, title=title,
      query_captions=[f"id {identity[r]} cam {meta['camera'][r]}" for r in chosen])
  return {"path": path, "queries": chosen, "gallery": ranked, "matches": matches,
          "distances": distances}


def _figure(rows: int = 1, columns: int = 1, size=(6.0, 4.0)):
  import matplotlib  # Deferred: only when a plot is drawn; Agg needs no display.
  matplotlib.use("Agg")
  from matplotlib import pyplot
  figure, axes = pyplot.subplots(rows, columns, figsize=size, dpi=100, squeeze=False)
  return pyplot, figure, axes


def cmc_plot(results: dict, path: str, *, title: str = "CMC") -> str:
  """CMC curves (rank 1..len) of every setting: mean over trials, min-max band shaded.

  Args: results: results.json's 'results' ({setting: {'mean': {'cmc'}, 'trials': [...]}}).
  Returns: `path`, a 600x400 PNG.
  """
  pyplot, figure, axes = _figure()
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
  axis.legend(fontsize=7, loc="lower right")
  figure.tight_layout()
  figure.savefig(path)
  pyplot.close(figure)
  return path


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl file ([] if it does not exist)."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def training_curves_plot(stage_logs: dict, path: str) -> str | None:
  """Loss terms and eval rank-1/mAP against the step, one row of two plots per stage.

  Args: stage_logs: {stage: records of its metrics.jsonl}; stages without records are skipped.
  Returns: `path`, or None when there is nothing to plot.
  """
  stages = {name: records for name, records in stage_logs.items() if records}
  if not stages:
    return None
  pyplot, figure, axes = _figure(len(stages), 2, size=(11.0, 3.5 * len(stages)))
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
    eval_axis.set(title=f"{name}: evaluation (%)", xlabel="step")
    if eval_axis.get_lines():
      eval_axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path)
  pyplot.close(figure)
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


def write_report(workdir: str, config: dict, report: dict, pictures: dict) -> str:
  """Writes <workdir>/report.md: config summary, checkpoint, protocol, metrics table, pictures.

  Args:
    config: the resolved config as a plain dict (config.json).
    report: the results.json dict ({'source', 'protocol', 'results'}).
    pictures: {caption: PNG path}; linked relative to the workdir, in this order.
  Returns: the report's path.
  """
  from dakd_jax.evaluation import evaluate  # Deferred: evaluate imports this module lazily.
  lines = ["# DAKD run report", "", f"Workdir: `{os.path.abspath(workdir)}`", "", "## Config", "",
           "| field | value |", "|---|---|"]
  lines += [f"| `{field}` | `{_dotted(config, field)}` |" for field in REPORT_CONFIG_FIELDS]
  lines += ["", "Full resolved config: `config.json`.", "", "## Checkpoint", "",
            f"`{report['source']}`", "", "## Protocol", ""]
  lines += [f"- {key}: {value}" for key, value in report["protocol"].items()]
  lines += ["", "## Metrics", "", "Percent, mean over trials.", "", "```",
            evaluate.format_table(report["results"]), "```", "", "## Pictures", ""]
  for caption, path in pictures.items():
    relative = os.path.relpath(path, workdir).replace(os.sep, "/")
    lines += [f"### {caption}", "", f"![{caption}]({relative})", ""]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def write_run_pictures(config, workdir: str, data, embeddings: np.ndarray, rows: dict,
                       report: dict) -> dict:
  """stage=eval's pictures and report (process 0): CMC plot, training curves, one ranked-result
  picture per setting (its first trial), then report.md. Returns {caption: path}."""
  out_dir = os.path.join(workdir, "eval")
  pictures = {"CMC curves": cmc_plot(report["results"], os.path.join(out_dir, "cmc.png"))}
  logs = {stage: read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
          for stage in ("teacher", "student")}
  curves = training_curves_plot(logs, os.path.join(out_dir, "training_curves.png"))
  if curves:
    pictures["Training curves"] = curves
  first_trials = {}
  for protocol, pair in rows.items():
    first_trials.setdefault(protocol.setting, (protocol, pair))
  for setting, (protocol, (query_rows, gallery_rows)) in first_trials.items():
    name = setting.replace("/", "_")
    caption = f"Ranked results: {protocol.name}"
    pictures[caption] = ranked_picture(
        data.test_source, data.test_meta, embeddings, query_rows, gallery_rows,
        os.path.join(out_dir, f"ranked_{name}.png"), sysu=protocol.dataset == "sysu_mm01",
        top_k=config.eval.visual_top_k, num_queries=config.eval.num_visual_queries,
        seed=config.seed, title=f"{protocol.name}: query | top-{config.eval.visual_top_k} "
        "(green = same identity, red = other)")["path"]
  write_report(workdir, config.to_dict(), report, pictures)
  print(f"dakd_jax: pictures and report in {out_dir} and {os.path.join(workdir, 'report.md')}")
  return pictures
