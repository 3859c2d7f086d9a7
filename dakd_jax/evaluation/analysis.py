"""Analysis pictures from arrays: 2-D embedding map, distance histograms, ROC curves.

Sits after feature extraction (or after loading saved `eval.features`): it needs only
embeddings, identity labels, modality codes and distances, and writes PNGs with matplotlib's
Agg backend. Activation maps, which need the model, are in `activation.py`.

Every picture function writes one PNG and returns {"path": ..., plus the drawn data}, including
the pixel position of what it drew (column, row in the saved PNG), so tests and notebooks can
read the picture back. t-SNE needs scikit-learn, which comes with the optional extra
`pip install -e '.[analysis]'`; the PCA map needs nothing extra.
"""
from __future__ import annotations

import os

import numpy as np

from dakd_jax.errors import MissingExtraError
from dakd_jax.evaluation import plots

MODALITY_NAMES = {0: "visible", 1: "infrared"}  # dakd_jax.data.records.MODALITY_CODE
# Marker per modality: filled circle and filled square (readable apart in tests by their
# corners), then more for other codes.
MODALITY_MARKERS = ("o", "s", "^", "D")
SAME_IDENTITY_COLOUR = (0, 150, 0)
DIFFERENT_IDENTITY_COLOUR = (210, 30, 30)
HISTOGRAM_ALPHA = 0.55
EMBEDDING_METHODS = ("tsne", "pca")
DPI = 100


def embed_2d(embeddings, *, method="tsne", seed=0, perplexity=30.0):
  """2-D coordinates of embeddings for a scatter plot; deterministic for a given seed.

  Args:
    embeddings: [n, dim] float embeddings (unit in this project), n >= 2.
    method: "tsne" (scikit-learn t-SNE, PCA initialisation, Euclidean distances, which on unit
      vectors order pairs as cosine does) or "pca" (first two principal axes, each axis's sign
      fixed so that its largest-magnitude loading is positive).
    seed: t-SNE random state.
    perplexity: t-SNE perplexity, lowered to (n - 1) / 3 for small n (t-SNE needs it below n).

  Returns:
    float64 [n, 2].

  Raises:
    ImportError: method "tsne" without scikit-learn (names the extra to install).
    ValueError: an unknown method or fewer than two embeddings.
  """
  embeddings = np.asarray(embeddings, np.float64)
  if method not in EMBEDDING_METHODS:
    raise ValueError(f"embed_2d: method={method!r}; expected one of {EMBEDDING_METHODS}.")
  if embeddings.ndim != 2 or embeddings.shape[0] < 2:
    raise ValueError(f"embed_2d: embeddings must be [n >= 2, dim], got {embeddings.shape}.")
  if method == "pca":
    centred = embeddings - embeddings.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    axes = axes[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])
    coordinates = centred @ (axes * signs[:, None]).T
    return np.pad(coordinates, ((0, 0), (0, 2 - coordinates.shape[1])))
  try:
    from sklearn.manifold import TSNE  # Optional extra: only t-SNE needs it.
  except ImportError:
    raise MissingExtraError("embed_2d: method='tsne' needs scikit-learn; install the analysis "
                            "extra (pip install -e '.[analysis]') or use method='pca'.") from None
  perplexity = min(float(perplexity), max(1.0, (embeddings.shape[0] - 1) / 3))
  tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
  return tsne.fit_transform(embeddings).astype(np.float64)


