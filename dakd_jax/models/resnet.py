"""The re-ID backbone: ResNet with optional per-modality stems, non-local blocks, GeM and BNNeck.

Sits between the on-device augmentation and the losses: a compiled step feeds it normalised
images `[n, H, W, 3]` with an int32 modality code per image (0 visible, 1 infrared, see
`dakd_jax.modalities`) and hands its outputs to the losses (method.md 2, 2.2).

Layout (method.md 2.1): torchvision ResNet (stride of a downsampling bottleneck on its 3x3 conv),
last stride 1, AGW non-local blocks after the last 2 blocks of layer2 and the last 3 of layer3
(for ResNet-18, whose stages have 2 blocks, after every block of layer2 and layer3), GeM pooling
with a learnable exponent, and a BNNeck. With `modality_specific_stem` (default) each modality
has its own stem (conv1, bn1, relu, maxpool), layer1..layer4 are shared; without it the network is
the released single shared network and `modality` is ignored.

Routing is per sample: both stems run on the whole batch and each image keeps the output of its
own stem, so one compiled step serves any visible/infrared mix (the cost is one extra stem
convolution, about 3% of the ResNet-50 FLOPs). Each stem's BatchNorm takes its batch statistics
from its own images only (`GroupedBatchNorm` with a mask). When the codes are known as the step
is compiled (a NumPy array: the training steps' [visible; infrared] layouts) and the setting is
the CPU one (`conv_backward` resolving to "custom"), each stem runs on its own images only
instead (`static_modality_runs`): the same function without the extra stem; "xla" keeps the
masked routing, the program the demo's numbers were measured with. Both stems share one
max-pool because it has no parameters. The DAKD student calls the network once on
[visible; infrared] with `bn_groups=2`: every BN then normalises each half with its own
statistics, as two calls would.

Numerics: convolutions run in `dtype` (float32 or bfloat16); parameters are float32; every
BatchNorm computes its statistics and the normalisation in float32; GeM, the BNNeck and all
outputs are float32 (float64 throughout for a float64 model, which tests use to check
equalities beyond float32 rounding). BN: momentum 0.9, epsilon 1e-5, running variance updated
with the biased batch variance (method.md 2.3).

Under `jax.jit` with the batch sharded over a device mesh, BatchNorm batch statistics are means
over the global (sharded) batch: XLA's SPMD partitioner inserts the cross-device reductions, so no
`axis_name` is needed.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.models.batch_norm import BN_EPSILON, BN_MOMENTUM, GroupedBatchNorm
from dakd_jax.models.batch_norm import at_least_float32
from dakd_jax.models.conv import conv_general_dilated_for, resolve_conv_backward
from dakd_jax.models.pool import max_pool_for

# Blocks per stage and whether the stage uses bottleneck blocks (expansion 4). ResNet-10 (one
# basic block per stage) is the smallest network with every part: quick to compile (tests).
STAGE_SIZES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
BOTTLENECK_DEPTHS = (50,)
# Non-local blocks follow the last k blocks of a stage (method.md 2.1); stages 1 and 4 have none.
NON_LOCAL_COUNTS = {1: 0, 2: 2, 3: 3, 4: 0}
# Parts of the network a ReIDResNet may recompute in the backward pass instead of storing
# (config model.remat): the stems with the max-pool, the non-local blocks.
REMAT_PARTS = ("stem", "non_local")
# config model.compute_dtype -> the dtype convolutions run in.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# torchvision's conv initialisation (kaiming normal, fan_out); ImageNet weights replace it.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def expansion(depth: int) -> int:
  """Channel expansion of the blocks of a ResNet of this depth (4 for bottlenecks, else 1)."""
  return 4 if depth in BOTTLENECK_DEPTHS else 1


def output_features(depth: int, width: int) -> int:
  """Number of pooled features C_out = 8 * width * expansion (2048 for ResNet-50, width 64)."""
  return 8 * width * expansion(depth)


def non_local_positions(depth: int, stage: int) -> tuple[int, ...]:
  """0-based indices of the blocks of `stage` (1..4) that are followed by a non-local block.

  The last min(k, blocks) blocks, k = 2 for layer2 and 3 for layer3: ResNet-50/34 get blocks
  2, 3 of layer2 and 3, 4, 5 of layer3; ResNet-18 gets both blocks of layer2 and of layer3,
  ResNet-10 the one block of each.
  """
  blocks = STAGE_SIZES[depth][stage - 1]
  count = min(NON_LOCAL_COUNTS[stage], blocks)
  return tuple(range(blocks - count, blocks))


def _uniform_init(bound: float):
  """PyTorch's default conv/bias initialisation: uniform in [-bound, bound]."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _conv(features, kernel, stride, dtype, convolve, name):
  """kxk convolution with padding k//2, no bias; `convolve` computes it (model.conv_backward)."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=_conv_init, conv_general_dilated=convolve,
                 name=name)


def _batch_norm(train, dtype, name, groups=1, backward="xla", **kwargs):
  """A BN layer called as bn(x): Flax's BatchNorm, or in training with `groups` > 1 or the
  hand-written gradient (`backward` "custom", batch_norm.normalize_over_batch) the grouped one
  with the same formula (per-group statistics, one running-average move per group)."""
  if train and (groups > 1 or backward == "custom"):
    bn = GroupedBatchNorm(groups=groups, use_fast_variance=True, backward=backward, dtype=dtype,
                          name=name, **kwargs)
    return lambda x: bn(x, None, True)
  # Flax promotes the statistics and the normalisation to float32 and casts the result to dtype.
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=dtype, param_dtype=jnp.float32, name=name, **kwargs)


class Stem(nn.Module):
  """conv1 (7x7/2, no bias) -> bn1 -> ReLU; the max-pool is applied by the caller.

  bn1 takes its statistics from the samples with `mask` true (all when None), per BN group.
  """
  width: int
  dtype: Any = jnp.float32
  bn_groups: int = 1
  convolve: Callable = lax.conv_general_dilated
  bn_backward: str = "xla"  # "custom": one-pass variance, hand-written gradient (no mask only)

  @nn.compact
  def __call__(self, x, mask, train: bool):
    x = _conv(self.width, 7, 2, self.dtype, self.convolve, "conv1")(x)
    x = GroupedBatchNorm(groups=self.bn_groups if train else 1, dtype=self.dtype,
                         use_fast_variance=self.bn_backward == "custom",
                         backward=self.bn_backward, name="bn1")(x, mask, train)
    return nn.relu(x)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""
  planes: int
  stride: int
  dtype: Any = jnp.float32
  bn_groups: int = 1
  convolve: Callable = lax.conv_general_dilated
  bn_backward: str = "xla"  # GroupedBatchNorm.backward of the block's BNs (model.conv_backward)

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.planes, 3, self.stride, self.dtype, self.convolve, "conv1")(x)
    out = nn.relu(_batch_norm(train, self.dtype, "bn1", self.bn_groups, self.bn_backward)(out))
    out = _conv(self.planes, 3, 1, self.dtype, self.convolve, "conv2")(out)
    out = _batch_norm(train, self.dtype, "bn2", self.bn_groups, self.bn_backward)(out)
    return nn.relu(out + _shortcut(x, self.planes, self.stride, train, self.dtype, self.bn_groups,
                                    self.convolve, self.bn_backward))


class Bottleneck(nn.Module):
  """torchvision Bottleneck: 1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each, + shortcut, ReLU."""
  planes: int
  stride: int
  dtype: Any = jnp.float32
  bn_groups: int = 1
  convolve: Callable = lax.conv_general_dilated
  bn_backward: str = "xla"  # GroupedBatchNorm.backward of the block's BNs (model.conv_backward)

  @nn.compact
  def __call__(self, x, train: bool):
    out = _conv(self.planes, 1, 1, self.dtype, self.convolve, "conv1")(x)
    out = nn.relu(_batch_norm(train, self.dtype, "bn1", self.bn_groups, self.bn_backward)(out))
    out = _conv(self.planes, 3, self.stride, self.dtype, self.convolve, "conv2")(out)
    out = nn.relu(_batch_norm(train, self.dtype, "bn2", self.bn_groups, self.bn_backward)(out))
    out = _conv(4 * self.planes, 1, 1, self.dtype, self.convolve, "conv3")(out)
    out = _batch_norm(train, self.dtype, "bn3", self.bn_groups, self.bn_backward)(out)
    return nn.relu(out + _shortcut(x, 4 * self.planes, self.stride, train, self.dtype,
                                    self.bn_groups, self.convolve, self.bn_backward))


def _shortcut(x, features, stride, train, dtype, groups, convolve, bn_backward):
  """Identity, or 1x1 projection + BN when the stride or channel count changes.

  Called inside a block's compact `__call__`, so the projection's modules belong to that block.
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  x = nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False,
              dtype=dtype, param_dtype=jnp.float32, kernel_init=_conv_init,
              conv_general_dilated=convolve, name="downsample_conv")(x)
  return _batch_norm(train, dtype, "downsample_bn", groups, bn_backward)(x)


