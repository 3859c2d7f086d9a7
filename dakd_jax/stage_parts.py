"""Each stage's parts, built once from its resolved config (as flax's imagenet example builds
everything in `train_and_evaluate`, and big_vision builds once and hands objects down).

`cli.run_stages` calls `make_training_parts` (pretrain, teacher, student) or
`make_evaluation_parts` (eval, the stage=all summary, extract, export) right before a stage
runs, and the stage takes the object: the training loops (`train/loop.py`, `train/pretrain.py`)
and `stages.py` call no builder. Only what the stage uses is built (an evaluation builds no
optimiser), in the order the stages built them before, except that the student's teacher is
read and its evaluator built before its step's memory plan is checked (`loop.train_student`).
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dakd_jax import builders
from dakd_jax.data import prepare
from dakd_jax.data import sampler
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.evaluation import extractor as extractor_lib
from dakd_jax.modalities import INFRARED_CODE, VISIBLE_CODE
from dakd_jax.models import resnet

TRAINING_STAGES = ("pretrain", "teacher", "student")
EVALUATION_STAGES = ("eval", "summary", "extract", "export")
CHECKPOINT_HINT = "train first (--config.stage=all) or set --config.eval.checkpoint"
TEACHER_HINT = ("train the teacher first (--config.stage=teacher or all) or point "
                "--config.distill.teacher_checkpoint at a teacher workdir, its checkpoints/ "
                "folder or a teacher weights file")


@dataclasses.dataclass(frozen=True)
class TrainingParts:
  """What a training loop runs with (`make_training_parts`).

  variables: the network the state starts from ({'params', 'batch_stats'}; for pretrain the
  params are {'backbone', 'classifier'}). state_key: the state's key. memory_key: the teacher's
  memory-rebuild key (None for the others). losses: TeacherSettings, DistillSettings or None
  (pretrain: cross-entropy). views: AugmentSettings per view. features: the embedding width.
  teacher_variables, teacher_source: the student's frozen teacher, read from its checkpoint
  or weights file, and the description of where it came from (None for the others).
  """
  stage: str
  data: prepare.DataBundle
  mesh: Any
  model: resnet.ReIDResNet
  evaluator: evaluator_lib.Evaluator
  optimizer: optax.GradientTransformation
  steps_per_epoch: int
  views: dict
  losses: Any
  variables: dict
  state_key: jax.Array
  features: int
  num_workers: int
  memory_key: jax.Array | None = None
  teacher_variables: dict | None = None
  teacher_source: dict | None = None


@dataclasses.dataclass(frozen=True)
class EvaluationParts:
  """What a stage that uses a trained network runs with (`make_evaluation_parts`).

  data: the prepared dataset (export: the one its verification images come from, or None;
  extract: None). evaluator: eval: config.eval's protocols; summary: the training-time ones;
  None for extract and export. variables: the restored network (eval without saved features,
  extract, export) or, for the summary, the untrained one at the teacher's random
  initialisation. source: where restored variables came from
  (`builders.restore_model_variables`).
  initial_variables: the summary's initial weights (model.init_weights loaded over the
  untrained variables), or None. extractor: extract's embedding of image files.
  """
  stage: str
  mesh: Any
  model: resnet.ReIDResNet
  data: prepare.DataBundle | None = None
  evaluator: evaluator_lib.Evaluator | None = None
  variables: dict | None = None
  source: dict | None = None
  initial_variables: dict | None = None
  extractor: extractor_lib.Extractor | None = None


def make_training_parts(config: ml_collections.ConfigDict, data: prepare.DataBundle, stage: str,
                        *, teacher_source: str = "") -> TrainingParts:
  """The parts of training stage `stage` ('pretrain', 'teacher', 'student') from its resolved
  config (pretrain: `pretrain.pretrain_config`'s, with its own prepared data).

  teacher_source: the student's teacher, a stage workdir, checkpoint folder or weights file.
  Raises what the builders raise: ConfigError for a refused setting, WeightsError for an
  initial weights file that does not fit, CheckpointError/CheckpointNotFoundError for the
  student's teacher.
  """
  if stage not in TRAINING_STAGES:
    raise ValueError(f"stage must be one of {TRAINING_STAGES}, got {stage!r}")
  mesh = builders.make_mesh()
  model = builders.model_from_config(config)
  common = dict(stage=stage, data=data, mesh=mesh, model=model,
                features=resnet.output_features(config.model.depth, config.model.width),
                num_workers=builders.num_workers(config))
  if stage == "pretrain":
    return _pretrain_parts(config, common)
  if stage == "teacher":
    return _teacher_parts(config, common)
  return _student_parts(config, common, teacher_source)


def teacher_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The teacher's (initialisation, state, memory) keys, from config.seed."""
  return tuple(jax.random.split(jax.random.key(config.seed), 3))


def stage_steps_per_epoch(config_value: int, config: ml_collections.ConfigDict,
                          data: prepare.DataBundle) -> int:
  """config_value if set, else the sampler's epoch length (method.md 5.1)."""
  if config_value:
    return config_value
  return sampler.steps_per_epoch(
      len(prepare.modality_rows(data.train_meta, VISIBLE_CODE)),
      len(prepare.modality_rows(data.train_meta, INFRARED_CODE)),
      config.data.ids_per_batch, config.data.images_per_id)


def _pretrain_parts(config: ml_collections.ConfigDict, common: dict) -> TrainingParts:
  """Pretrain: the network and a linear identity classifier [features, classes] shared by both
  modalities (`pretrain.make_pretrain_step`), Adam at pretrain.lr, the teacher's views."""
  data, model, mesh = common["data"], common["model"], common["mesh"]
  key_init, key_classifier, key_state = jax.random.split(
      jax.random.fold_in(jax.random.key(config.seed), 2), 3)
  variables = builders.init_model_variables(config, model, key_init)
  classifier = 0.01 * jax.random.normal(key_classifier, (common["features"], data.num_classes),
                                        jnp.float32)
  return TrainingParts(
      **common, variables={"params": {"backbone": variables["params"], "classifier": classifier},
                           "batch_stats": variables["batch_stats"]},
      state_key=key_state, optimizer=builders.make_pretrain_optimizer(config),
      views=builders.augment_views(config, "teacher"), losses=None,
      steps_per_epoch=stage_steps_per_epoch(config.pretrain.steps_per_epoch, config, data),
      evaluator=builders.make_evaluator(config, model, data, mesh, during_training=True))


def _teacher_parts(config: ml_collections.ConfigDict, common: dict) -> TrainingParts:
  """Teacher (method.md 3): the MCE schedule over its epochs, its loss settings and views."""
  data, model, mesh = common["data"], common["model"], common["mesh"]
  evaluator = builders.make_evaluator(config, model, data, mesh, during_training=True)
  steps_per_epoch = stage_steps_per_epoch(config.teacher.steps_per_epoch, config, data)
  key_init, key_state, key_memory = teacher_keys(config)
  return TrainingParts(
      **common, evaluator=evaluator, steps_per_epoch=steps_per_epoch,
      optimizer=builders.make_teacher_optimizer(config, steps_per_epoch),
      variables=builders.init_model_variables(config, model, key_init), state_key=key_state,
      memory_key=key_memory, losses=builders.teacher_settings(config),
      views=builders.augment_views(config, "teacher"))


def _student_parts(config: ml_collections.ConfigDict, common: dict,
                   teacher_source: str) -> TrainingParts:
  """Student (method.md 4): DAKD settings, its views and the frozen teacher's variables."""
  data, model, mesh = common["data"], common["model"], common["mesh"]
  # The student starts from ImageNet (or random) weights, not from the teacher (method.md 2.4).
  key_init, key_state = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), 1))
  optimizer = builders.make_student_optimizer(config)
  variables = builders.init_model_variables(config, model, key_init)
  losses, views = builders.distill_settings(config), builders.augment_views(config, "student")
  teacher_variables, described = builders.restore_model_variables(
      config, model, teacher_source, mesh, stages=("teacher",),
      data_fingerprint=data.fingerprint, hint=TEACHER_HINT)
  return TrainingParts(
      **common, optimizer=optimizer, variables=variables, state_key=key_state, losses=losses,
      views=views, teacher_variables=teacher_variables, teacher_source=described,
      evaluator=builders.make_evaluator(config, model, data, mesh, during_training=True),
      steps_per_epoch=stage_steps_per_epoch(config.distill.steps_per_epoch, config, data))