def embedding_picture(embeddings, identities, modalities, path, *, method="tsne", seed=0,
                      max_identities=20, perplexity=30.0, marker_size=36.0, title=""):
  """2-D map of the embeddings: colour = identity, marker = modality (circle visible, square
  infrared); a well-mixed map has both markers of one colour together.

  Args:
    embeddings: [n, dim] float; identities: [n] labels; modalities: [n] int codes.
    path: PNG to write (folders are created).
    method, seed, perplexity: as `embed_2d`, applied to the drawn rows only.
    max_identities: draw at most this many identities (a seeded random subset, so that
      colours stay distinct: the palette has 20).
    marker_size: scatter marker area in points^2.

  Returns:
    {"path", "rows" int [m] rows drawn, "coordinates" [m, 2], "identities" [m],
     "modalities" [m], "colours" uint8 [m, 3], "pixels" int [m, 2] (column, row of each
     marker centre in the PNG), "marker_width_px" float}.
  """
  identities, modalities = np.asarray(identities), np.asarray(modalities)
  chosen = np.unique(identities)
  if chosen.size > max_identities:
    chosen = np.sort(np.random.default_rng(seed).choice(chosen, max_identities, replace=False))
  rows = np.flatnonzero(np.isin(identities, chosen))
  coordinates = embed_2d(np.asarray(embeddings)[rows], method=method, seed=seed,
                         perplexity=perplexity)
  palette = _palette("tab20", chosen.size)
  colours = palette[np.searchsorted(chosen, identities[rows])]
  figure, axes = _figure(1, 1, (7.0, 6.0))
  axis = axes[0, 0]
  for number, code in enumerate(np.unique(modalities[rows])):
    drawn = modalities[rows] == code
    axis.scatter(coordinates[drawn, 0], coordinates[drawn, 1], s=marker_size,
                 c=colours[drawn] / 255.0, marker=MODALITY_MARKERS[number % 4], linewidths=0,
                 label=MODALITY_NAMES.get(int(code), f"modality {code}"))
  legend = axis.legend(loc="best", fontsize=8, title="marker = modality, colour = identity",
                       title_fontsize=8)
  for handle in legend.legend_handles:
    handle.set_color("0.3")
  axis.set(title=title or f"{method} map of {chosen.size} identities ({rows.size} images)",
           xticks=[], yticks=[])
  pixels = _save(figure, axis, coordinates, path)
  return {"path": path, "rows": rows, "coordinates": coordinates,
          "identities": identities[rows], "modalities": modalities[rows], "colours": colours,
          "pixels": pixels, "marker_width_px": float(np.sqrt(marker_size) * DPI / 72.0)}


HISTOGRAM_GROUPS = (("same modality", "same identity"), ("same modality", "different identity"),
                    ("cross modality", "same identity"), ("cross modality", "different identity"))


