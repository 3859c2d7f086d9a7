"""Translate a resolved config into what the stages run: model, variables, settings, data.

The pieces `stage_parts` puts together into each stage's parts, once per stage, and the
start-up checks `cli` runs; with `stage_parts`, the only place below the stage loops that reads
config fields, so a knob's name in `configs/base.py` and its effect are one lookup apart: the
model and its initial or restored variables, the augmentation, loss and evaluation settings,
the optimisers and their schedules, the protocol options and the prepared data. Everything it
returns is a plain object the lower modules take as arguments.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dakd_jax import augment
from dakd_jax import stage_checkpoints
from dakd_jax import sharding as sharding_lib
from dakd_jax.data import prepare
from dakd_jax.data import specs
from dakd_jax.data.records import ProtocolOptions
from dakd_jax.errors import CheckpointError, ConfigError, SettingError
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.evaluation import extractor as extractor_lib
from dakd_jax.losses import alignment
from dakd_jax.losses import distill
from dakd_jax.models import resnet

# data.num_workers = AUTO_WORKERS picks the loader worker processes from the host's CPU count.
AUTO_WORKERS = -1
# Below this many CPUs, in-process loading wins: on 2 cores benchmarks/input_pipeline.py gives
# 14k images/s in-process and 3.3k with 2 workers, which compete with the main process for the
# cores and add inter-process copies. Above it, workers overlap decoding with the device step
# (inferred, not yet measured on such a host).
AUTO_WORKERS_MIN_CPUS = 8
AUTO_WORKERS_MAX = 8

# Fields that must match between a checkpoint that is loaded and the config that loads it.
ARCHITECTURE_FIELDS = ("model.depth", "model.width", "model.modality_specific_stem",
                       "model.non_local", "data.dataset", "data.trial")


def model_from_config(config: ml_collections.ConfigDict) -> resnet.ReIDResNet:
  """The ReIDResNet of config.model (teacher and student share the architecture)."""
  return resnet.model_from_settings(config.model)


def image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of the network's input."""
  return config.data.image_height, config.data.image_width


def init_model_variables(config: ml_collections.ConfigDict, model: resnet.ReIDResNet,
                         key) -> dict:
  """Variables of a fresh model: random init (both stems equal, as ImageNet weights would make
  them), then the weights of model.init_weights if set. Runs outside any jit (files are read on
  the host)."""
  variables = resnet.tie_stems(resnet.init_variables(model, key, image_size(config)))
  return load_initial_weights(variables, config.model.init_weights, depth=config.model.depth)


def load_initial_weights(variables: dict, path: str, *, depth: int) -> dict:
  """`variables` with the weights file at `path` loaded over them (`weights.load_pretrained`);
  unchanged when `path` is "". Raises what load_pretrained raises."""
  if not path:
    return variables
  from dakd_jax.models import weights  # Only when a file is named.
  return weights.load_pretrained(variables, path, depth=depth)


