"""Weights from files into the `ReIDResNet` variable tree; `load_pretrained` is the one entry point.

Sits before training and evaluation: the config names a file (model.init_weights,
eval.checkpoint, distill.teacher_checkpoint), `load_pretrained` reads it (`weight_files`) and
overwrites freshly initialised variables. The kind of file is told by the names inside
(`torch_layout.describe`, `describe_weights_file`):
- a torchvision ResNet (ImageNet initialisation, method.md 2.4): the backbone only. Every stem
  (one, or one per modality) receives the checkpoint's stem; non-local blocks, GeM `p` and the
  BNNeck keep their initialisation because torchvision has no such layers.
- an authors' released network (teacher `*_best.t`, DAKD student `*_best.pth`, or a flat state
  dict with or without `module.`/`backbone.` prefixes): every tensor of the released network
  (method.md 2.1), for the `released_code` model (shared stem, non-local blocks, GeM, BNNeck).
  A two-stream model gets the shared stem in both stems, which is reported through `log`.
  The recorded metrics come from `read_checkpoint_metadata`.
- our own variable files (`save_variables`: every leaf under "params/..." and
  "batch_stats/..." names, e.g. what the pretrain stage writes): the whole model.

Files: `.safetensors` and `.npz` are read without torch; `.pth`/`.pt`/`.t` need torch and are
read as tensors only. Convert once with

  python -m dakd_jax.models.weights convert resnet50-19c8e357.pth resnet50.safetensors
  python -m dakd_jax.models.weights convert sysu_best.t sysu_best.safetensors

to train or evaluate on a machine without torch (the authors' metadata goes into the header).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from dakd_jax.models import resnet
from dakd_jax.models import torch_layout
from dakd_jax.models import weight_files
from dakd_jax.models.weight_files import WeightsError


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} state dict from `.safetensors`, `.npz` or `.pth`/`.pt`/`.t` (of an
  authors' checkpoint: its 'net' entry).

  Raises FileNotFoundError if `path` does not exist; WeightsError for an unknown extension, a
  truncated or invalid file, a torch file without torch installed, or a torch file that is not a
  state dict of tensors (or holds other objects).
  """
  return weight_files.read_weights_file(path)[0]


def read_checkpoint_metadata(path: str) -> dict:
  """The metadata an authors' checkpoint records beside its network, JSON-able: 'epoch' (int),
  'mAP', 'mINP' (float), 'cmc' (list of floats), 'ablation', 'config' (text); keys the file lacks
  are absent, {} for a bare state dict. Cheap: the arrays are not read. Raises as
  `load_state_dict`."""
  return weight_files.read_weights_header(path).metadata


def describe_weights_file(path: str) -> str:
  """The kind of weights file, without reading its arrays: 'authors_teacher' (an authors'
  network with class-centre memories), 'authors_student' (its checkpoint has 'ablation'/'config'),
  'authors_network' (another authors' network, e.g. a flat state dict), 'torchvision' or 'native'
  (`save_variables`). Raises as `load_state_dict`."""
  header = weight_files.read_weights_header(path)
  return torch_layout.describe(header.names, header.metadata, header.is_checkpoint,
                               header.recorded_kind)


def _check_variables_depth(flat_variables, depth: int) -> None:
  if depth not in resnet.STAGE_SIZES:
    raise WeightsError(f"depth must be one of {sorted(resnet.STAGE_SIZES)}, got {depth}")
  blocks = {path[1] for path in flat_variables if path[1].startswith("layer")}
  expected = {f"layer{stage}_{index}"
              for stage, count in enumerate(resnet.STAGE_SIZES[depth], start=1)
              for index in range(count)}
  has_conv3 = ("params", "layer1_0", "conv3", "kernel") in flat_variables
  if blocks != expected or has_conv3 != (depth in resnet.BOTTLENECK_DEPTHS):
    raise WeightsError(f"the model variables do not belong to a ResNet-{depth} (blocks "
                       f"{sorted(blocks)}); pass the depth the model was created with")