def make_evaluation_parts(config: ml_collections.ConfigDict, data: prepare.DataBundle | None,
                          stage: str, *, workdir: str = "") -> EvaluationParts:
  """The parts of `stage` ('eval', 'summary', 'extract', 'export') from its resolved config.

  The checkpoint read is config.eval.checkpoint, default <workdir>/student (none for the
  summary, nor for eval with config.eval.features). The summary's config is the one the
  teacher trained with, so its model.init_weights names the initial weights of its table.
  Before a checkpoint is read, refuses what the stage would refuse later: a corrupted
  evaluation without its extra, extract's image folders without images, export without its
  packages. Raises CheckpointNotFoundError, CheckpointError, WeightsError, ConfigError,
  DatasetError.
  """
  if stage not in EVALUATION_STAGES:
    raise ValueError(f"stage must be one of {EVALUATION_STAGES}, got {stage!r}")
  if stage == "summary":
    return _summary_parts(config, data)
  _check_before_reading(config, stage)
  mesh = builders.make_mesh()
  model = builders.model_from_config(config)
  checkpoint = config.eval.checkpoint or os.path.join(workdir, "student")
  if stage == "eval":
    evaluator = builders.make_evaluator(config, model, data, mesh)
    if config.eval.features:
      return EvaluationParts(stage, mesh, model, data, evaluator, source={
          "source": config.eval.features, "stage": "saved features"})
    variables, described = builders.restore_model_variables(
        config, model, checkpoint, mesh, hint=CHECKPOINT_HINT, data_fingerprint=data.fingerprint)
    return EvaluationParts(stage, mesh, model, data, evaluator, variables, described)
  variables, described = builders.restore_model_variables(config, model, checkpoint, mesh,
                                                          hint=CHECKPOINT_HINT)
  if stage == "extract":
    extractor = extractor_lib.Extractor(
        model, variables, image_size=builders.image_size(config),
        batch_size=config.eval.batch_size, use_flip=config.eval.flip,
        source=described["source"], mesh=mesh)
    return EvaluationParts(stage, mesh, model, variables=variables, source=described,
                           extractor=extractor)
  # Export verifies its files on test images when there is a dataset to prepare.
  has_data = config.synthetic.enabled or os.path.isdir(config.data.root)
  return EvaluationParts(stage, mesh, model, builders.prepare_data(config) if has_data else None,
                         variables=variables, source=described)


