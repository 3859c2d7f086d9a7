"""ImageNet initialisation: torchvision ResNet checkpoints into the `ReIDResNet` variable tree.

Sits before training (method.md 2.4): the config names a weights file, `load_pretrained` reads it
and overwrites the backbone part of freshly initialised variables. Every stem (one, or one per
modality) receives the checkpoint's stem; non-local blocks, GeM `p` and the BNNeck keep their
initialisation because torchvision has no such layers.

Our own variable files (`save_variables`: every leaf of the model under "params/..." and
"batch_stats/..." names, e.g. what the pretrain stage writes) are recognised by their names and
replace the whole model.

Files: `.safetensors` and `.npz` are read without torch; `.pth`/`.pt` need torch and are read
with `torch.load(weights_only=True)` (tensors only, nothing else is unpickled). Convert once with

  python -m dakd_jax.models.weights convert resnet50-19c8e357.pth resnet50.safetensors

to train on a machine without torch.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dakd_jax.models import resnet

CONVERT_HINT = ("install torch (CPU wheel is enough) or convert the file on a machine that has "
                "torch with `python -m dakd_jax.models.weights convert SRC.pth DST.safetensors`")
_BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


class WeightsError(ValueError):
  """A weights file that cannot be imported; the message names the file/parameter and the fix."""


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} state dict from `.safetensors`, `.npz` or `.pth`/`.pt`.

  Raises FileNotFoundError if `path` does not exist; WeightsError for an unknown extension, a
  `.pth` without torch installed, or a `.pth` that is not a flat mapping of tensors.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path!r} (check model.pretrained in the "
                            "config; nothing is downloaded at run time)")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  if ext == ".npz":
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  if ext in (".pth", ".pt"):
    return _load_torch(path)
  raise WeightsError(f"unknown weights file extension {ext!r} in {path!r}: expected "
                     ".safetensors, .npz or .pth/.pt")


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise WeightsError(f"reading {path!r} needs torch: {CONVERT_HINT}") from err
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping) or not all(
      isinstance(value, torch.Tensor) for value in state.values()):
    raise WeightsError(f"{path!r} is not a flat state dict of tensors (name -> tensor); save "
                       "model.state_dict() rather than the model or a training checkpoint")
  # numpy has no bfloat16: widen it; other dtypes convert as they are.
  return {name: (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()
          for name, t in state.items()}


def _block_names(depth: int, block: str) -> list[str]:
  """torchvision parameter prefixes (without the BN field) inside one residual block."""
  convs = (1, 2, 3) if depth in resnet.BOTTLENECK_DEPTHS else (1, 2)
  return [f"{block}.conv{i}" for i in convs] + [f"{block}.bn{i}" for i in convs]


def _has_projection(depth: int, stage: int, index: int) -> bool:
  # Block 0 of every stage projects, except layer1 of the basic-block nets (64 -> 64, stride 1).
  return index == 0 and (stage > 1 or depth in resnet.BOTTLENECK_DEPTHS)


def torchvision_targets(depth: int, stems: list[str]) -> dict[str, list[tuple[str, ...]]]:
  """Maps every torchvision parameter/buffer name of a ResNet of `depth` to flat flax paths.

  stems: names of the stem modules in the flax tree (`stem`, or `stem_visible`/`stem_infrared`);
  the torch stem goes to each. Paths are tuples (collection, module..., leaf).
  """
  modules = {"conv1": [(s, "conv1") for s in stems], "bn1": [(s, "bn1") for s in stems]}
  for stage, blocks in enumerate(resnet.STAGE_SIZES[depth], start=1):
    for index in range(blocks):
      block = f"layer{stage}.{index}"
      flax_block = f"layer{stage}_{index}"
      for name in _block_names(depth, block):
        modules[name] = [(flax_block, name.rsplit(".", 1)[1])]
      if _has_projection(depth, stage, index):
        modules[f"{block}.downsample.0"] = [(flax_block, "downsample_conv")]
        modules[f"{block}.downsample.1"] = [(flax_block, "downsample_bn")]
  targets = {}
  for module, paths in modules.items():
    if module.rsplit(".", 1)[-1].startswith("conv") or module.endswith("downsample.0"):
      targets[f"{module}.weight"] = [("params", *p, "kernel") for p in paths]
    else:
      for field, (collection, leaf) in _BN_FIELDS.items():
        targets[f"{module}.{field}"] = [(collection, *p, leaf) for p in paths]
  return targets


def _is_expected_extra(name: str) -> bool:
  """Entries a torchvision checkpoint has and the re-ID network does not use."""
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def _check_variables_depth(flat_variables, depth: int) -> None:
  blocks = {path[1] for path in flat_variables if re.fullmatch(r"layer\d_\d+", path[1])}
  expected = {f"layer{stage}_{index}"
              for stage, count in enumerate(resnet.STAGE_SIZES[depth], start=1)
              for index in range(count)}
  has_conv3 = ("params", "layer1_0", "conv3", "kernel") in flat_variables
  if blocks != expected or has_conv3 != (depth in resnet.BOTTLENECK_DEPTHS):
    raise WeightsError(f"the model variables do not belong to a ResNet-{depth} (blocks "
                       f"{sorted(blocks)}); pass the depth the model was created with")


def import_torchvision_resnet(variables, state_dict: Mapping[str, np.ndarray], *, depth: int):
  """Returns a copy of `variables` with the backbone taken from a torchvision state dict.

  variables: {'params', 'batch_stats'} of a `ReIDResNet` of this `depth` (any width, stem mode).
  state_dict: torchvision names -> arrays; conv weights OIHW (converted to HWIO), BN
    weight/bias/running_mean/running_var. `fc.*` and `*.num_batches_tracked` are ignored.
  Leaves keep their dtype (float32). Raises WeightsError listing missing and unexpected names, or
  naming a parameter whose shape differs (e.g. a model built with another width).
  """
  if depth not in resnet.STAGE_SIZES:
    raise WeightsError(f"depth must be one of {sorted(resnet.STAGE_SIZES)}, got {depth}")
  flat = traverse_util.flatten_dict(dict(variables))
  _check_variables_depth(flat, depth)
  stems = sorted({path[1] for path in flat if path[1].startswith("stem")})
  targets = torchvision_targets(depth, stems)
  missing = sorted(name for name in targets if name not in state_dict)
  unexpected = sorted(name for name in state_dict
                      if name not in targets and not _is_expected_extra(name))
  if missing or unexpected:
    raise WeightsError(
        f"state dict does not match torchvision ResNet-{depth}: missing {len(missing)} "
        f"{missing}, unexpected {len(unexpected)} {unexpected} (fc.* and num_batches_tracked "
        "are ignored); is it a torchvision checkpoint of this depth?")
  for name, paths in targets.items():
    value = np.asarray(state_dict[name])
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    for path in paths:
      current = flat[path]
      if value.shape != current.shape:
        raise WeightsError(
            f"shape mismatch for {name}: file has {_torch_shape(value.shape)}, the model "
            f"expects {_torch_shape(current.shape)} (flax {'/'.join(path)}); was the model "
            "built with another width or depth?")
      flat[path] = jnp.asarray(value, dtype=current.dtype)
  return traverse_util.unflatten_dict(flat)


def _torch_shape(shape) -> tuple[int, ...]:
  """Reports shapes in torch's layout (OIHW for convs) since that is what the file holds."""
  shape = tuple(shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


# Names in our own variable files start with a collection: "params/stem.../kernel".
NATIVE_PREFIXES = ("params/", "batch_stats/")


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


def load_pretrained(variables, path: str, *, depth: int):
  """Initial weights from `path`: a torchvision ResNet file (`import_torchvision_resnet`, the
  backbone only) or one of our own variable files (`save_variables`, the whole model); the
  kind is told by the names inside. Same errors as those functions and `load_state_dict`."""
  state_dict = load_state_dict(path)
  if state_dict and all(name.startswith(NATIVE_PREFIXES) for name in state_dict):
    return import_native_variables(variables, state_dict, where=path)
  return import_torchvision_resnet(variables, state_dict, depth=depth)


def convert_pth_to_safetensors(src: str, dst: str) -> None:
  """Writes the tensors of a torch state dict `src` (.pth/.pt) to `dst` (.safetensors).

  All entries are kept (including fc.* and num_batches_tracked). Needs torch. Raises as
  `load_state_dict`, and WeightsError if `dst` does not end in .safetensors.
  """
  if not dst.endswith(".safetensors"):
    raise WeightsError(f"destination must end in .safetensors, got {dst!r}")
  if not src.lower().endswith((".pth", ".pt")):
    raise WeightsError(f"source must be a torch .pth/.pt file, got {src!r}")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = load_state_dict(src)
  save_file({name: np.ascontiguousarray(value) for name, value in state.items()}, dst)


def main(argv=None) -> int:
  """CLI: `python -m dakd_jax.models.weights convert SRC.pth DST.safetensors`."""
  parser = argparse.ArgumentParser(prog="python -m dakd_jax.models.weights",
                                   description="Convert torchvision ResNet weights.")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser("convert", help="torch .pth -> .safetensors (needs torch)")
  convert.add_argument("src")
  convert.add_argument("dst")
  args = parser.parse_args(argv)
  try:
    convert_pth_to_safetensors(args.src, args.dst)
  except (WeightsError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
