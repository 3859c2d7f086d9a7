"""Translate a resolved config into the static objects the steps close over.

The only place that reads config fields for models, losses and augmentations, so a knob's name
in `configs/base.py` and its effect are one lookup apart.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from dakd_jax import augment
from dakd_jax.losses import alignment
from dakd_jax.losses import distill
from dakd_jax.models import resnet

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_from_config(config: ml_collections.ConfigDict) -> resnet.ReIDResNet:
  """The ReIDResNet of config.model (teacher and student share the architecture)."""
  return resnet.ReIDResNet(
      depth=config.model.depth, width=config.model.width,
      modality_specific_stem=config.model.modality_specific_stem,
      non_local=config.model.non_local, gem_p_init=config.model.gem_p,
      dtype=COMPUTE_DTYPES[config.model.compute_dtype])


def init_model_variables(config: ml_collections.ConfigDict, model: resnet.ReIDResNet,
                         key) -> dict:
  """Variables of a fresh model: random init, then ImageNet weights if model.init_weights is set.

  Runs outside any jit: the weight file is read on the host.
  """
  variables = resnet.init_variables(model, key,
                                    (config.data.image_height, config.data.image_width))
  if config.model.init_weights:
    from dakd_jax.models import weights  # Only when a file is named.
    variables = weights.load_pretrained(variables, config.model.init_weights,
                                        depth=config.model.depth)
  return variables


def augment_views(config: ml_collections.ConfigDict, stage: str) -> dict:
  """AugmentSettings per view for 'teacher' (visible, infrared, channel) or 'student'."""
  use_cutswap = config.augment.use_cutswap and (stage != "teacher" or config.teacher.cutswap)
  views = ("visible", "infrared", "channel") if stage == "teacher" else ("visible", "infrared")
  settings = {}
  for view in views:
    base = augment.view_settings(
        config.data.dataset, view, cutswap_mode=config.augment.cutswap_mode,
        cutswap_prob=config.augment.cutswap_prob,
        cutswap_range=(config.augment.cutswap_min, config.augment.cutswap_max),
        use_cutswap_on_visible=use_cutswap)
    settings[view] = dataclasses.replace(
        base, pad=config.augment.pad, flip_prob=config.augment.flip_prob,
        erasing_prob=config.augment.erasing_prob)
  return settings


def teacher_settings(config: ml_collections.ConfigDict) -> alignment.TeacherSettings:
  """Teacher loss settings (method.md 3.3)."""
  t = config.teacher
  return alignment.TeacherSettings(
      memory_temperature=t.memory_temperature, weight_view=t.weight_view,
      weight_channel=t.weight_channel, weight_kl=t.weight_kl, weight_triplet=t.weight_triplet,
      weight_global=t.weight_global, triplet_margin=t.triplet_margin)


def distill_settings(config: ml_collections.ConfigDict) -> distill.DistillSettings:
  """DAKD loss settings (method.md 4); mask_threshold is the top-level field."""
  d = config.distill
  return distill.DistillSettings(
      temperatures=tuple(float(t) for t in d.temperatures), kd_weight=d.kd_weight,
      instance_weight=d.instance_weight, class_weight=d.class_weight,
      plain_kd_weight=d.plain_kd_weight, centre_temperature=d.centre_temperature,
      logit_standardize=d.logit_standardize, mask_threshold=config.mask_threshold,
      mask_keep=d.mask_keep, mask_mode=d.mask_mode,
      strong_uses_weak_at_2_6=d.strong_uses_weak_at_2_6, ablation=d.ablation)
