"""Torch parameter names and where they land in the `ReIDResNet` variable tree.

Used by `weights.py` between reading a file (`weight_files`) and writing the model's variables.
Two naming schemes are known:
- torchvision ResNets (`conv1`, `bn1`, `layer{s}.{i}.conv{k}`/`.bn{k}`,
  `layer{s}.0.downsample.{0,1}`), used for ImageNet initialisation (method.md 2.4);
- the authors' released network (method.md 2.1), the `released_code` preset: torchvision names
  under `backbone.`, plus `backbone.NL_2.{0,1}` / `backbone.NL_3.{0,1,2}` non-local blocks
  (`theta`, `phi`, `g.0`, `W.0`, `W.1`), `backbone.pool.p` (GeM exponent, shape (1,)) and
  `bn_neck.*`. DataParallel adds `module.` in front. Teacher files also hold class-centre
  memories (`memory*.features`), which the import ignores: centres are computed from the network.

Targets are flat flax paths (collection, module..., leaf), e.g. ("params", "layer1_0", "conv1",
"kernel"); one torch name may fill several paths (the stem of a two-stream model).
"""
from __future__ import annotations

import re
from typing import Iterable

from dakd_jax.models import resnet
from dakd_jax.models import weight_files

BN_FIELDS = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# Name prefixes that only the authors' network has (after `normalise_name`).
AUTHORS_PREFIXES = ("NL_", "pool.", "bn_neck.")
# What `describe` answers.
KINDS = weight_files.AUTHORS_KINDS + ("torchvision", "native")
# Names in our own variable files start with a collection: "params/stem.../kernel".
NATIVE_PREFIXES = ("params/", "batch_stats/")
# The non-local block's torch sub-modules -> our NonLocalBlock's (theta and phi keep their names).
_NON_LOCAL_CONVS = {"theta": "theta", "phi": "phi", "g.0": "val", "W.0": "out"}
_IGNORED = re.compile(r"(.*\.)?num_batches_tracked|memory\w*\.features|(classifier\w*|fc)\..*")


def normalise_name(name: str) -> str:
  """The name without a leading `module.` (DataParallel) and then `backbone.` prefix."""
  for prefix in ("module.", "backbone."):
    if name.startswith(prefix):
      name = name[len(prefix):]
  return name


def is_ignored(name: str) -> bool:
  """Entries of a normalised state dict that the re-ID network does not use: BN counters,
  class-centre memories and classifier layers (the released configuration has none in use)."""
  return _IGNORED.fullmatch(name) is not None


def has_authors_layers(names: Iterable[str]) -> bool:
  """Whether normalised `names` include a layer only the authors' network has."""
  return any(name.startswith(AUTHORS_PREFIXES) for name in names)


def describe(names: Iterable[str], metadata: dict, is_checkpoint: bool,
             recorded_kind: str | None) -> str:
  """The kind of a weights file (one of KINDS) from its names and metadata.

  'native': our own variable file; 'authors_teacher': an authors' network with class-centre
  memories; 'authors_student': one whose checkpoint has 'ablation' or 'config' entries (the DAKD
  student's); 'authors_network': any other authors' network (e.g. a flat state dict);
  'torchvision': torchvision names only.
  """
  names = list(names)
  if recorded_kind is not None:
    return recorded_kind
  if names and all(name.startswith(NATIVE_PREFIXES) for name in names):
    return "native"
  normalised = [normalise_name(name) for name in names]
  if not (is_checkpoint or has_authors_layers(normalised)):
    return "torchvision"
  if any(re.fullmatch(r"memory\w*\.features", name) for name in normalised):
    return "authors_teacher"
  if "ablation" in metadata or "config" in metadata:
    return "authors_student"
  return "authors_network"


def _block_names(depth: int, block: str) -> list[str]:
  """torchvision parameter prefixes (without the BN field) inside one residual block."""
  convs = (1, 2, 3) if depth in resnet.BOTTLENECK_DEPTHS else (1, 2)
  return [f"{block}.conv{i}" for i in convs] + [f"{block}.bn{i}" for i in convs]


def _has_projection(depth: int, stage: int, index: int) -> bool:
  # Block 0 of every stage projects, except layer1 of the basic-block nets (64 -> 64, stride 1).
  return index == 0 and (stage > 1 or depth in resnet.BOTTLENECK_DEPTHS)


def _bn_targets(module: str, paths) -> dict[str, list[tuple[str, ...]]]:
  return {f"{module}.{field}": [(collection, *p, leaf) for p in paths]
          for field, (collection, leaf) in BN_FIELDS.items()}


def torchvision_targets(depth: int, stems: list[str]) -> dict[str, list[tuple[str, ...]]]:
  """Maps every torchvision parameter/buffer name of a ResNet of `depth` to flat flax paths.

  stems: names of the stem modules in the flax tree (`stem`, or `stem_visible`/`stem_infrared`);
  the torch stem goes to each.
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
      targets.update(_bn_targets(module, paths))
  return targets


def authors_targets(depth: int, non_local: bool) -> dict[str, list[tuple[str, ...]]]:
  """Maps the authors' names beyond torchvision (normalised) to flat flax paths.

  NL_{s}.{k} is the k-th non-local block of stage s, i.e. our non_local{s}_{i} with i the k-th of
  `resnet.non_local_positions(depth, s)`; pool.p -> gem/p; bn_neck weight and running statistics
  -> bnneck (its bias is not a target: our BNNeck has none, see `check_bnneck_bias`).
  """
  targets = {"pool.p": [("params", "gem", "p")],
             "bn_neck.weight": [("params", "bnneck", "scale")],
             "bn_neck.running_mean": [("batch_stats", "bnneck", "mean")],
             "bn_neck.running_var": [("batch_stats", "bnneck", "var")]}
  if not non_local:
    return targets
  for stage in (2, 3):
    for k, index in enumerate(resnet.non_local_positions(depth, stage)):
      prefix, module = f"NL_{stage}.{k}", f"non_local{stage}_{index}"
      for torch_name, flax_name in _NON_LOCAL_CONVS.items():
        targets[f"{prefix}.{torch_name}.weight"] = [("params", module, flax_name, "kernel")]
        targets[f"{prefix}.{torch_name}.bias"] = [("params", module, flax_name, "bias")]
      targets.update(_bn_targets(f"{prefix}.W.1", [(module, "out_bn")]))
  return targets


def file_resnet(names: Iterable[str]) -> tuple[tuple[int, ...], bool]:
  """(blocks per stage for layer1..layer4, whether bottleneck) of the torchvision-named part of
  normalised `names`; stages without blocks count 0."""
  blocks = {stage: set() for stage in (1, 2, 3, 4)}
  is_bottleneck = False
  for name in names:
    match = re.match(r"layer([1-4])\.(\d+)\.", name)
    if match:
      blocks[int(match.group(1))].add(int(match.group(2)))
      is_bottleneck |= ".conv3." in name
  return tuple(len(blocks[stage]) for stage in (1, 2, 3, 4)), is_bottleneck


def depth_of(stage_sizes: tuple[int, ...], is_bottleneck: bool) -> int | None:
  """The ResNet depth with these blocks per stage and block type, None if we build none."""
  for depth, sizes in resnet.STAGE_SIZES.items():
    if sizes == stage_sizes and (depth in resnet.BOTTLENECK_DEPTHS) == is_bottleneck:
      return depth
  return None
