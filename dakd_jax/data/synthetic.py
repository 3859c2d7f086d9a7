"""Deterministic synthetic visible-infrared re-ID datasets, written in the real on-disk layouts.

First step of the demo data flow: `ensure_synthetic` writes a SYSU-MM01-style, RegDB-style or
LLCM-style tree (method.md 6.1, 6.2; llcm.md 2) that the real readers, protocols and TFDS builders
read like the real sets. This module decides the identities, splits, cameras, file names and index
files; the persons and cameras are drawn and rendered by `synthetic_render.py`. A raw colour pixel
nearest neighbour matches within the visible modality but is near chance across modalities; grey,
contrast-normalised pixels do better across modalities but stay well below the within-modality
match (tests/test_synthetic.py).

Every camera and every (identity, camera) batch has its own NumPy Generator seeded from (seed,
dataset tag, keys): the bytes depend on the parameters (and the NumPy and Pillow versions) only,
not on the generation order. Images are saved with Pillow as JPEG (quality 90, SYSU and LLCM) or
BMP (RegDB).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import inspect
import json
import multiprocessing
import os
import shutil
import sys

import numpy as np
from PIL import Image

from dakd_jax import progress
from dakd_jax.data.synthetic_render import draw_camera, draw_person, make_rng, render

FORMAT_VERSION = 3
MARKER_NAME = "synthetic_dataset.json"
JPEG_QUALITY = 90
VISIBLE_CAMERAS = (1, 2, 4, 5)
INFRARED_CAMERAS = (3, 6)
# Every identity appears in one or both cameras of each pair, so indoor (1, 2) and all-search
# galleries and the infrared queries are never empty for a test identity.
_CAMERA_PAIRS = ((1, 2), (4, 5), (3, 6))
# LLCM (llcm.md 2): nine cameras that each record visible light by day and near-infrared at
# night; the release has no near-infrared camera 3 (its test_nir/cam3 is empty or absent).
LLCM_VISIBLE_CAMERAS = tuple(range(1, 10))
LLCM_INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
_LLCM_FOLDERS = {"vis": ("vis", "test_vis"), "nir": ("nir", "test_nir")}
_DATASET_TAG = {"sysu": 1, "regdb": 2, "llcm": 3}
# Writer keywords that change how a tree is written, not what it holds (left out of the marker).
_DISPLAY_PARAMS = ("show_progress", "workers")
# Below this many persons a tree is written in this process: starting worker processes (each
# imports NumPy and Pillow) costs more than it saves.
_PARALLEL_FROM_PERSONS = 64


def default_workers(num_persons: int) -> int:
  """Processes that write a tree of `num_persons`: every CPU for a large tree, else 1."""
  return (os.cpu_count() or 1) if num_persons >= _PARALLEL_FROM_PERSONS else 1


def _for_each_person(write_person, identities, kind: str, show_progress: bool,
                     workers: int | None) -> list:
  """[write_person(identity) for identity in identities], in that order, with progress over
  persons (a bar on a terminal, plain lines at a steady pace otherwise; none without
  show_progress). `workers` > 1 (None: `default_workers`) writes persons in that many
  processes; each person's images come from generators seeded by its own keys, so the bytes
  are the same with any number of workers."""
  identities = list(identities)
  workers = default_workers(len(identities)) if workers is None else workers
  shown = functools.partial(progress.track, total=len(identities),
                            description=f"generating synthetic {kind} persons", unit="persons",
                            enabled=show_progress)
  if workers <= 1:
    return [write_person(identity) for identity in shown(identities)]
  # spawn: the caller may hold JAX's threads, which a fork would copy half-way.
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    return list(shown(pool.map(write_person, identities, chunksize=4)))


def _check_sizes(**sizes: tuple[int, int]) -> None:
  """Raises ValueError for a size (given as (value, minimum)) that is not an int >= minimum."""
  for name, (value, minimum) in sizes.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"synthetic dataset: {name} must be an integer >= {minimum}, got "
                       f"{value!r}.")


def _prepare_root(root: str) -> None:
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(
        f"synthetic dataset: {root} exists and is not an empty folder; refusing to write into "
        "it. Choose a new folder (or delete this one if it is yours).")
  os.makedirs(root, exist_ok=True)


def _sysu_person(identity: int, *, root: str, cameras: dict, seed: int, images_per_camera: int,
                 height: int, width: int) -> None:
  """Writes one SYSU-MM01-style identity's camera folders."""
  tag = _DATASET_TAG["sysu"]
  person_rng = make_rng(seed, tag, 2, identity)
  person = draw_person(person_rng)
  present = []
  for pair in _CAMERA_PAIRS:
    present += list(pair) if person_rng.random() < 0.5 else [pair[person_rng.integers(2)]]
  for camera in sorted(present):
    images = render(person, cameras[camera], make_rng(seed, tag, 3, identity, camera),
                    images_per_camera, height, width, camera in VISIBLE_CAMERAS)
    folder = os.path.join(root, f"cam{camera}", f"{identity:04d}")
    os.makedirs(folder)
    for index, image in enumerate(images, start=1):
      Image.fromarray(image).save(os.path.join(folder, f"{index:04d}.jpg"),
                                  quality=JPEG_QUALITY)


