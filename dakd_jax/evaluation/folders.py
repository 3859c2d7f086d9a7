"""stage=extract: embeddings of folders of new images with a trained checkpoint, and a ranking.

Where it sits: after training, beside evaluation. Images are read from plain folders (not the
prepared dataset), resized to the config's size with `records.load_image` (the same Lanczos
resize the prepared splits got) and embedded by the jitted embed function evaluation uses
(`centres.embed_function` through `extract.extract_embeddings`), so a file's embedding equals
the one evaluation would compute for the same picture. Files that cannot be decoded are reported
by name and skipped; the rest go on. Outputs in <workdir>/extract/:
  query.npy, query.json       float32 [n, D] unit embeddings; {"files": [...], "bad": [...], ...}
  gallery.npy, gallery.json   the same for extract.gallery_dir (when set)
  ranking.json, ranked.png    every query's top-k gallery files and distances, and a picture
"""
from __future__ import annotations

import json
import os
import sys
import types

import ml_collections
import numpy as np

from dakd_jax.data import records
from dakd_jax.evaluation import extract

OUT_DIR = "extract"


def read_folder(folder: str, height: int, width: int) -> tuple[np.ndarray, list, list]:
  """Decodes every (non-hidden) file of `folder`, sorted by name, resized to [height, width].

  Returns:
    (images uint8 [n, height, width, 3], names [n] of the decoded files,
     bad: [{"file": name, "error": message}] for files that could not be decoded).
  Raises:
    FileNotFoundError: `folder` is not a directory.
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder} (set config.extract.query_dir / "
                            "gallery_dir to a folder of image files)")
  names, images, bad = [], [], []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if name.startswith(".") or not os.path.isfile(path):
      continue
    try:
      images.append(records.load_image(path, height, width))
      names.append(name)
    except records.DatasetError as error:
      bad.append({"file": name, "error": str(error)})
  stacked = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
  return stacked, names, bad


def embed_images(config: ml_collections.ConfigDict, model, variables, images: np.ndarray,
                 modality: str, mesh) -> np.ndarray:
  """float32 [n, D] unit embeddings of uint8 [n, H, W, 3] images of one modality.

  The embed function and batching are evaluation's (config.eval.flip, config.eval.batch_size).
  """
  from dakd_jax.train import centres  # The cached embed functions live there.
  embed_fn = centres.embed_function(model, use_flip=config.eval.flip)
  source = [{"image": image} for image in images]
  codes = np.full(len(images), records.MODALITY_CODE[modality], np.int32)
  return extract.extract_embeddings(embed_fn, variables, source, np.arange(len(images)), codes,
                                    batch_size=config.eval.batch_size, mesh=mesh,
                                    description=f"extract: {modality}",
                                    show_progress=config.log.progress)


def _embed_side(config, model, variables, mesh, folder, modality, out_dir, side, where):
  images, names, bad = read_folder(folder, config.data.image_height, config.data.image_width)
  for entry in bad:
    print(f"dakd_jax: warning: skipped {os.path.join(folder, entry['file'])}: {entry['error']}",
          file=sys.stderr)
  if not names:
    raise records.DatasetError(f"no readable image in {folder} ({len(bad)} bad file(s)); "
                               "point config.extract at a folder of image files")
  embeddings = embed_images(config, model, variables, images, modality, mesh)
  np.save(os.path.join(out_dir, f"{side}.npy"), embeddings)
  index = {"checkpoint": where, "folder": os.path.abspath(folder), "modality": modality,
           "image_size": [config.data.image_height, config.data.image_width],
           "files": names, "bad": bad}
  with open(os.path.join(out_dir, f"{side}.json"), "w") as f:
    json.dump(index, f, indent=2)
  return embeddings, images, names


def extract_folders(config: ml_collections.ConfigDict, model, variables, out_dir: str, mesh,
                    *, where: str = "") -> dict:
  """Embeds config.extract.query_dir (and gallery_dir), and ranks queries against the gallery.

  Args:
    model, variables: the network and its restored (replicated) variables.
    out_dir: where the files listed in the module docstring are written.
    where: the checkpoint's description, stored in the JSON indexes.
  Returns:
    {"query": [n_q, D], "query_files": [...], and with a gallery: "gallery", "gallery_files",
     "order" int [n_q, k] gallery positions, "distances" [n_q, k]}.
  Raises:
    ConfigError: no query_dir. DatasetError: a folder without any readable image.
  """
  from dakd_jax import config as config_lib
  from dakd_jax import viz
  settings = config.extract
  if not settings.query_dir:
    raise config_lib.ConfigError("stage=extract needs config.extract.query_dir (a folder of "
                                 "images), e.g. --config.extract.query_dir=my_images/")
  os.makedirs(out_dir, exist_ok=True)
  query, query_images, query_files = _embed_side(
      config, model, variables, mesh, settings.query_dir, settings.query_modality, out_dir,
      "query", where)
  result = {"query": query, "query_files": query_files}
  if not settings.gallery_dir:
    return result
  gallery, gallery_images, gallery_files = _embed_side(
      config, model, variables, mesh, settings.gallery_dir, settings.gallery_modality, out_dir,
      "gallery", where)
  top_k = min(config.eval.visual_top_k, len(gallery_files))
  order, distances = viz.rank(query, gallery, top_k=top_k)
  ranking = {"checkpoint": where, "distance": "1 - cosine", "top_k": top_k, "queries": [
      {"query": name, "ranked": [{"file": gallery_files[g], "distance": float(d)}
                                 for g, d in zip(order[q], distances[q])]}
      for q, name in enumerate(query_files)]}
  with open(os.path.join(out_dir, "ranking.json"), "w") as f:
    json.dump(ranking, f, indent=2)
  shown = min(config.eval.num_visual_queries, len(query_files))
  viz.draw_ranked_rows(
      query_images[:shown], [[gallery_images[g] for g in row] for row in order[:shown]], None,
      distances[:shown], os.path.join(out_dir, "ranked.png"), query_captions=query_files[:shown],
      title=f"{settings.query_modality} queries | top-{top_k} {settings.gallery_modality} gallery")
  result.update(gallery=gallery, gallery_files=gallery_files, order=order, distances=distances)
  return result


def extract_stage(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """stage=extract: restores eval.checkpoint (default <workdir>/student), runs extract_folders.

  A teacher checkpoint also needs the training split's identity count, so the dataset is
  prepared for it; a student checkpoint needs no dataset.
  """
  from dakd_jax import builders
  from dakd_jax import checkpoint as checkpoint_lib
  from dakd_jax import sharding as sharding_lib
  from dakd_jax.train import centres
  source = config.eval.checkpoint or os.path.join(workdir, "student")
  hint = "train first (--config.stage=all) or set --config.eval.checkpoint"
  directory, step = centres.find_best_checkpoint(source, hint=hint)
  manager = checkpoint_lib.CheckpointManager(directory, read_only=True)
  stage = manager.read_metadata(step).get("stage", "teacher")
  manager.close()
  if stage == "teacher":
    from dakd_jax.data import prepare  # Only the teacher's memories need the class count.
    data = prepare.prepare_data(config)
  else:
    data = types.SimpleNamespace(num_classes=0)
  mesh = sharding_lib.make_mesh()
  model = builders.model_from_config(config)
  variables, where = centres.restore_model_variables(config, model, data, source, mesh,
                                                     hint=hint)
  out_dir = os.path.join(workdir, OUT_DIR)
  result = extract_folders(config, model, variables, out_dir, mesh, where=where)
  print(f"dakd_jax: embeddings of {len(result['query_files'])} query and "
        f"{len(result.get('gallery_files', []))} gallery image(s) from {where} in {out_dir}")
  return result