def _check_before_reading(config: ml_collections.ConfigDict, stage: str) -> None:
  """What eval, extract and export refuse before their checkpoint is read."""
  if stage == "eval":
    from dakd_jax.evaluation import robustness_report  # Deferred: only for this stage.
    if robustness_report.is_requested(config):
      robustness_report.check(config)
  elif stage == "extract":
    from dakd_jax.evaluation import folders  # Deferred: only for this stage.
    for folder in (config.extract.query_dir, config.extract.gallery_dir):
      if folder:
        folders.check_folder(folder)
  elif stage == "export":
    from dakd_jax import deploy  # Deferred: the optional export extra.
    deploy.check_export_packages()


def _summary_parts(config: ml_collections.ConfigDict,
                   data: prepare.DataBundle) -> EvaluationParts:
  """The stage=all summary: the training-time evaluator, the untrained network at the teacher's
  random initialisation and, when model.init_weights is set, those weights loaded over it (as
  the stages load them: no second initialisation)."""
  mesh = builders.make_mesh()
  model = builders.model_from_config(config)
  evaluator = builders.make_evaluator(config, model, data, mesh, during_training=True)
  random_config = copy.deepcopy(config)
  random_config.model.init_weights = ""
  untrained = builders.init_model_variables(random_config, model,
                                            teacher_keys(config)[0])
  initial = None
  if config.model.init_weights:
    initial = builders.load_initial_weights(untrained, config.model.init_weights,
                                            depth=config.model.depth)
  return EvaluationParts("summary", mesh, model, data, evaluator, untrained,
                         initial_variables=initial)