def write_sysu_tree(root: str, *, num_train_ids: int = 36, num_val_ids: int = 4,
                    num_test_ids: int = 24, images_per_camera: int = 10, height: int = 128,
                    width: int = 64, seed: int = 0, show_progress: bool = False,
                    workers: int | None = None) -> None:
  """Writes a SYSU-MM01-style tree (method.md 6.1) into the empty or absent folder `root`.

  Layout: `cam1..cam6/<identity:04d>/<image:04d>.jpg` (visible 1, 2, 4, 5; infrared 3, 6; images
  `height` x `width` RGB, JPEG quality 90, numbered from 0001) and `exp/{train,val,test}_id.txt`
  (first line: comma-separated ids ascending). Identities are non-contiguous ints from
  1..~1.1 x total. Each identity is in one or both cameras of each pair (1, 2), (4, 5), (3, 6),
  with `images_per_camera` images per camera folder; the multi-shot protocol needs >= 10.
  `show_progress` draws a bar over persons on a terminal, `workers` sets the writing processes
  (`_for_each_person`); neither changes what is written.

  Raises ValueError for sizes below 1 (ids, images) or 16 (pixels),
  FileExistsError when `root` exists and is not an empty folder.
  """
  _check_sizes(num_train_ids=(num_train_ids, 1), num_val_ids=(num_val_ids, 1),
               num_test_ids=(num_test_ids, 1), images_per_camera=(images_per_camera, 1),
               height=(height, 16), width=(width, 16), seed=(seed, 0))
  _prepare_root(root)
  tag, total = _DATASET_TAG["sysu"], num_train_ids + num_val_ids + num_test_ids
  split_rng = make_rng(seed, tag, 0)
  ids = np.sort(split_rng.choice(np.arange(1, total + total // 10 + 2), total, replace=False))
  order = split_rng.permutation(ids)
  splits = {"train": order[:num_train_ids], "val": order[num_train_ids:total - num_test_ids],
            "test": order[total - num_test_ids:]}
  os.makedirs(os.path.join(root, "exp"))
  for name, members in splits.items():
    with open(os.path.join(root, "exp", f"{name}_id.txt"), "w", encoding="utf-8") as file:
      file.write(",".join(str(int(i)) for i in np.sort(members)) + "\n")
  cameras = {c: draw_camera(make_rng(seed, tag, 1, c), c in VISIBLE_CAMERAS)
             for c in range(1, 7)}
  # Every camera folder first: the workers write into them, and a camera that no identity
  # reached still gets its folder.
  for camera in range(1, 7):
    os.makedirs(os.path.join(root, f"cam{camera}"))
  _for_each_person(functools.partial(
      _sysu_person, root=root, cameras=cameras, seed=seed, images_per_camera=images_per_camera,
      height=height, width=width), ids.tolist(), "sysu", show_progress, workers)


def _write_regdb_idx(root: str, num_ids: int, names: dict, seed: int, num_trials: int) -> None:
  """idx/{train,test}_{visible,thermal}_{t}.txt: random half of the ids train, labels 0..C-1."""
  os.makedirs(os.path.join(root, "idx"))
  ids = np.arange(1, num_ids + 1)
  for trial in range(1, num_trials + 1):
    order = make_rng(seed, _DATASET_TAG["regdb"], 4, trial).permutation(ids)
    halves = {"train": np.sort(order[:num_ids // 2]), "test": np.sort(order[num_ids // 2:])}
    for split, members in halves.items():
      for modality, folder in (("visible", "Visible"), ("thermal", "Thermal")):
        lines = [f"{folder}/{identity}/{name} {label}"
                 for label, identity in enumerate(members.tolist())
                 for name in names[(folder, identity)]]
        path = os.path.join(root, "idx", f"{split}_{modality}_{trial}.txt")
        with open(path, "w", encoding="utf-8") as file:
          file.write("\n".join(lines) + "\n")


def _regdb_person(identity: int, *, root: str, cameras: dict, seed: int,
                  images_per_modality: int, height: int, width: int) -> dict:
  """Writes one RegDB-style identity's images; returns {(folder, identity): [file names]}."""
  tag = _DATASET_TAG["regdb"]
  person_rng = make_rng(seed, tag, 2, identity)
  person = draw_person(person_rng)
  sex = ("female", "male")[person_rng.integers(2)]
  views = person_rng.choice(["front", "back"], size=images_per_modality)
  names = {}
  for code, folder in enumerate(("Visible", "Thermal"), start=1):
    images = render(person, cameras[folder], make_rng(seed, tag, 3, identity, code),
                    images_per_modality, height, width, folder == "Visible")
    os.makedirs(os.path.join(root, folder, str(identity)))
    names[(folder, identity)] = []
    for index, image in enumerate(images):
      number = (identity - 1) * images_per_modality + index + 1
      name = f"{sex}_{views[index]}_{folder[0].lower()}_{number:05d}_{identity}.bmp"
      Image.fromarray(image).save(os.path.join(root, folder, str(identity), name))
      names[(folder, identity)].append(name)
  return names


def write_regdb_tree(root: str, *, num_ids: int = 48, images_per_modality: int = 10,
                     height: int = 128, width: int = 64, seed: int = 0,
                     num_trials: int = 10, show_progress: bool = False,
                     workers: int | None = None) -> None:
  """Writes a RegDB-style tree (method.md 6.2) into the empty or absent folder `root`.

  Layout: `Visible/<id>/<sex>_<front|back>_v_<nnnnn>_<id>.bmp` and the same under `Thermal/`
  with `_t_` (ids 1..num_ids; a visible and a thermal image with the same number form a pair, as
  the dual-camera captures of the real set do), and `idx/{train,test}_{visible,thermal}_{t}.txt`
  for t = 1..num_trials: lines `<path relative to root> <label>`, by identity then image number.
  Per trial a random floor(num_ids / 2) identities train, the rest test; each split is relabelled
  0..C-1 by ascending identity (as the real files are believed to be, test files included).
  `show_progress` draws a bar over persons on a terminal, `workers` sets the writing processes
  (`_for_each_person`); neither changes what is written.

  Raises ValueError for sizes below 1 (2 for num_ids; 16 pixels), FileExistsError when `root`
  exists and is not an empty folder.
  """
  _check_sizes(num_ids=(num_ids, 2), images_per_modality=(images_per_modality, 1),
               height=(height, 16), width=(width, 16), seed=(seed, 0), num_trials=(num_trials, 1))
  _prepare_root(root)
  tag, names = _DATASET_TAG["regdb"], {}
  cameras = {folder: draw_camera(make_rng(seed, tag, 1, code), folder == "Visible")
             for code, folder in ((1, "Visible"), (2, "Thermal"))}
  for folder in cameras:
    os.makedirs(os.path.join(root, folder))
  for person_names in _for_each_person(functools.partial(
      _regdb_person, root=root, cameras=cameras, seed=seed,
      images_per_modality=images_per_modality, height=height, width=width),
                                       range(1, num_ids + 1), "regdb", show_progress, workers):
    names.update(person_names)
  _write_regdb_idx(root, num_ids, names, seed, num_trials)


def _llcm_cameras(seed: int) -> dict:
  """{(camera, "vis" | "nir"): camera nuisances}; one physical camera per number, so the night
  view keeps the day view's scale and horizon and differs in gain, background, blur and noise."""
  tag, cameras = _DATASET_TAG["llcm"], {}
  for camera in LLCM_VISIBLE_CAMERAS:
    day = draw_camera(make_rng(seed, tag, 1, camera, 0), True)
    cameras[(camera, "vis")] = day
    if camera in LLCM_INFRARED_CAMERAS:
      night = draw_camera(make_rng(seed, tag, 1, camera, 1), False)
      cameras[(camera, "nir")] = dict(night, scale=day["scale"], horizon=day["horizon"])
  return cameras


def _llcm_identity(identity: int, *, root: str, test_ids: frozenset, cameras: dict, seed: int,
                   images_per_camera: int, height: int, width: int) -> dict:
  """Writes one LLCM identity's images; returns {"vis" | "nir": [paths relative to root]}.

  The identity is seen by 2..4 distinct cameras per modality (drawn independently, so a camera
  may see it by day and by night), which leaves every query of the test protocol a match in
  another camera after the same-identity same-camera filter (llcm.md 3.3).
  """
  tag, is_test = _DATASET_TAG["llcm"], identity in test_ids
  person_rng = make_rng(seed, tag, 2, identity)
  person = draw_person(person_rng)
  written = {}
  for code, (modality, camera_list) in enumerate((("vis", LLCM_VISIBLE_CAMERAS),
                                                  ("nir", LLCM_INFRARED_CAMERAS))):
    present = np.sort(person_rng.choice(camera_list, size=person_rng.integers(2, 5),
                                        replace=False))
    written[modality] = []
    for camera in present.tolist():
      images = render(person, cameras[(camera, modality)],
                      make_rng(seed, tag, 3, identity, camera, code), images_per_camera, height,
                      width, modality == "vis")
      train_folder, test_folder = _LLCM_FOLDERS[modality]
      folder = (os.path.join(test_folder, f"cam{camera}", f"{identity:04d}") if is_test
                else os.path.join(train_folder, f"{identity:04d}"))
      os.makedirs(os.path.join(root, folder), exist_ok=True)
      # The release's naming (llcm.md 2): <pid>_c<camera>_s<session>_f<frame>_<vis|nir>.jpg.
      session = int(person_rng.integers(0, 1_000_000))
      frames = np.sort(person_rng.choice(np.arange(1, 10_000), images_per_camera, replace=False))
      for image, frame in zip(images, frames.tolist()):
        name = f"{identity:04d}_c{camera:02d}_s{session:06d}_f{frame}_{modality}.jpg"
        Image.fromarray(image).save(os.path.join(root, folder, name), quality=JPEG_QUALITY)
        written[modality].append(os.path.join(folder, name).replace(os.sep, "/"))
  return written


def write_llcm_tree(root: str, *, num_train_ids: int = 24, num_test_ids: int = 24,
                    images_per_camera: int = 4, height: int = 128, width: int = 64,
                    seed: int = 0, show_progress: bool = False,
                    workers: int | None = None) -> None:
  """Writes an LLCM-style tree (llcm.md 2) into the empty or absent folder `root`.

  Layout:
    vis/<pid:04d>/<name>, nir/<pid:04d>/<name>            training identities
    test_vis/cam1..cam9/<pid:04d>/<name>                  test identities, visible
    test_nir/cam1, cam2, cam4..cam9/<pid:04d>/<name>      test identities, near-infrared
    idx/train_vis.txt, idx/train_nir.txt   "<path relative to root> <label>", labels 0..C-1 by
                                           ascending pid, lines by label then file name
    idx/test_id.txt                        first line: comma-separated test pids ascending
  with names `<pid:04d>_c<camera:02d>_s<6 digits>_f<frame>_<vis|nir>.jpg` (JPEG quality 90,
  `height` x `width` RGB; near-infrared images grey). Pids are non-contiguous ints from
  1..~1.1 x total. Each identity is seen by 2..4 cameras per modality with `images_per_camera`
  images each; every camera folder of the test layout exists, even if no identity reached it;
  there is no test_nir/cam3. The default of 24 test identities fills the CMC of
  configs/llcm.py (eval.max_rank = 20 distinct identities). The release's unread
  idx/test_vis.txt and idx/test_nir.txt are not written. `show_progress` draws a bar over
  persons on a terminal, `workers` sets the writing processes (`_for_each_person`); neither
  changes what is written.

  Raises ValueError for sizes below 1 (ids, images) or 16 (pixels),
  FileExistsError when `root` exists and is not an empty folder.
  """
  _check_sizes(num_train_ids=(num_train_ids, 1), num_test_ids=(num_test_ids, 1),
               images_per_camera=(images_per_camera, 1), height=(height, 16),
               width=(width, 16), seed=(seed, 0))
  _prepare_root(root)
  total = num_train_ids + num_test_ids
  split_rng = make_rng(seed, _DATASET_TAG["llcm"], 0)
  ids = np.sort(split_rng.choice(np.arange(1, total + total // 10 + 2), total, replace=False))
  test_ids = set(split_rng.permutation(ids)[num_train_ids:].tolist())
  cameras = _llcm_cameras(seed)
  lists = {"vis": [], "nir": []}
  label = 0
  everyone = _for_each_person(functools.partial(
      _llcm_identity, root=root, test_ids=frozenset(test_ids), cameras=cameras, seed=seed,
      images_per_camera=images_per_camera, height=height, width=width), ids.tolist(), "llcm",
                              show_progress, workers)
  for identity, written in zip(ids.tolist(), everyone):
    if identity not in test_ids:
      for modality, paths in written.items():
        lists[modality] += [f"{path} {label}" for path in sorted(paths)]
      label += 1
  for modality, camera_list in (("vis", LLCM_VISIBLE_CAMERAS), ("nir", LLCM_INFRARED_CAMERAS)):
    for camera in camera_list:
      os.makedirs(os.path.join(root, _LLCM_FOLDERS[modality][1], f"cam{camera}"), exist_ok=True)
  os.makedirs(os.path.join(root, "idx"))
  for modality, lines in lists.items():
    with open(os.path.join(root, "idx", f"train_{modality}.txt"), "w", encoding="utf-8") as file:
      file.write("\n".join(lines) + "\n")
  with open(os.path.join(root, "idx", "test_id.txt"), "w", encoding="utf-8") as file:
    file.write(",".join(str(i) for i in sorted(test_ids)) + "\n")


_WRITERS = {"sysu": write_sysu_tree, "regdb": write_regdb_tree, "llcm": write_llcm_tree}


def _count_files(root: str) -> int:
  """Files under `root`, the marker excluded."""
  return sum(len([f for f in files if f != MARKER_NAME]) for _, _, files in os.walk(root))


def _resolve_params(kind: str, params: dict) -> dict:
  """The writer's full keyword set for `kind`: defaults filled in, unknown names refused."""
  if kind not in _WRITERS:
    raise ValueError(f"synthetic dataset kind must be one of {sorted(_WRITERS)}, got {kind!r}.")
  defaults = {name: parameter.default for name, parameter
              in inspect.signature(_WRITERS[kind]).parameters.items()
              if name != "root" and name not in _DISPLAY_PARAMS}
  unknown = sorted(set(params) - set(defaults))
  if unknown:
    raise ValueError(f"synthetic {kind} dataset: unknown parameter(s) {unknown}; accepted: "
                     f"{sorted(defaults)}.")
  return {name: int(value) if isinstance(value, np.integer) else value
          for name, value in {**defaults, **params}.items()}


def _check_marker(root: str, wanted: dict) -> None:
  """Raises FileExistsError unless `root`'s marker matches `wanted` and its file count holds."""
  try:
    with open(os.path.join(root, MARKER_NAME), "r", encoding="utf-8") as file:
      found = json.load(file)
    num_files = found.pop("num_files")
  except (ValueError, KeyError, AttributeError) as error:
    raise FileExistsError(f"unreadable marker {os.path.join(root, MARKER_NAME)} ({error!r}); "
                          "delete the folder to regenerate the dataset.") from error
  if found != wanted:
    raise FileExistsError(
        f"synthetic dataset at {root} was generated with {found}, but {wanted} was asked for. "
        "Use another root for these parameters, or delete this folder to regenerate.")
  if num_files != _count_files(root):
    raise FileExistsError(
        f"synthetic dataset at {root} is damaged: its marker lists {num_files} files, the "
        f"folder holds {_count_files(root)}. Delete the folder to regenerate it.")


def ensure_synthetic(root: str, kind: str, *, show_progress: bool = False,
                     workers: int | None = None, **params) -> str:
  """Generates a synthetic dataset at `root` unless the same one is already there.

  Args:
    root: folder of the dataset (created with its parents when absent).
    kind: "sysu" (`write_sysu_tree`), "regdb" (`write_regdb_tree`) or "llcm"
      (`write_llcm_tree`).
    show_progress: print a one-line notice on stderr and, on a terminal, a bar over persons.
    workers: processes writing persons (None: every CPU for a tree of 64 persons or more);
      the tree is the same with any number.
    **params: keyword arguments of that writer; missing ones take the writer's defaults.

  The tree is generated in a sibling temporary folder and moved into place once complete, with
  the marker `<root>/synthetic_dataset.json` (kind, resolved parameters, format version, file
  count). A later call with the same kind and parameters reuses the tree.

  Returns: the absolute path of `root`.
  Raises ValueError: unknown kind or parameter, or bad sizes. FileExistsError: `root` holds a
    marker for another kind, other parameters, another format version, or a different number of
    files (a damaged tree); or `root` is a file or a non-empty folder without a marker (never
    overwritten: it may be a user's data).
  """
  root = os.path.abspath(root)
  wanted = {"format_version": FORMAT_VERSION, "kind": kind,
            "params": _resolve_params(kind, params)}
  if os.path.isfile(os.path.join(root, MARKER_NAME)):
    _check_marker(root, wanted)
    return root
  if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
    raise FileExistsError(
        f"{root} exists and is not an empty folder, and has no {MARKER_NAME}: refusing to "
        "write a synthetic dataset into it. Choose another root or empty this folder.")
  temporary = f"{root}.partial-{os.getpid()}"
  shutil.rmtree(temporary, ignore_errors=True)
  if show_progress:
    print(f"dakd_jax: generating a synthetic {kind} dataset into {root}", file=sys.stderr,
          flush=True)
  try:
    _WRITERS[kind](temporary, **wanted["params"], show_progress=show_progress,
                   workers=workers)
    with open(os.path.join(temporary, MARKER_NAME), "w", encoding="utf-8") as file:
      json.dump({**wanted, "num_files": _count_files(temporary)}, file, indent=2,
                sort_keys=True)
    if os.path.isdir(root):
      os.rmdir(root)  # empty, checked above
    os.replace(temporary, root)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return root


def main(argv: list[str] | None = None) -> None:
  """Command line: `python -m dakd_jax.data.synthetic --root DIR --kind sysu|regdb|llcm [...]`."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="dataset folder to create or reuse")
  parser.add_argument("--kind", required=True, choices=sorted(_WRITERS))
  for name in ("seed", "height", "width", "num_train_ids", "num_val_ids", "num_test_ids",
               "images_per_camera", "num_ids", "images_per_modality", "num_trials"):
    parser.add_argument("--" + name.replace("_", "-"), dest=name, type=int,
                        help="writer default when omitted")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes writing persons (default: every CPU from 64 persons)")
  args = vars(parser.parse_args(argv))
  root, kind, workers = args.pop("root"), args.pop("kind"), args.pop("workers")
  params = {name: value for name, value in args.items() if value is not None}
  try:
    path = ensure_synthetic(root, kind, show_progress=True, workers=workers, **params)
    print(f"synthetic {kind} dataset ready at {path}")
  except (ValueError, FileExistsError) as error:
    parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
  main(sys.argv[1:])