def _normalise(state_dict: Mapping[str, np.ndarray], where: str):
  """({normalised name: array}, {normalised name: name in the file})."""
  state, originals = {}, {}
  for name, value in state_dict.items():
    short = torch_layout.normalise_name(name)
    if short in state:
      raise WeightsError(f"{where} holds both {originals[short]!r} and {name!r}, which are the "
                         "same parameter once the module./backbone. prefixes are removed")
    state[short], originals[short] = value, name
  return state, originals


def _check_file_depth(names, depth: int, where: str) -> None:
  sizes, is_bottleneck = torch_layout.file_resnet(names)
  if not any(sizes) or (sizes, is_bottleneck) == (resnet.STAGE_SIZES[depth],
                                                   depth in resnet.BOTTLENECK_DEPTHS):
    return
  found = torch_layout.depth_of(sizes, is_bottleneck)
  what = f"ResNet-{found}" if found else "ResNet of no depth we build"
  fix = f"set model.depth={found}" if found else "use a torchvision-layout file"
  blocks = "bottleneck" if is_bottleneck else "basic"
  raise WeightsError(f"{where} holds a {what} ({blocks} blocks, {sizes} per stage) but the model "
                     f"is a ResNet-{depth}: {fix}, or use a ResNet-{depth} file")


def _check_non_local_layout(names, model_has_non_local: bool, where: str) -> None:
  blocks = sorted({".".join(name.split(".")[:2]) for name in names if name.startswith("NL_")})
  if blocks and not model_has_non_local:
    raise WeightsError(f"{where} has non-local blocks ({', '.join(blocks)}) but the model has "
                       "none (model.non_local=False): build it with model.non_local=True, as the "
                       "released_code preset does")
  if not blocks and model_has_non_local:
    raise WeightsError(f"{where} has no non-local blocks (no NL_* entries) but the model has them "
                       "(model.non_local=True): build it with model.non_local=False")


def _check_bnneck_bias(state: Mapping[str, np.ndarray], where: str) -> None:
  bias = state.get("bn_neck.bias")
  if bias is not None and np.any(np.asarray(bias) != 0):
    raise WeightsError(
        f"{where}: bn_neck.bias is not zero (max |bias| {np.max(np.abs(bias)):.3g}); our BNNeck "
        "has no shift because the released training freezes it at 0 (method.md 2.1), so this "
        "network cannot be imported exactly")


def _check_names(state, originals, targets, where: str, scheme: str) -> None:
  # The BNNeck bias is checked to be zero and then dropped: it is no target but no surprise.
  extras = {"bn_neck.bias"} if "bn_neck.weight" in targets else set()
  missing = sorted(name for name in targets if name not in state)
  unexpected = sorted(originals[name] for name in state if name not in targets
                      and name not in extras and not torch_layout.is_ignored(name))
  if missing or unexpected:
    raise WeightsError(
        f"{where} does not match {scheme}: missing {len(missing)} {missing[:10]}, unexpected "
        f"{len(unexpected)} {unexpected[:10]} (fc, classifier, memory*.features and "
        "num_batches_tracked entries are ignored); is it a file of this network?")


def _assign(flat, state, originals, targets, where: str):
  for name, paths in targets.items():
    value = np.asarray(state[name])
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    for path in paths:
      current = flat[path]
      if current.shape == () and value.shape == (1,):  # GeM p: a (1,) parameter in torch.
        value = value.reshape(())
      if value.shape != current.shape:
        raise WeightsError(
            f"{where}: shape mismatch for {originals[name]}: file has "
            f"{_torch_shape(value.shape)}, the model expects {_torch_shape(current.shape)} "
            f"(flax {'/'.join(path)}); was the model built with another width or depth?")
      flat[path] = jnp.asarray(value, dtype=current.dtype)
  return traverse_util.unflatten_dict(flat)