def distance_histograms(embeddings, identities, modalities, path, *, bins=50, title="",
                        chunk_rows=1024):
  """Histograms of cosine distances 1 - e_i.e_j over all pairs i < j, in four groups.

  Left panel: pairs of one modality; right panel: visible-infrared pairs. Green: same
  identity, red: different identity; each group is normalised to unit area (densities), so a
  small same-identity group stays visible. The gap between green and red in the right panel is
  what cross-modal retrieval needs.

  Args:
    embeddings: [n, dim] float unit embeddings; identities: [n]; modalities: [n] int codes.
    path: PNG to write.
    bins: bins over [0, 2] (the range of 1 - cosine); values outside are clipped into it.
    chunk_rows: rows of the pair matrix computed at once (memory ~ chunk_rows * n * 16 bytes).

  Returns:
    {"path", "edges" float [bins + 1], "groups" HISTOGRAM_GROUPS, "counts" int [4, bins],
     "density" float [4, bins], "mean" float [4] (NaN for an empty group), "colours" uint8
     [4, 3], "alpha", "peak_pixels" int [4, 2] (column, row at half height of each group's
     tallest bar; -1 for an empty group)}.
  """
  embeddings = np.asarray(embeddings, np.float32)
  identities, modalities = np.asarray(identities), np.asarray(modalities)
  edges = np.linspace(0.0, 2.0, bins + 1)
  counts, sums = _pair_histogram(embeddings, identities, modalities, bins, chunk_rows)
  totals = counts.sum(axis=1)
  width = edges[1] - edges[0]
  density = counts / np.maximum(totals, 1)[:, None] / width
  colours = np.array([SAME_IDENTITY_COLOUR, DIFFERENT_IDENTITY_COLOUR] * 2, np.uint8)
  figure, axes = _figure(1, 2, (11.0, 4.0))
  peak_pixels = np.full((4, 2), -1, np.int64)
  for group, (panel, identity) in enumerate(HISTOGRAM_GROUPS):
    axis = axes[0, group // 2]
    mean = sums[group] / totals[group] if totals[group] else np.nan
    axis.bar(edges[:-1], density[group], width=width, align="edge", linewidth=0,
             color=colours[group] / 255.0, alpha=HISTOGRAM_ALPHA,
             label=f"{identity}: {totals[group]} pairs, mean {mean:.3f}")
    axis.set(title=panel, xlabel="cosine distance (1 - cos)", ylabel="density", xlim=(0, 2))
    axis.legend(fontsize=8)
  figure.suptitle(title or "pairwise distances")
  figure.tight_layout()
  figure.canvas.draw()
  for group in np.flatnonzero(totals):
    axis, peak = axes[0, group // 2], int(density[group].argmax())
    centre = [[edges[peak] + width / 2, density[group, peak] / 2]]
    peak_pixels[group] = _to_pixels(figure, axis, centre)[0]
  _write(figure, path)
  return {"path": path, "edges": edges, "groups": HISTOGRAM_GROUPS, "counts": counts,
          "density": density, "mean": np.where(totals > 0, sums / np.maximum(totals, 1), np.nan),
          "colours": colours, "alpha": HISTOGRAM_ALPHA, "peak_pixels": peak_pixels}


def _pair_histogram(embeddings, identities, modalities, bins, chunk_rows):
  """(counts int [4, bins], distance sums [4]) of pairs i < j, group = 2 * cross + different."""
  num = embeddings.shape[0]
  counts = np.zeros(4 * bins, np.int64)
  sums = np.zeros(4)
  for start in range(0, num, chunk_rows):
    stop = min(start + chunk_rows, num)
    distance = 1.0 - embeddings[start:stop] @ embeddings.T
    upper = np.arange(num)[None, :] > np.arange(start, stop)[:, None]
    group = (2 * (modalities[start:stop, None] != modalities[None, :])
             + (identities[start:stop, None] != identities[None, :]))[upper]
    values = distance[upper]
    index = np.clip((values * (bins / 2.0)).astype(np.int64), 0, bins - 1)
    counts += np.bincount(group * bins + index, minlength=4 * bins)
    sums += np.bincount(group, weights=values, minlength=4)
  return counts.reshape(4, bins), sums


def roc_picture(curves, path, *, points=None, title="ROC"):
  """ROC curves (TPR against FPR, log FPR axis) with the fixed-FPR operating points marked.

  Args:
    curves: {label: `verification.roc_curve` dict}; one line per label.
    path: PNG to write.
    points: optional {label: `verification.tpr_at_fpr` dict}; its (achieved FPR, TPR) points
      are drawn as dots in the colour of the label's curve (points at FPR 0 are not drawn on
      the log axis).

  Returns:
    {"path", "colours" {label: uint8 [3]}, "point_pixels" {label: int [t, 2] (column, row;
     -1 where not drawn)}}.
  """
  figure, axes = _figure(1, 1, (6.0, 4.5))
  axis = axes[0, 0]
  palette = _palette("tab10", len(curves))
  colours = {}
  smallest = 1.0
  for number, (label, curve) in enumerate(curves.items()):
    colours[label] = palette[number % len(palette)]
    shown = curve["fpr"] > 0
    smallest = min(smallest, float(curve["fpr"][shown].min()))
    axis.plot(curve["fpr"][shown], 100 * curve["tpr"][shown], color=colours[label] / 255.0,
              label=f"{label} ({curve['num_positive']} positive, {curve['num_negative']} "
                    "negative pairs)")
  dots = {}
  for label, result in (points or {}).items():
    dots[label] = result["fpr"] > 0
    axis.scatter(result["fpr"][dots[label]], 100 * result["tpr"][dots[label]], s=40,
                 color=colours[label] / 255.0, zorder=3)
  axis.set(xscale="log", xlim=(smallest, 1.0), ylim=(0, 101), xlabel="false positive rate",
           ylabel="true positive rate (%)", title=title)
  axis.grid(alpha=0.3, which="both")
  axis.legend(fontsize=7, loc="lower right")
  figure.tight_layout()
  figure.canvas.draw()
  point_pixels = {}
  for label, result in (points or {}).items():
    pixels = np.full((len(result["fpr"]), 2), -1, np.int64)
    drawn = np.stack([result["fpr"], 100 * result["tpr"]], axis=1)[dots[label]]
    if drawn.size:
      pixels[dots[label]] = _to_pixels(figure, axis, drawn)
    point_pixels[label] = pixels
  _write(figure, path)
  return {"path": path, "colours": colours, "point_pixels": point_pixels}


def _palette(name, count):
  """uint8 [max(count, 1), 3] colours of a matplotlib qualitative colormap, cycled."""
  import matplotlib  # Deferred: pictures only.
  colours = np.asarray(matplotlib.colormaps[name].colors)[:, :3]
  if name == "tab20":  # dark/light pairs of one hue: take the 10 dark hues first
    colours = np.concatenate([colours[0::2], colours[1::2]])
  return np.round(colours[np.arange(max(count, 1)) % len(colours)] * 255).astype(np.uint8)


def _figure(rows, columns, size):
  return plots.new_figure(rows, columns, size, dpi=DPI)


def _to_pixels(figure, axis, points):
  """int [n, 2] (column, row) in the saved PNG of data points; the figure must be drawn."""
  display = axis.transData.transform(np.asarray(points, np.float64))
  height = figure.canvas.get_width_height()[1]
  return np.stack([np.floor(display[:, 0]), np.floor(height - display[:, 1])],
                  axis=1).astype(np.int64)


def _save(figure, axis, points, path):
  """tight_layout, draw, pixel positions of `points`, then write the PNG."""
  figure.tight_layout()
  figure.canvas.draw()
  pixels = _to_pixels(figure, axis, points)
  _write(figure, path)
  return pixels


def _write(figure, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=DPI)  # same dpi as drawn: pixel positions stay valid