class NonLocalBlock(nn.Module):
  """AGW non-local block with intermediate width 1 (method.md 2.1), computed in O(N).

  theta, phi, val: 1x1 convs c -> 1 with bias; y_p = theta_p * mean_q(phi_q val_q) (the N x N
  dot-product affinity divided by N, rank one); out = x + BN(conv1x1_{1->c}(y)). The output BN's
  scale and shift start at 0, so the block starts as the identity. Convs use PyTorch's default
  uniform(+-1/sqrt(fan_in)) initialisation for weights and biases.
  """
  dtype: Any = jnp.float32
  bn_groups: int = 1
  convolve: Callable = lax.conv_general_dilated
  bn_backward: str = "xla"

  @nn.compact
  def __call__(self, x, train: bool):
    channels = x.shape[-1]

    def conv(features, fan_in, name):
      init = _uniform_init(1.0 / math.sqrt(fan_in))
      return nn.Conv(features, (1, 1), use_bias=True, dtype=self.dtype,
                     param_dtype=jnp.float32, kernel_init=init, bias_init=init,
                     conv_general_dilated=self.convolve, name=name)

    theta = at_least_float32(conv(1, channels, "theta")(x))
    phi = at_least_float32(conv(1, channels, "phi")(x))
    val = at_least_float32(conv(1, channels, "val")(x))
    # Scalar per sample in float32: s = (1/N) sum_q phi_q val_q.
    s = jnp.mean(phi * val, axis=(1, 2, 3), keepdims=True)
    y = (theta * s).astype(self.dtype)
    y = conv(channels, 1, "out")(y)
    y = _batch_norm(train, self.dtype, "out_bn", self.bn_groups, self.bn_backward,
                    scale_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(y)
    return x + y


class GeM(nn.Module):
  """Generalised-mean pooling: (mean_hw max(x, eps)^p)^(1/p), learnable scalar p (method.md 2.1).

  x: [n, H, W, C] (any float dtype) -> [n, C] float32.
  """
  p_init: float = 3.0
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    p = self.param("p", nn.initializers.constant(self.p_init), (), jnp.float32)
    x = jnp.maximum(at_least_float32(x), self.eps)
    return jnp.power(jnp.mean(jnp.power(x, p), axis=(1, 2)), 1.0 / p)


class ReIDResNet(nn.Module):
  """Re-ID ResNet (method.md 2). Call as

    model.apply(variables, images, modality, train=True, mutable=["batch_stats"])
    model.apply(variables, images, modality, train=True, bn_groups=2, mutable=["batch_stats"])
    model.apply(variables, images, modality, train=False)

  images: [n, H, W, 3] normalised float; modality: [n] int32, 0 visible / 1 infrared (only these
  two values are valid; ignored when `modality_specific_stem` is false).
  bn_groups (training only): every BN takes its batch statistics from each of `bn_groups` equal
  consecutive parts of the batch separately and moves its running averages once per part, in
  order, so one call on [x_1; x_2] equals consecutive calls on x_1 and x_2 (values, gradients,
  running averages); the DAKD student's per-modality statistics (method.md 4.1).
  Returns a dict of float32 arrays, C_out = `output_features(depth, width)`:
    'pooled': [n, C_out] GeM feature f (before the BNNeck);
    'features': [n, C_out] BNNeck output g (batch statistics when training, running otherwise);
    'embedding': [n, C_out] unit(g), only when train is false;
    'feature_map': [n, H/16, W/16, C_out] layer4 output, only if return_feature_map.
  The BNNeck has a scale (init 1) and no shift: the released shift is initialised to 0 and frozen,
  which is the same as having none (and keeps it out of the optimiser and weight decay).
  `remat` names parts (REMAT_PARTS) recomputed in the backward pass instead of stored: same
  values and gradients, less memory, a little more compute.
  `conv_backward` (conv.CONV_BACKWARDS) chooses, for every convolution, the stem max-pool and
  every unmasked training BN at once, autodiff's gradient or the hand-written one XLA:CPU runs
  fast ("auto": hand-written on the CPU backend; conv.py, pool.py, batch_norm.py), and with it
  the stems' routing for NumPy modality codes (static_modality_runs);
  same values, gradients equal within rounding, same variables.
  Raises ValueError for an unsupported depth, a modality of the wrong shape, a bn_groups that
  does not divide the batch, an unknown remat part or conv_backward.
  """
  depth: int = 50
  width: int = 64
  modality_specific_stem: bool = True
  non_local: bool = True
  gem_p_init: float = 3.0
  last_stride: int = 1
  dtype: Any = jnp.float32
  remat: tuple[str, ...] = ()  # parts of REMAT_PARTS recomputed in the backward pass
  # conv.CONV_BACKWARDS: whose gradient the convolutions use; "xla" as configs/base.py (issue 25).
  conv_backward: str = "xla"

  @nn.compact
  def __call__(self, images, modality, train: bool = False, return_feature_map: bool = False,
               bn_groups: int = 1):
    if self.depth not in STAGE_SIZES:
      raise ValueError(f"depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [n, H, W, 3], got shape {images.shape}")
    if unknown := set(self.remat) - set(REMAT_PARTS):
      raise ValueError(f"remat parts must be among {REMAT_PARTS}, got {sorted(unknown)}")
    groups = bn_groups if train else 1
    if groups < 1 or images.shape[0] % groups:
      raise ValueError(f"bn_groups must be >= 1 and divide the batch of {images.shape[0]} "
                       f"images, got {bn_groups}")
    # The one place the convolutions' and batch norms' backward passes are chosen.
    convolve = conv_general_dilated_for(self.conv_backward)
    bn_backward = resolve_conv_backward(self.conv_backward)
    # Modality codes known when tracing (a NumPy array, as the training steps pass) let each stem
    # run on its own images only; the "xla" setting keeps the masked routing (the program the
    # demo's numbers were measured with).
    runs = static_modality_runs(modality, groups) \
        if bn_backward == "custom" and not self.is_initializing() else None
    stem = nn.remat(_stem_and_pool, static_argnums=(3, 4, 5, 6, 7)) if "stem" in self.remat \
        else _stem_and_pool
    x = stem(self, images.astype(self.dtype), modality, train, groups, convolve, bn_backward,
             runs)
    x = self._stages(x, train, groups, convolve, bn_backward)
    pooled = GeM(p_init=self.gem_p_init, name="gem")(x)
    features = _batch_norm(train, jnp.promote_types(self.dtype, jnp.float32), "bnneck", groups,
                           bn_backward, use_bias=False)(pooled)
    outputs = {"pooled": pooled, "features": features}
    if not train:
      norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
      outputs["embedding"] = features / jnp.maximum(norm, 1e-12)
    if return_feature_map:
      outputs["feature_map"] = at_least_float32(x)
    return outputs

  def _stages(self, x, train, groups, convolve, bn_backward):
    block_cls = Bottleneck if self.depth in BOTTLENECK_DEPTHS else BasicBlock
    non_local_cls = nn.remat(NonLocalBlock, static_argnums=(2,)) if "non_local" in self.remat \
        else NonLocalBlock
    for stage, blocks in enumerate(STAGE_SIZES[self.depth], start=1):
      planes = self.width * 2 ** (stage - 1)
      first_stride = 1 if stage == 1 else (self.last_stride if stage == 4 else 2)
      with_non_local = non_local_positions(self.depth, stage) if self.non_local else ()
      for index in range(blocks):
        stride = first_stride if index == 0 else 1
        x = block_cls(planes, stride, self.dtype, groups, convolve, bn_backward,
                      name=f"layer{stage}_{index}")(x, train)
        if index in with_non_local:
          x = non_local_cls(self.dtype, groups, convolve, bn_backward,
                            name=f"non_local{stage}_{index}")(x, train)
    return x


def static_modality_runs(modality, groups: int = 1) -> tuple[tuple[int, int, int], ...] | None:
  """The runs (code, start, stop) of consecutive equal codes of a NumPy `modality`, or None when
  its values are not known when tracing (a JAX array) or, with `groups` > 1 BN groups (equal
  consecutive parts), a group holds both modalities (each stem must get whole groups).

  Raises ValueError for a code other than VISIBLE_CODE and INFRARED_CODE.
  """
  if not isinstance(modality, np.ndarray) or modality.ndim != 1 or not len(modality):
    return None
  if unknown := set(np.unique(modality).tolist()) - {VISIBLE_CODE, INFRARED_CODE}:
    raise ValueError(f"modality codes must be {VISIBLE_CODE} (visible) or {INFRARED_CODE} "
                     f"(infrared), got {sorted(unknown)}")
  starts = [0] + [i for i in range(1, len(modality)) if modality[i] != modality[i - 1]]
  stops = starts[1:] + [len(modality)]
  if groups > 1 and any(start % (len(modality) // groups) for start in starts):
    return None
  return tuple((int(modality[start]), start, stop) for start, stop in zip(starts, stops))


def _stem_and_pool(model: ReIDResNet, images, modality, train: bool, groups: int,
                   convolve: Callable, bn_backward: str, runs):
  """The stem(s) and the shared max-pool of `model`: [n, H, W, 3] -> [n, H/4, W/4, width].

  With `runs` (static_modality_runs) each stem runs on its own images only; otherwise both run
  on every image and each image keeps its own stem's output (its BN masked to its own images).
  A function of the model (not a method) so that `nn.remat` can wrap it whole: with
  model.remat including "stem" only the max-pool output is kept for the backward pass.
  """
  if not model.modality_specific_stem:
    x = Stem(model.width, model.dtype, groups, convolve, bn_backward, name="stem")(
        images, None, train)
  else:
    if jnp.shape(modality) != images.shape[:1]:
      raise ValueError(f"modality must have shape [n] = {images.shape[:1]}, got "
                       f"{jnp.shape(modality)}")
    if runs is not None:
      x = _stems_on_their_own_images(model, images, runs, train, groups, convolve, bn_backward)
    else:
      is_infrared = jnp.asarray(modality) == INFRARED_CODE
      visible = Stem(model.width, model.dtype, groups, convolve, name="stem_visible")(
          images, ~is_infrared, train)
      infrared = Stem(model.width, model.dtype, groups, convolve, name="stem_infrared")(
          images, is_infrared, train)
      x = jnp.where(is_infrared[:, None, None, None], infrared, visible)
  # The max-pool's gradient follows the convolutions' setting (pool.py).
  max_pool = max_pool_for(model.conv_backward)
  return max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


def _stems_on_their_own_images(model: ReIDResNet, images, runs, train: bool, groups: int,
                               convolve: Callable, bn_backward: str):
  """Each stem on the concatenation of its modality's runs (whole BN groups, in order), the
  outputs put back in batch order. The same function as the masked routing: a stem's BN
  statistics come from its own images, and a stem without images moves nothing."""
  group_size = images.shape[0] // groups
  outputs = {}
  for code, name in ((VISIBLE_CODE, "stem_visible"), (INFRARED_CODE, "stem_infrared")):
    own = [images[start:stop] for run_code, start, stop in runs if run_code == code]
    if own:
      batch = jnp.concatenate(own) if len(own) > 1 else own[0]
      stem_groups = batch.shape[0] // group_size if groups > 1 else 1
      stem = Stem(model.width, model.dtype, stem_groups, convolve, bn_backward, name=name)
      outputs[code] = stem(batch, None, train)
  pieces, used = [], {code: 0 for code in outputs}
  for code, start, stop in runs:
    pieces.append(outputs[code][used[code]:used[code] + stop - start])
    used[code] += stop - start
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


ResNet18 = functools.partial(ReIDResNet, depth=18)
ResNet34 = functools.partial(ReIDResNet, depth=34)
ResNet50 = functools.partial(ReIDResNet, depth=50)


def create_model(depth: int = 50, width: int = 64, **kwargs) -> ReIDResNet:
  """Builds a `ReIDResNet`; kwargs are its other fields (modality_specific_stem, non_local,
  gem_p_init, last_stride, dtype, remat, conv_backward). Raises ValueError for an unsupported
  depth or width."""
  if depth not in STAGE_SIZES:
    raise ValueError(f"model depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
  if width < 1:
    raise ValueError(f"model width must be a positive channel count, got {width}")
  return ReIDResNet(depth=depth, width=width, **kwargs)


def model_from_settings(settings) -> ReIDResNet:
  """The network described by a config's `model` section (a mapping or ConfigDict with depth,
  width, modality_specific_stem, non_local, gem_p, compute_dtype, optionally remat and
  conv_backward), e.g. the
  one stored in a checkpoint. Raises ValueError for an unsupported depth, width or dtype."""
  if settings["compute_dtype"] not in COMPUTE_DTYPES:
    raise ValueError(f"model compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got "
                     f"{settings['compute_dtype']!r}")
  return create_model(
      depth=settings["depth"], width=settings["width"],
      modality_specific_stem=settings["modality_specific_stem"],
      non_local=settings["non_local"], gem_p_init=settings["gem_p"],
      dtype=COMPUTE_DTYPES[settings["compute_dtype"]],
      # Settings stored before the field existed have no remat (it changes no variable).
      remat=tuple(settings.get("remat", ())),
      conv_backward=settings.get("conv_backward", "xla"))


def tie_stems(variables: dict) -> dict:
  """A copy of two-stream variables whose infrared stem equals the visible one (params and BN
  statistics), as when both start from the same ImageNet stem; other trees are returned as is."""
  if "stem_infrared" not in variables.get("params", {}):
    return variables
  tied = {collection: dict(tree) for collection, tree in variables.items()}
  for collection, tree in tied.items():
    if "stem_visible" in tree:
      # Copies, not shared buffers: the state holding them is donated to the train step.
      tree["stem_infrared"] = jax.tree.map(jnp.copy, tree["stem_visible"])
  return tied


def _init(model: ReIDResNet, key: jax.Array, images: jax.Array, modality: jax.Array) -> dict:
  return model.init(key, images, modality, train=False)


# One program per network and image size in a process: a run's stages and evaluations
# initialise the same network several times, and each used to trace and compile it again.
_jit_init = jax.jit(_init, static_argnums=0)
# The init graph is almost all PRNG code and runs once; on CPU, LLVM's optimisation of it is
# most of the compile time (ResNet-50: about 50 s -> 20 s compile, 1 s -> 6 s run).
_jit_init_unoptimised = jax.jit(_init, static_argnums=0,
                                compiler_options={"xla_backend_optimization_level": 0})


def init_variables(model: ReIDResNet, key: jax.Array, image_shape) -> dict:
  """Initialises {'params', 'batch_stats'} (all float32) for images of `image_shape` (H, W[, 3]).

  Runs jitted in inference mode on a zero batch holding one image of each modality, so every
  stem is created; compiled once per network and image size. The values do not depend on the
  image size (only the trace does). May be called under a transformation (e.g.
  `jax.eval_shape` for checkpoint targets).
  """
  height, width = image_shape[0], image_shape[1]
  images = jnp.zeros((2, height, width, 3), jnp.float32)
  modality = jnp.array([VISIBLE_CODE, INFRARED_CODE], jnp.int32)
  is_traced = any(isinstance(arg, jax.core.Tracer) for arg in (key, images))
  init = _jit_init if is_traced or jax.default_backend() != "cpu" else _jit_init_unoptimised
  return init(model, key, images, modality)