def resolve_num_workers(value: int, cpu_count: int) -> int:
  """Loader worker processes for config value `value` on a host with `cpu_count` CPUs.

  value >= 0 is used as given; AUTO_WORKERS (-1) gives 0 below AUTO_WORKERS_MIN_CPUS CPUs
  (in-process loading is faster there), else a quarter of the CPUs, at most AUTO_WORKERS_MAX.
  Raises ValueError for a value below -1.
  """
  if value < AUTO_WORKERS:
    raise ValueError(f"data.num_workers must be >= {AUTO_WORKERS} ({AUTO_WORKERS} = auto), "
                     f"got {value}")
  if value != AUTO_WORKERS:
    return value
  if cpu_count < AUTO_WORKERS_MIN_CPUS:
    return 0
  return min(AUTO_WORKERS_MAX, cpu_count // 4)


def num_workers(config: ml_collections.ConfigDict) -> int:
  """config.data.num_workers resolved for this host (`resolve_num_workers`)."""
  return resolve_num_workers(config.data.num_workers, os.cpu_count() or 1)


def describe_num_workers(config: ml_collections.ConfigDict) -> str:
  """One start-up line saying how many loader workers run and why."""
  chosen = num_workers(config)
  if config.data.num_workers != AUTO_WORKERS:
    return f"data.num_workers={chosen} (as configured)"
  reason = (f"fewer than {AUTO_WORKERS_MIN_CPUS} CPUs: loading in the main process is faster"
            if chosen == 0 else f"a quarter of the CPUs, at most {AUTO_WORKERS_MAX}")
  return f"data.num_workers=auto -> {chosen} ({os.cpu_count()} CPUs; {reason})"


@contextlib.contextmanager
def settings_of_config(config_fields: Mapping[str, str]) -> Iterator[None]:
  """Turns a settings dataclass's SettingError into a ConfigError naming the config field the
  value came from (`config_fields`: settings field -> dotted config field). The settings
  declare the bounds; this is where a refused value gets the user's name for it."""
  try:
    yield
  except SettingError as error:
    field = config_fields.get(error.field)
    if field is None:
      raise
    allowed = error.allowed
    fix = f"<value in {allowed}>" if allowed[:1] in "[(" else f"<{allowed}>"
    problem = "is out of range: must be in" if allowed[:1] in "[(" else "is not allowed: give"
    raise ConfigError(f"config.{field} = {error.value!r} {problem} {allowed}. Fix: "
                      f"--config.{field}={fix}") from None


AUGMENT_CONFIG_FIELDS = {
    "pad": "augment.pad", "flip_prob": "augment.flip_prob",
    "erasing_prob": "augment.erasing_prob", "cutswap_prob": "augment.cutswap_prob",
    "cutswap_range[0]": "augment.cutswap_min", "cutswap_range[1]": "augment.cutswap_max",
    "cutswap_range": "augment.cutswap_min", "cutswap_mode": "augment.cutswap_mode"}
TEACHER_CONFIG_FIELDS = {field.name: f"teacher.{field.name}"
                         for field in dataclasses.fields(alignment.TeacherSettings)}
DISTILL_CONFIG_FIELDS = {**{field.name: f"distill.{field.name}"
                            for field in dataclasses.fields(distill.DistillSettings)},
                         "mask_threshold": "mask_threshold"}


def augment_views(config: ml_collections.ConfigDict, stage: str) -> dict:
  """AugmentSettings per view for 'teacher' (visible, infrared, channel) or 'student'.
  Raises ConfigError naming the config field of a value the settings refuse."""
  recipe = specs.get_spec(config.data.dataset).augment
  use_cutswap = config.augment.use_cutswap and (stage != "teacher" or config.teacher.cutswap)
  views = ("visible", "infrared", "channel") if stage == "teacher" else ("visible", "infrared")
  settings = {}
  with settings_of_config(AUGMENT_CONFIG_FIELDS):
    for view in views:
      base = augment.view_settings(
          view, recipe, cutswap_mode=config.augment.cutswap_mode,
          cutswap_prob=config.augment.cutswap_prob,
          cutswap_range=(config.augment.cutswap_min, config.augment.cutswap_max),
          use_cutswap_on_visible=use_cutswap)
      settings[view] = dataclasses.replace(
          base, pad=config.augment.pad, flip_prob=config.augment.flip_prob,
          erasing_prob=config.augment.erasing_prob)
  return settings


def teacher_settings(config: ml_collections.ConfigDict) -> alignment.TeacherSettings:
  """Teacher loss settings (method.md 3.3); ConfigError naming a refused field."""
  t = config.teacher
  with settings_of_config(TEACHER_CONFIG_FIELDS):
    return alignment.TeacherSettings(
        memory_temperature=t.memory_temperature, weight_view=t.weight_view,
        weight_channel=t.weight_channel, weight_kl=t.weight_kl, weight_triplet=t.weight_triplet,
        weight_global=t.weight_global, triplet_margin=t.triplet_margin)


def distill_settings(config: ml_collections.ConfigDict) -> distill.DistillSettings:
  """DAKD loss settings (method.md 4); mask_threshold is the top-level field. ConfigError
  naming a refused field."""
  d = config.distill
  with settings_of_config(DISTILL_CONFIG_FIELDS):
    return distill.DistillSettings(
        temperatures=tuple(float(t) for t in d.temperatures), kd_weight=d.kd_weight,
        instance_weight=d.instance_weight, class_weight=d.class_weight,
        plain_kd_weight=d.plain_kd_weight, centre_temperature=d.centre_temperature,
        logit_standardize=d.logit_standardize, mask_threshold=config.mask_threshold,
        mask_keep=d.mask_keep, mask_mode=d.mask_mode,
        strong_uses_weak_at_2_6=d.strong_uses_weak_at_2_6, ablation=d.ablation)


def check_settings(config: ml_collections.ConfigDict) -> None:
  """Builds every settings object of the config once at start-up, before any work, so a value
  their declared bounds refuse ends the run in one ConfigError naming the config field."""
  for stage in ("teacher", "student"):
    augment_views(config, stage)
  teacher_settings(config)
  distill_settings(config)


def teacher_learning_rate(config: ml_collections.ConfigDict,
                          steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
  """The MCE per-epoch schedule (method.md 3.4) as a function of the step.

  lr(e) = base (e+1)/warmup for e < warmup; base for e <= D1; 0.1 base for D1 < e < D2;
  0.01 base for e >= D2; e = step // steps_per_epoch (note the strict > at D1).
  """
  base = config.teacher.lr
  warmup = config.teacher.warmup_epochs
  first_decay, second_decay = config.teacher.decay_epochs

  def schedule(step):
    epoch = (jnp.asarray(step) // steps_per_epoch).astype(jnp.float32)
    lr = jnp.where(epoch > first_decay, 0.1 * base, base)
    lr = jnp.where(epoch >= second_decay, 0.01 * base, lr)
    if warmup > 0:
      lr = jnp.where(epoch < warmup, base * (epoch + 1) / warmup, lr)
    return lr

  return schedule


def make_teacher_optimizer(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with coupled L2 weight decay (added to the gradient before Adam, as torch's Adam)."""
  schedule = teacher_learning_rate(config, steps_per_epoch)
  return optax.chain(
      optax.add_decayed_weights(config.teacher.weight_decay),
      optax.scale_by_adam(b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps),
      optax.scale_by_learning_rate(schedule),
  )


def make_student_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam, constant learning rate, no weight decay (method.md 4.7)."""
  return optax.adam(config.distill.lr, b1=config.optim.b1, b2=config.optim.b2,
                    eps=config.optim.eps)


def make_pretrain_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam, constant learning rate pretrain.lr, no weight decay (`train/pretrain.py`)."""
  return optax.adam(config.pretrain.lr, b1=config.optim.b1, b2=config.optim.b2,
                    eps=config.optim.eps)


def synthetic_sizes(config: ml_collections.ConfigDict) -> specs.SyntheticSizes | None:
  """The generated tree's sizes when config.synthetic.enabled, else None."""
  if not config.synthetic.enabled:
    return None
  s = config.synthetic
  return specs.SyntheticSizes(
      num_train_ids=s.num_train_ids, num_val_ids=s.num_val_ids, num_test_ids=s.num_test_ids,
      images_per_camera=s.images_per_camera, height=s.image_height, width=s.image_width,
      seed=s.seed)


def prepare_data(config: ml_collections.ConfigDict) -> prepare.DataBundle:
  """Generates (synthetic), prepares (once per size/trial/content) and opens config.data; with
  checkpoint.select=val the validation identities are held out of the training split."""
  validation = ((config.data.val_fraction, config.seed)
                if config.checkpoint.select == "val" else None)
  return prepare.prepare_data(
      config.data.dataset, config.data.root, config.data.prepared_dir, image_size(config),
      trial=config.data.trial, synthetic_sizes=synthetic_sizes(config),
      progress=config.log.progress, validation=validation)


def eval_settings(config: ml_collections.ConfigDict) -> evaluator_lib.EvalSettings:
  """How embeddings are made and scored (config.eval)."""
  e = config.eval
  return evaluator_lib.EvalSettings(
      batch_size=e.batch_size, use_flip=e.flip, rerank=e.rerank, max_rank=e.max_rank,
      show_progress=config.log.progress, query_expansion=e.query_expansion, aqe_k=e.aqe_k,
      aqe_alpha=e.aqe_alpha, tpr_fprs=tuple(float(f) for f in e.tpr_fprs))


def protocol_options(config: ml_collections.ConfigDict) -> ProtocolOptions:
  """Which protocols config.eval asks for: the trials, and the dataset's own options (its
  spec's eval_options, e.g. SYSU-MM01's modes and shots)."""
  return specs.get_spec(config.data.dataset).protocol_options(
      config.eval, num_trials=config.eval.num_trials, trial=config.data.trial)


def make_evaluator(config: ml_collections.ConfigDict, model: resnet.ReIDResNet,
                   data: prepare.DataBundle, mesh, *,
                   during_training: bool = False) -> evaluator_lib.Evaluator:
  """The evaluator of config's protocols on `data` (built once per stage). During training:
  the lighter training-time protocols, plain cosine scoring, and with checkpoint.select=val the
  held-out validation identities instead of the test split."""
  settings = eval_settings(config)
  if during_training:
    settings = dataclasses.replace(settings, rerank=False, use_flip=False,
                                   query_expansion=False, tpr_fprs=())
    if config.checkpoint.select == "val":
      return evaluator_lib.Evaluator.on_validation(model, data, settings, mesh)
  protocols = data.spec.make_protocols(
      protocol_options(config),
      during_training=during_training)
  return evaluator_lib.Evaluator(model, data, protocols, settings, mesh)


def check_evaluation(config: ml_collections.ConfigDict, data: prepare.DataBundle, *,
                     during_training: bool = False) -> None:
  """Refuses at a stage's start what its evaluation would refuse after training (a missing
  protocol file, eval.max_rank longer than a gallery can fill); reads file lists only."""
  protocols = data.spec.make_protocols(
      protocol_options(config),
      during_training=during_training)
  evaluator_lib.lookup_rows(data, protocols, config.eval.max_rank)


def check_architecture(stored_config: dict, config: ml_collections.ConfigDict,
                       where: str) -> None:
  """Raises CheckpointError naming every architecture/data field a checkpoint differs in; a
  model of another training trial is refused unless eval.allow_trial_mismatch says so; another
  input size than the one trained on is run, with a warning."""
  problems = []
  spec = specs.get_spec(config.data.dataset)
  for field in ARCHITECTURE_FIELDS:
    if field == "data.trial":
      continue
    section, name = field.split(".")
    theirs = stored_config.get(section, {}).get(name)
    ours = config[section][name]
    if theirs != ours:
      problems.append(f"{field}: checkpoint {theirs!r}, config {ours!r}")
  if problems:
    raise CheckpointError(
        f"the checkpoint {where} does not fit this config (" + "; ".join(problems) + "). Use "
        "the checkpoint's values (--config.<field>=...) or a checkpoint of this architecture.")
  stored_data = stored_config.get("data", {})
  trained_size = (stored_data.get("image_height"), stored_data.get("image_width"))
  size = (config.data.image_height, config.data.image_width)
  if None not in trained_size and trained_size != size:
    # The network is fully convolutional, so this runs; the user should know it differs.
    print(f"dakd_jax: warning: {where} was trained on {trained_size[0]}x{trained_size[1]} "
          f"images; this run feeds it {size[0]}x{size[1]} (data.image_height/width), so its "
          f"numbers are not those of the trained size. To match: "
          f"--config.data.image_height={trained_size[0]} "
          f"--config.data.image_width={trained_size[1]}")
  trained_on = stored_data.get("trial")
  if spec.trials and trained_on is not None and trained_on != config.data.trial:
    message = (f"{where} was trained on {spec.title} trial {trained_on}; evaluating or "
               f"distilling it on trial {config.data.trial} mixes its training identities into "
               f"that trial's test set. Use --config.data.trial={trained_on}")
    if not config.eval.allow_trial_mismatch:
      raise CheckpointError(message + ", or --config.eval.allow_trial_mismatch=True if this "
                            "is intended")
    print(f"dakd_jax: warning: {message} (allowed by eval.allow_trial_mismatch)")


def restore_model_variables(config: ml_collections.ConfigDict, model: resnet.ReIDResNet,
                            source: str, mesh, *, hint: str,
                            stages: tuple[str, ...] | None = None,
                            data_fingerprint: str = "") -> tuple[dict, dict]:
  """{'params', 'batch_stats'} of a stage checkpoint (best-mAP step, else newest) or of a
  weights file, replicated on `mesh`, and a description {"source", "stage", "step", ...}.

  `stages`: the stages whose checkpoints are accepted (e.g. ("teacher",) for a student's
  teacher); None accepts any. `data_fingerprint`: the current dataset's; a warning is printed
  when the checkpoint was trained on other data. The description's "selection" says how the
  step was chosen. Raises CheckpointNotFoundError, CheckpointError (another stage, another
  architecture or trial), WeightsError (a file that does not fit).
  """
  if os.path.isfile(source):
    return _load_weights_file(config, model, source, mesh, stages)
  directory, step = stage_checkpoints.find_stage_checkpoint(source, hint=hint)
  where = f"{directory} step {step}"
  metadata = stage_checkpoints.read_step_metadata(directory, step)
  stage = metadata.get("stage", "teacher")
  if stages is not None and stage not in stages:
    raise CheckpointError(
        f"{where} is a {stage} checkpoint; a {' or '.join(stages)} checkpoint is needed here. "
        f"{hint}")
  check_architecture(metadata.get("config", {}), config, where)
  stored_fingerprint = metadata.get("data_fingerprint", "")
  if data_fingerprint and stored_fingerprint and stored_fingerprint != data_fingerprint:
    print(f"dakd_jax: warning: the dataset changed since {where} was trained (fingerprint "
          f"{stored_fingerprint} then, {data_fingerprint} now): a file or a split file differs")
  variables = stage_checkpoints.restore_variables(
      directory, step, extractor_lib.abstract_variables(model, image_size(config), mesh))
  selection = metadata.get("selection", "test_oracle")
  return variables, {"source": where, "stage": stage, "step": step,
                     "best": metadata.get("best", {}), "selection": selection,
                     "selection_label": stage_checkpoints.SELECTION_LABELS[selection],
                     "data_fingerprint": stored_fingerprint}


# Kinds of weights files (`weights.describe_weights_file`) that hold a trained teacher network.
TEACHER_FILE_KINDS = ("authors_teacher", "authors_network", "native")


def _load_weights_file(config, model, path, mesh, stages):
  """restore_model_variables for a weights file: our own, torchvision's or the authors'."""
  from dakd_jax.models import weights  # Deferred: only for files.
  kind = weights.describe_weights_file(path)
  if stages == ("teacher",) and kind not in TEACHER_FILE_KINDS:
    what = {"authors_student": "the authors' DAKD student", "torchvision": "ImageNet weights"}
    raise CheckpointError(
        f"{path} holds {what.get(kind, kind)}, not a trained teacher; point "
        "--config.distill.teacher_checkpoint at a teacher workdir or a teacher weights file (the "
        "authors' *_best.t)")
  metadata = weights.read_checkpoint_metadata(path) if kind.startswith("authors") else {}
  variables = extractor_lib.load_weights_file(model, path, image_size(config), mesh,
                                              log=lambda line: print(f"dakd_jax: {line}"))
  return variables, {"source": path, "stage": kind, "file_metadata": metadata}


def make_mesh():
  """The data-parallel mesh over every device."""
  return sharding_lib.make_mesh()
