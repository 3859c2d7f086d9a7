"""Pictures of the corrupted evaluation (matplotlib, Agg): one test image under every corruption,
and rank-1 against severity per corruption group.

After `robustness_report.run` in the data flow; drawn from a prepared test image and from the
robustness summary's numbers.
"""
from __future__ import annotations

import numpy as np

from dakd_jax.evaluation import corruptions
from dakd_jax.evaluation import plots
from dakd_jax.modalities import VISIBLE_CODE

SHEET_SEVERITIES = (1, 3, 5)


def corruption_sheet(image: np.ndarray, key: str, seed: int,
                     severities=SHEET_SEVERITIES) -> dict[str, list[np.ndarray]]:
  """{corruption: [uint8 image at each severity]} of one uint8 RGB [H, W, 3] image, corrupted
  exactly as the evaluation corrupts the image with this key (relative path) and seed."""
  image_seed = corruptions.image_seed(seed, key)
  return {name: [corruptions.corrupt_image(image, name, level, image_seed)
                 for level in severities] for name in corruptions.CORRUPTIONS}


def write_corruption_sheet(data, path: str, seed: int) -> str:
  """The first visible test image, clean and under every corruption at severities 1, 3, 5:
  a grid of 20 rows (corruptions, in the benchmark's order) by 4 columns. Returns `path`."""
  modality = np.asarray(data.test_meta["modality"])
  row = int(np.flatnonzero(modality == VISIBLE_CODE)[0])
  image = np.asarray(data.test_source[row]["image"])
  key = str(data.test_meta["path"][row])
  sheet = corruption_sheet(image, key, seed)
  height, width = image.shape[:2]
  scale = 1.1 / height
  columns = 1 + len(SHEET_SEVERITIES)
  figure, axes = plots.new_figure(
      len(sheet), columns, size=(columns * width * scale + 1.4, len(sheet) * 1.25))
  for row_axes, (name, images) in zip(axes, sheet.items()):
    for axis, shown, caption in zip(row_axes, [image, *images],
                                    ["clean", *(f"severity {s}" for s in SHEET_SEVERITIES)]):
      axis.imshow(shown)
      axis.set_xticks([])
      axis.set_yticks([])
      if name == corruptions.CORRUPTIONS[0]:
        axis.set_title(caption, fontsize=7)
    row_axes[0].set_ylabel(name.replace("_", "\n"), fontsize=6, rotation=0, ha="right",
                           va="center")
  figure.suptitle(f"{key} (seed {seed})", fontsize=7)
  figure.tight_layout(rect=(0, 0, 1, 0.985))
  figure.savefig(path, dpi=160)
  return path


def write_severity_plot(setting: str, entry: dict, path: str) -> str:
  """Rank-1 (%) against severity, one panel per group (noise, blur, weather, digital), one line
  per corruption evaluated; severity 0 is the clean rank-1. `entry` is one setting of
  `robustness.summarize`. Returns `path`."""
  groups = [(group, [n for n in members if n in entry["cells"]])
            for group, members in corruptions.GROUPS.items()]
  groups = [(group, names) for group, names in groups if names]
  figure, axes = plots.new_figure(
      1, len(groups), size=(3.2 * len(groups), 3.2))
  clean = 100 * entry["clean"]["R1"]
  for axis, (group, names) in zip(axes[0], groups):
    for name in names:
      levels = sorted(entry["cells"][name], key=int)
      axis.plot([0] + [int(level) for level in levels],
                [clean] + [100 * entry["cells"][name][level]["R1"] for level in levels],
                marker=".", label=name)
    axis.set(title=group, xlabel="severity (0 = clean)", ylabel="rank-1 (%)", ylim=(0, 101))
    axis.set_xticks(range(6))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6, loc="upper right")
  figure.suptitle(f"{setting}: rank-1 against severity (visible images corrupted)", fontsize=8)
  figure.tight_layout()
  figure.savefig(path)
  return path
