"""stage=extract: embeddings of folders of new images with a trained checkpoint, and a ranking.

Where it sits: after training, beside evaluation. Images are read from plain folders (not the
prepared dataset), resized to the extractor's size with `records.load_image` (the same Lanczos
resize the prepared splits got) and embedded by the `Extractor` (the embed function evaluation
uses), so a file's embedding equals the one evaluation would compute for the same picture. Files that cannot be decoded are reported
by name and skipped; the rest go on. Outputs in <workdir>/extract/:
  query.npy, query.json       float32 [n, D] unit embeddings; {"files": [...], "bad": [...], ...}
  gallery.npy, gallery.json   the same for extract.gallery_dir (when set)
  ranking.json, ranked.png    every query's top-k gallery files and distances, and a picture
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

from dakd_jax.data import records
from dakd_jax.evaluation import pictures

OUT_DIR = "extract"


def check_folder(folder: str) -> list[str]:
  """The candidate image files of `folder` (non-hidden files, sorted by name).

  Raises DatasetError when `folder` is not a directory or holds no file at all, so a wrong
  path is refused before any checkpoint is read.
  """
  if not os.path.isdir(folder):
    raise records.DatasetError(f"image folder not found: {folder} (set config.extract.query_dir"
                               " / gallery_dir to a folder of image files)")
  names = [name for name in sorted(os.listdir(folder))
           if not name.startswith(".") and os.path.isfile(os.path.join(folder, name))]
  if not names:
    raise records.DatasetError(f"image folder {folder} holds no files; point config.extract."
                               "query_dir / gallery_dir at a folder of image files (.jpg, .png, "
                               ".bmp)")
  return names


def read_folder(folder: str, height: int, width: int) -> tuple[np.ndarray, list, list]:
  """Decodes every (non-hidden) file of `folder`, sorted by name, resized to [height, width].

  Returns:
    (images uint8 [n, height, width, 3], names [n] of the decoded files,
     bad: [{"file": name, "error": message}] for files that could not be decoded).
  Raises:
    DatasetError: `folder` is not a directory or holds no file (`check_folder`).
  """
  names, images, bad = [], [], []
  for name in check_folder(folder):
    path = os.path.join(folder, name)
    try:
      images.append(records.load_image(path, height, width))
      names.append(name)
    except records.DatasetError as error:
      bad.append({"file": name, "error": str(error)})
  stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
  return stacked, names, bad


def _embed_side(extractor, folder, modality, out_dir, side):
  height, width = extractor.image_size
  images, names, bad = read_folder(folder, height, width)
  for entry in bad:
    print(f"dakd_jax: warning: skipped {os.path.join(folder, entry['file'])}: {entry['error']}",
          file=sys.stderr)
  if not names:
    raise records.DatasetError(f"no readable image in {folder} ({len(bad)} bad file(s)); "
                               "point config.extract at a folder of image files")
  embeddings = extractor(images, modality)
  np.save(os.path.join(out_dir, f"{side}.npy"), embeddings)
  index = {"checkpoint": extractor.source, "folder": os.path.abspath(folder),
           "modality": modality, "image_size": list(extractor.image_size), "files": names,
           "bad": bad}
  with open(os.path.join(out_dir, f"{side}.json"), "w") as f:
    json.dump(index, f, indent=2)
  return embeddings, images, names


def extract_folders(extractor, out_dir: str, *, query_dir: str, query_modality: str,
                    gallery_dir: str = "", gallery_modality: str = "visible", top_k: int = 10,
                    num_pictured: int = 8) -> dict:
  """Embeds `query_dir` (and `gallery_dir`), and ranks the queries against the gallery.

  Args:
    extractor: an `Extractor` (network, weights, image size).
    out_dir: where the files listed in the module docstring are written.
    query_dir, query_modality: the query images and their modality ("visible"/"infrared").
    gallery_dir, gallery_modality: the gallery ("" = embed the queries only).
    top_k: gallery images per query in ranking.json and the picture.
    num_pictured: queries (rows) in ranked.png.
  Returns:
    {"query": [n_q, D], "query_files": [...], and with a gallery: "gallery", "gallery_files",
     "order" int [n_q, k] gallery positions, "distances" [n_q, k]}.
  Raises:
    DatasetError: a missing folder, or one without any readable image.
  """
  os.makedirs(out_dir, exist_ok=True)
  query, query_images, query_files = _embed_side(extractor, query_dir, query_modality, out_dir,
                                                 "query")
  result = {"query": query, "query_files": query_files}
  if not gallery_dir:
    return result
  gallery, gallery_images, gallery_files = _embed_side(extractor, gallery_dir, gallery_modality,
                                                       out_dir, "gallery")
  top_k = min(top_k, len(gallery_files))
  order, distances = pictures.rank(query, gallery, top_k=top_k)
  ranking = {"checkpoint": extractor.source, "distance": "1 - cosine", "top_k": top_k,
             "queries": [
                 {"query": name, "ranked": [{"file": gallery_files[g], "distance": float(d)}
                                            for g, d in zip(order[q], distances[q])]}
                 for q, name in enumerate(query_files)]}
  with open(os.path.join(out_dir, "ranking.json"), "w") as f:
    json.dump(ranking, f, indent=2)
  shown = min(num_pictured, len(query_files))
  pictures.draw_ranked_rows(
      query_images[:shown], [[gallery_images[g] for g in row] for row in order[:shown]], None,
      distances[:shown], os.path.join(out_dir, "ranked.png"), query_captions=query_files[:shown],
      title=f"{query_modality} queries | top-{top_k} {gallery_modality} gallery")
  result.update(gallery=gallery, gallery_files=gallery_files, order=order, distances=distances)
  return result