def _torch_shape(shape) -> tuple[int, ...]:
  """Reports shapes in torch's layout (OIHW for convs) since that is what the file holds."""
  shape = tuple(shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def import_torchvision_resnet(variables, state_dict: Mapping[str, np.ndarray], *, depth: int,
                              where: str = "state dict"):
  """Returns a copy of `variables` with the backbone taken from a torchvision state dict.

  variables: {'params', 'batch_stats'} of a `ReIDResNet` of this `depth` (any width, stem mode).
  state_dict: torchvision names (optionally under `module.`/`backbone.`) -> arrays; conv weights
    OIHW (converted to HWIO), BN weight/bias/running_mean/running_var. `fc.*` and
    `*.num_batches_tracked` are ignored. where: the file, for messages.
  Leaves keep their dtype (float32). Raises WeightsError for a file of another depth, listing
  missing and unexpected names, or naming a parameter whose shape differs (another width).
  """
  flat = traverse_util.flatten_dict(dict(variables))
  _check_variables_depth(flat, depth)
  state, originals = _normalise(state_dict, where)
  _check_file_depth(state, depth, where)
  stems = sorted({path[1] for path in flat if path[1].startswith("stem")})
  targets = torch_layout.torchvision_targets(depth, stems)
  _check_names(state, originals, targets, where, f"torchvision ResNet-{depth}")
  return _assign(flat, state, originals, targets, where)


def import_authors_network(variables, state_dict: Mapping[str, np.ndarray], *, depth: int,
                           where: str = "state dict"):
  """Returns `variables` with every leaf taken from the authors' released network.

  variables: of a `ReIDResNet` of this `depth` and the file's width (64 for the released files);
    non-local blocks as in the file; one stem (the released layout) or two (each gets the
    file's stem).
  state_dict: the authors' names (`torch_layout`), with or without `module.`/`backbone.`;
    class-centre memories, counters and classifiers are ignored.
  Raises WeightsError naming the key for: a file of another depth or non-local layout, missing or
  unexpected entries, a shape mismatch, a non-zero bn_neck.bias.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  _check_variables_depth(flat, depth)
  state, originals = _normalise(state_dict, where)
  _check_file_depth(state, depth, where)
  has_non_local = any(path[1].startswith("non_local") for path in flat)
  _check_non_local_layout(state, has_non_local, where)
  _check_bnneck_bias(state, where)
  stems = sorted({path[1] for path in flat if path[1].startswith("stem")})
  targets = {**torch_layout.torchvision_targets(depth, stems),
             **torch_layout.authors_targets(depth, has_non_local)}
  scheme = f"the authors' ResNet-{depth}{' with non-local blocks' if has_non_local else ''}"
  _check_names(state, originals, targets, where, scheme)
  return _assign(flat, state, originals, targets, where)


def save_variables(variables, path: str) -> None:
  """Writes model variables ({'params', 'batch_stats'}) to a `.npz` of "collection/a/b" names.

  Written to a temporary file and renamed, so a crash never leaves a half-written `path`. The
  file is read back by `load_pretrained` (whole model: both stems, non-local, GeM, BNNeck).
  """
  if not path.endswith(".npz"):
    raise WeightsError(f"model variables are saved as .npz, got {path!r}")
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f"{path}.tmp-{os.getpid()}.npz"
  np.savez(temporary, **{name: np.asarray(value) for name, value in flat.items()})
  os.replace(temporary, path)


def import_native_variables(variables, state_dict: Mapping[str, np.ndarray], *, where: str):
  """Returns `variables` with every leaf replaced by the same-named entry of `state_dict`.

  For files from `save_variables` (e.g. the pretrain stage's backbone.npz): the file must hold
  exactly the model's leaves with the model's shapes. Raises WeightsError naming the missing,
  unexpected or mis-shaped entries and the likely cause.
  """
  flat = traverse_util.flatten_dict(dict(variables), sep="/")
  missing = sorted(set(flat) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(flat))
  if missing or unexpected:
    raise WeightsError(
        f"{where} does not fit this model: missing {len(missing)} {missing[:5]}, unexpected "
        f"{len(unexpected)} {unexpected[:5]}; was it saved from a model with another depth, "
        "stem mode (model.modality_specific_stem) or non-local setting?")
  for name, current in flat.items():
    value = np.asarray(state_dict[name])
    if value.shape != current.shape:
      raise WeightsError(f"{where}: shape mismatch for {name}: file {value.shape}, model "
                         f"{current.shape}; was it saved from a model of another width?")
    flat[name] = jnp.asarray(value, dtype=current.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def load_pretrained(variables, path: str, *, depth: int,
                    log: Callable[[str], None] | None = None):
  """Weights from `path` into a copy of `variables` (of a `ReIDResNet` of this `depth`).

  The file's kind (`describe_weights_file`) picks the import: 'torchvision' ->
  `import_torchvision_resnet` (backbone only); 'authors_*' -> `import_authors_network` (whole
  network); 'native' -> `import_native_variables` (whole model).
  log: receives one line when an authors' single stem is copied into both stems of a two-stream
    model (default: absl logging.warning); pass `print` to show it on stdout.
  Raises FileNotFoundError for a missing file, WeightsError (naming the file, the key and the
  fix) for everything that does not fit; see those functions and `load_state_dict`.
  """
  state_dict, header = weight_files.read_weights_file(path)
  kind = torch_layout.describe(header.names, header.metadata, header.is_checkpoint,
                               header.recorded_kind)
  if kind == "native":
    return import_native_variables(variables, state_dict, where=path)
  if kind == "torchvision":
    return import_torchvision_resnet(variables, state_dict, depth=depth, where=path)
  imported = import_authors_network(variables, state_dict, depth=depth, where=path)
  stems = sorted(name for name in imported["params"] if name.startswith("stem"))
  if len(stems) > 1:
    (log or logging.warning)(
        f"{path}: the authors' network has one stem for both modalities; copied it into "
        f"{' and '.join(stems)} of this two-stream model (model.modality_specific_stem=True), "
        "which gives the same embeddings in evaluation; model.modality_specific_stem=False keeps "
        "one stem")
  return imported


def convert_to_safetensors(src: str, dst: str) -> str:
  """Writes the tensors of a torch file `src` (.pth/.pt/.t) to `dst` (.safetensors); returns the
  file's kind (`describe_weights_file`).

  A torchvision or other state dict is copied whole. An authors' checkpoint keeps its network
  (names as in the file; memories, counters and classifiers dropped) and records its metadata
  and kind in the header, so `load_pretrained`, `read_checkpoint_metadata` and
  `describe_weights_file` answer as for `src`. Needs torch. Raises as `load_state_dict`, and
  WeightsError for other extensions. `dst` is written atomically (temporary file, rename).
  """
  if not dst.endswith(".safetensors"):
    raise WeightsError(f"destination must end in .safetensors, got {dst!r}")
  if not weight_files.is_torch_file(src):
    raise WeightsError(f"source must be a torch file (.pth, .pt or .t), got {src!r}")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state, header = weight_files.read_weights_file(src)
  kind = torch_layout.describe(header.names, header.metadata, header.is_checkpoint,
                               header.recorded_kind)
  metadata = None
  if kind.startswith("authors"):
    state = {name: value for name, value in state.items()
             if not torch_layout.is_ignored(torch_layout.normalise_name(name))}
    metadata = weight_files.safetensors_header_entries(header.metadata, kind)
  temporary = f"{dst}.tmp-{os.getpid()}"
  save_file({name: np.ascontiguousarray(value) for name, value in state.items()}, temporary,
            metadata=metadata)
  os.replace(temporary, dst)
  return kind


def main(argv=None) -> int:
  """CLI: `python -m dakd_jax.models.weights convert SRC DST.safetensors`."""
  parser = argparse.ArgumentParser(prog="python -m dakd_jax.models.weights",
                                   description="Convert torch weight files to safetensors.")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="torch .pth/.pt/.t (torchvision ResNet or the authors' checkpoint) -> "
                      ".safetensors (needs torch)")
  convert.add_argument("src")
  convert.add_argument("dst")
  args = parser.parse_args(argv)
  try:
    kind = convert_to_safetensors(args.src, args.dst)
  except (WeightsError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst} ({kind})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
