"""Loading and validating configs: the first thing a run does, before anything compiles.

One path for everyone: `run.py` hands its `--config` arguments to `config_from_args`, notebooks
call `load_config(path, overrides)`, which builds the same arguments; both parse them with
ml_collections' `config_flags` on a private `FlagValues`, so a notebook gets exactly what the
command line gets (same parser, same types, same errors). `validate(config)` then runs once at
start-up and names the field, the value seen and what would be accepted. The lists of allowed
values come from the modules that define them.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable, Mapping

import ml_collections
from absl import logging

from dakd_jax.errors import ConfigError

STAGES = ("pretrain", "teacher", "student", "eval", "all", "extract", "export")
SELECTIONS = ("last", "val", "test_oracle")
# The method's teacher schedules (method.md 3.4, SYSU-MM01 and RegDB), (epochs, (D1, D2)): 75%
# and 62.5% of the run at 1% of the rate by design, so start-up does not warn about them.
METHOD_TEACHER_SCHEDULES = ((160, (20, 40)), (160, (30, 60)))
MAX_FLOOR_FRACTION = 0.5  # above this fraction of the teacher's epochs at 1%, start-up warns
CONFIG_FLAG = "config"
# (field, low, high, low inclusive, high inclusive); None = unbounded. Fields that a settings
# dataclass checks (the loss, augmentation and distillation settings) are not here: their bounds
# are declared by those settings, which start-up builds (builders.check_settings).
RANGES = (
    ("seed", 0, None, True, None),
    ("data.trial", 1, 10, True, True),
    ("data.image_height", 1, None, True, None),
    ("data.image_width", 1, None, True, None),
    ("data.ids_per_batch", 2, None, True, None),
    ("data.images_per_id", 1, None, True, None),
    ("data.num_workers", -1, None, True, None),  # -1 = from the host's CPU count
    ("model.width", 1, None, True, None),
    ("model.gem_p", 0.0, None, False, None),
    ("teacher.epochs", 0, None, True, None),
    ("teacher.steps_per_epoch", 0, None, True, None),
    ("teacher.lr", 0.0, None, False, None),
    ("teacher.weight_decay", 0.0, None, True, None),
    ("teacher.warmup_epochs", 0, None, True, None),
    ("teacher.hard_momentum", 0.0, 1.0, True, True),
    ("teacher.mean_momentum", 0.0, 1.0, True, True),
    ("teacher.eval_every_epochs", 1, None, True, None),
    ("distill.epochs", 0, None, True, None),
    ("distill.steps_per_epoch", 0, None, True, None),
    ("distill.lr", 0.0, None, False, None),
    ("distill.eval_every_epochs", 1, None, True, None),
    ("eval.num_trials", 1, 10, True, True),
    ("eval.batch_size", 1, None, True, None),
    ("eval.max_rank", 1, None, True, None),
    ("eval.aqe_k", 1, None, True, None),
    ("eval.aqe_alpha", 0.0, None, True, None),
    ("eval.analysis_identities", 1, None, True, None),
    ("data.val_fraction", 0.0, 1.0, False, False),
    ("eval.num_visual_queries", 1, None, True, None),
    ("eval.visual_top_k", 1, None, True, None),
    ("checkpoint.every_steps", 1, None, True, None),
    ("checkpoint.keep_last", 1, None, True, None),
    ("checkpoint.keep_best", 0, None, True, None),
    ("log.every_steps", 1, None, True, None),
    ("synthetic.num_train_ids", 1, None, True, None),
    ("synthetic.num_val_ids", 1, None, True, None),  # The SYSU reader needs a val_id.txt.
    ("synthetic.num_test_ids", 1, None, True, None),
    ("synthetic.images_per_camera", 1, None, True, None),
    ("pretrain.num_ids", 2, None, True, None),
    ("pretrain.num_test_ids", 1, None, True, None),
    ("pretrain.images_per_camera", 1, None, True, None),
    ("pretrain.seed", 0, None, True, None),
    ("pretrain.epochs", 0, None, True, None),
    ("pretrain.steps_per_epoch", 0, None, True, None),
    ("pretrain.lr", 0.0, None, False, None),
)


def _choices() -> dict[str, tuple]:
  """Allowed values of the enumerated fields, from the modules that define them."""
  from dakd_jax import augment  # Deferred: these pull in JAX.
  from dakd_jax import modalities
  from dakd_jax.data import specs
  from dakd_jax.evaluation import corruptions
  from dakd_jax.losses import distill
  from dakd_jax.models import batch_norm
  from dakd_jax.models import conv
  from dakd_jax.models import resnet
  return {
      "stage": STAGES,
      "data.dataset": specs.DATASET_NAMES,
      "model.depth": tuple(resnet.STAGE_SIZES),
      "model.compute_dtype": tuple(resnet.COMPUTE_DTYPES),
      "model.conv_backward": conv.CONV_BACKWARDS,
      "augment.cutswap_mode": augment.CUTSWAP_MODES,
      "distill.mask_keep": distill.MASK_KEEP,
      "distill.mask_mode": distill.MASK_MODES,
      "distill.ablation": distill.ABLATIONS,
      "distill.student_forward": batch_norm.STUDENT_FORWARDS,
      "extract.query_modality": modalities.MODALITIES,
      "extract.gallery_modality": modalities.MODALITIES,
      "eval.analysis_method": ("pca", "tsne"),
      "eval.corruption": corruptions.CHOICES,
      "eval.severity": corruptions.SEVERITY_CHOICES,
      "checkpoint.select": SELECTIONS,
  }


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The value of a dotted field ('distill.mask_keep'); ConfigError if there is none."""
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"unknown config field {dotted!r}: {_suggest(config, dotted)}")
    node = node[part]
  return node


def _suggest(config: ml_collections.ConfigDict, dotted: str) -> str:
  import difflib  # Only on the error path.
  names = list(_flatten(config))
  close = difflib.get_close_matches(dotted, names, n=3)
  if close:
    return "did you mean " + " or ".join(repr(c) for c in close) + "?"
  return "see configs/base.py for every field"


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def split_argv(argv: Iterable[str]) -> tuple[list[str], list[str]]:
  """Separates `--config...` arguments (the config file and its overrides) from the others.

  Accepts `--config=FILE`, `--config FILE`, `--config.field=value` and `--config.field value`.
  Returns (config arguments, the rest, program name first when given).
  """
  config_args, rest = [], []
  argv = list(argv)
  index = 0
  while index < len(argv):
    arg = argv[index]
    name = arg.split("=", 1)[0]
    if name == f"--{CONFIG_FLAG}" or name.startswith(f"--{CONFIG_FLAG}."):
      if "=" not in arg and index + 1 < len(argv):
        arg = f"{arg}={argv[index + 1]}"
        index += 1
      config_args.append(arg)
    else:
      rest.append(arg)
    index += 1
  return config_args, rest


def describe_override_error(error: BaseException) -> str:
  """One readable line for a config-override error raised by absl/ml_collections."""
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections quotes its whole message.
    match = re.search(r"'?([\w.]+)'?\s*Did you mean \"?([\w.]+)\"?", text.strip("'\""))
    if match:
      return (f"unknown config field '{match.group(1)}': did you mean '{match.group(2)}'? "
              "(see configs/base.py for every field)")
    return f"unknown config field {text} (see configs/base.py for every field)"
  text = re.sub(r"^flag --config\.", "--config.", text)
  return f"{text} (see configs/base.py for every field)"


def config_from_args(config_args: Iterable[str]) -> ml_collections.ConfigDict:
  """Parses `--config=FILE[:arg]` and `--config.field=value` arguments into a locked config.

  The parser is ml_collections' `config_flags` on a private `FlagValues`: values are parsed to
  the field's type (bools as true/false, tuples as '(4,3,5,2,6)' or 'a,b'). Raises ConfigError
  with one readable line for a missing file, an unknown preset, an unknown field or a value of
  the wrong type.
  """
  from absl import flags  # Deferred: only when a config is loaded.
  from ml_collections import config_flags
  config_args = list(config_args)
  files = [a.split("=", 1)[1] for a in config_args if a.startswith(f"--{CONFIG_FLAG}=")]
  if len(files) != 1:
    raise ConfigError("give exactly one config file, e.g. --config=configs/demo.py "
                      f"(got {len(files)})")
  file_path = files[0].partition(":")[0]
  if not os.path.isfile(file_path):
    raise ConfigError(f"config file not found: {file_path} (expected e.g. configs/demo.py; "
                      "the files are in the repository's configs/ folder)")
  # Config files import their siblings as `configs.base`: make the folder above importable.
  project_root = os.path.dirname(os.path.dirname(os.path.abspath(file_path)))
  if project_root not in sys.path:
    sys.path.insert(0, project_root)
  argv = ["dakd_jax"] + config_args
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(CONFIG_FLAG, None, "config file", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values[CONFIG_FLAG].value
  except flags.IllegalFlagValueError as error:
    preset = re.search(r"(ValueError|KeyError): (.*)$", str(error).strip())
    if "Error whilst parsing config file" in str(error) and preset:
      raise ConfigError(f"{files[0]}: {preset.group(2)}") from None
    raise ConfigError(describe_override_error(error)) from None
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as error:
    raise ConfigError(describe_override_error(error)) from None
  return config


def override_args(overrides: Mapping[str, Any] | Iterable[str]) -> list[str]:
  """`--config.field=value` arguments from {'a.b': value} or ['a.b=value', ...].

  Python values are written as the command line would spell them (bools lower-case, tuples
  as their repr), so they go through the same parser.
  """
  if isinstance(overrides, Mapping):
    items = []
    for field, value in overrides.items():
      text = str(value).lower() if isinstance(value, bool) else (
          repr(tuple(value)) if isinstance(value, (tuple, list)) else str(value))
      items.append(f"{field}={text}")
  else:
    items = list(overrides)
  args = []
  for item in items:
    item = item[len(f"--{CONFIG_FLAG}."):] if item.startswith(f"--{CONFIG_FLAG}.") else item
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form field=value")
    args.append(f"--{CONFIG_FLAG}.{item}")
  return args


def load_config(path: str, overrides: Mapping[str, Any] | Iterable[str] = (),
                *, validate_config: bool = True) -> ml_collections.ConfigDict:
  """Loads `configs/<x>.py[:arg]` exactly as `run.py --config=...` does, applies overrides,
  validates.

  Args:
    path: a config file, optionally with ':arg' (e.g. 'configs/regdb.py:trial=3').
    overrides: {'mask_threshold': 0.8} or ['mask_threshold=0.8', ...].
    validate_config: run `validate` (needs the JAX backend for the device count).
  Returns:
    A locked ConfigDict (a misspelt field is an error, never a new field).
  Raises:
    ConfigError: see `config_from_args` and `validate`.
  """
  config = config_from_args([f"--{CONFIG_FLAG}={path}"] + override_args(overrides))
  if validate_config:
    validate(config)
  return config


def _check_range(config, field, low, high, low_inclusive, high_inclusive):
  value = get_field(config, field)
  too_low = low is not None and (value < low if low_inclusive else value <= low)
  too_high = high is not None and (value > high if high_inclusive else value >= high)
  if too_low or too_high:
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive else ")"
    allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    raise ConfigError(f"config.{field} = {value!r} is out of range: must be in {allowed}. "
                      f"Fix: --config.{field}=<value in {allowed}>")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every field's type, range and consistency; raises ConfigError naming the field.

  `num_devices` (default: all JAX devices) is what the batches must divide over. Querying it
  initialises the backend but compiles nothing.
  """
  for field, choices in _choices().items():
    value = get_field(config, field)
    if value not in choices:
      raise ConfigError(f"config.{field} = {value!r} is not allowed: choose one of {choices}")
  for spec in RANGES:
    _check_range(config, *spec)
  from dakd_jax.data import specs  # Deferred like _choices.
  from dakd_jax.data.records import EvalOption
  from dakd_jax.models import resnet
  # The dataset's own evaluation options are declared and checked by its module.
  problem = specs.get_spec(config.data.dataset).eval_option_problem(config.eval) or \
      EvalOption("remat", resnet.REMAT_PARTS, (), may_be_empty=True).problem(
          config.model.remat, field="model.remat")  # () = nothing recomputed
  if problem:
    raise ConfigError(problem)
  temperatures = config.distill.temperatures
  if not temperatures or any(t <= 0 for t in temperatures):
    raise ConfigError(f"config.distill.temperatures = {temperatures!r}: need at least one "
                      "temperature and every one > 0, e.g. --config.distill.temperatures="
                      "'(4,3,5,2,6)'")
  if len(temperatures) < 5 and config.distill.strong_uses_weak_at_2_6:
    raise ConfigError("config.distill.strong_uses_weak_at_2_6 = True needs 5 temperatures "
                      "(the 4th and 5th go to the infrared branch); set it False or give 5")
  if config.augment.cutswap_min >= config.augment.cutswap_max:
    raise ConfigError(f"config.augment.cutswap_min ({config.augment.cutswap_min}) must be below "
                      f"config.augment.cutswap_max ({config.augment.cutswap_max})")
  d1, d2 = config.teacher.decay_epochs if len(config.teacher.decay_epochs) == 2 else (None, None)
  if d1 is None or not 0 <= d1 < d2:
    raise ConfigError(f"config.teacher.decay_epochs = {config.teacher.decay_epochs!r}: need two "
                      "epochs D1 < D2, e.g. --config.teacher.decay_epochs='(20,40)'")
  fprs = tuple(config.eval.tpr_fprs)
  if any(not 0 < f < 1 for f in fprs):
    raise ConfigError(f"config.eval.tpr_fprs = {fprs!r}: each rate must be in (0, 1), e.g. "
                      "--config.eval.tpr_fprs='(1e-4,1e-3,1e-2)', or () to skip")
  if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in config.seeds):
    raise ConfigError(f"config.seeds = {tuple(config.seeds)!r}: non-negative integers, e.g. "
                      "--config.seeds='(0,1,2)', or () for one run with config.seed")
  if len(set(config.seeds)) != len(config.seeds):
    raise ConfigError(f"config.seeds = {tuple(config.seeds)!r} repeats a seed: each seed runs "
                      "once, in <workdir>/seed_<s>; give distinct seeds, e.g. "
                      "--config.seeds='(0,1,2)'")
  if config.seeds and config.stage not in ("all", "teacher", "student", "eval"):
    raise ConfigError(f"config.seeds runs training and evaluation per seed; stage="
                      f"{config.stage!r} has no seed band (use stage=all)")
  _check_corruption(config)
  _check_trials(config)
  _check_stage_lengths(config)
  _check_pretrain(config)
  if config.stage in ("teacher", "all"):
    warning = teacher_schedule_warning(config.teacher.epochs, tuple(config.teacher.decay_epochs),
                                       config.teacher.warmup_epochs, config.teacher.lr)
    if warning:
      logging.warning("%s", warning)
  if config.stage == "extract" and not config.extract.query_dir:
    raise ConfigError("stage=extract needs config.extract.query_dir (a folder of images), e.g. "
                      "--config.extract.query_dir=my_images/")
  for field in ("model.init_weights", "distill.teacher_checkpoint", "checkpoint.resume",
                "eval.checkpoint", "eval.features", "extract.query_dir", "extract.gallery_dir"):
    path = get_field(config, field)
    if path and not os.path.exists(path):
      raise ConfigError(f"config.{field} = {path!r}: no such file or directory. Fix the path "
                        f"or leave it empty (--config.{field}='')")
  _check_divisibility(config, num_devices)


def _check_corruption(config: ml_collections.ConfigDict) -> None:
  """eval.corruption needs its extra (checked here, before any training of stage=all), images
  (not saved features), and one figure per seed for a seed band (not a sweep)."""
  corruption, severity = config.eval.corruption, config.eval.severity
  if corruption == "none":
    return
  if config.eval.features:
    raise ConfigError(f"config.eval.corruption = {corruption!r} corrupts images before "
                      "extraction, so it needs a checkpoint, not saved features: unset "
                      "--config.eval.features (or set --config.eval.corruption=none)")
  from dakd_jax.evaluation import corruptions  # Deferred like _choices.
  corruptions.load_library()
  height, width = config.data.image_height, config.data.image_width
  if height < corruptions.MIN_HEIGHT or width < corruptions.MIN_WIDTH:
    raise ConfigError(
        f"config.eval.corruption needs test images of at least {corruptions.MIN_HEIGHT}x"
        f"{corruptions.MIN_WIDTH} pixels (the library's 32 px, the torrential rain's 60 px "
        f"drops); config.data.image_height x image_width is {height}x{width}")
  if config.seeds and corruptions.is_sweep(corruption, severity):
    raise ConfigError(f"config.seeds with eval.corruption={corruption!r}, eval.severity="
                      f"{severity!r} (several evaluations): a seed band needs one figure; use "
                      "--config.eval.corruption=mixed or a single severity")


def floor_epochs(epochs: int, decay_epochs: tuple[int, int], warmup_epochs: int) -> int:
  """How many of the teacher's `epochs` run at 0.01 x the base rate (method.md 3.4): epoch e
  (from 0) is there when e >= D2 and e >= warmup (warm-up overrides the decay, as in
  `builders.teacher_learning_rate`), so max(0, epochs - max(D2, warmup))."""
  return max(0, epochs - max(decay_epochs[1], warmup_epochs))


def teacher_schedule_warning(epochs: int, decay_epochs: tuple[int, int], warmup_epochs: int,
                             lr: float) -> str | None:
  """A message when most of the teacher's run would sit at 1% of its rate, else None.

  A schedule written for one run length and reused for a longer one silently stops learning
  (issue 17: the demo's (4, 5) at 20 steps an epoch froze every step after the 100th at
  3.5e-6). The method's own schedules (METHOD_TEACHER_SCHEDULES) are exempt.
  """
  floor = floor_epochs(epochs, decay_epochs, warmup_epochs)
  if epochs == 0 or floor / epochs <= MAX_FLOOR_FRACTION or \
      (epochs, tuple(decay_epochs)) in METHOD_TEACHER_SCHEDULES:
    return None
  first, second = decay_epochs
  return (f"config.teacher.decay_epochs = {tuple(decay_epochs)!r} with config.teacher.epochs = "
          f"{epochs}: epochs {epochs - floor}..{epochs - 1} ({floor} of {epochs}, "
          f"{100 * floor / epochs:.0f}% of the run) train at 1% of config.teacher.lr "
          f"({0.01 * lr:.3g}), where the network barely moves. Decay points are epochs, not "
          "fractions: when you change teacher.epochs, move them with it, e.g. "
          f"--config.teacher.decay_epochs='({max(first, epochs // 2)},{max(second, epochs)})'")


def _check_trials(config: ml_collections.ConfigDict) -> None:
  """config.data.trials: distinct RegDB trials 1..10, for the stages that train or evaluate,
  not together with a seed band."""
  trials = tuple(config.data.trials)
  if not trials:
    return
  example = "e.g. --config.data.trials='(1,2,3)' or --config=configs/regdb.py:trials=all"
  if any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 10 for t in trials) \
      or len(set(trials)) != len(trials):
    raise ConfigError(f"config.data.trials = {trials!r}: distinct RegDB trials 1..10, {example}")
  if config.data.dataset != "regdb":
    raise ConfigError(f"config.data.trials = {trials!r}: only RegDB trains per trial "
                      f"(data.dataset = {config.data.dataset!r}); use config.data.trials=()")
  if config.seeds:
    raise ConfigError("config.data.trials and config.seeds both set: run one band at a time "
                      "(set --config.seeds='()' or --config.data.trials='()')")
  if config.stage not in ("all", "teacher", "student", "eval"):
    raise ConfigError(f"config.data.trials runs training and evaluation per trial; stage="
                      f"{config.stage!r} has no trial band (use stage=all)")


def _check_stage_lengths(config):
  """A stage that runs must train for at least one step."""
  stages = {"teacher": ("teacher",), "student": ("distill",), "all": ("teacher", "distill"),
            "pretrain": ("pretrain",)}.get(config.stage, ())
  if config.stage == "all" and config.pretrain.enabled:
    stages += ("pretrain",)
  for section in stages:
    if config[section].epochs == 0:
      raise ConfigError(f"config.{section}.epochs = 0: stage={config.stage} would train "
                        f"nothing. Give at least one epoch (--config.{section}.epochs=1) or "
                        "run another stage")


def _check_pretrain(config):
  """The pretraining persons must not be the experiment's: another folder and another seed."""
  if config.stage == "pretrain" and not config.pretrain.enabled:
    raise ConfigError("config.stage = 'pretrain' needs config.pretrain.enabled = True "
                      "(--config.pretrain.enabled=True)")
  if not config.pretrain.enabled:
    return
  if os.path.abspath(config.pretrain.data_root) == os.path.abspath(config.data.root):
    raise ConfigError(f"config.pretrain.data_root = {config.pretrain.data_root!r} is the "
                      "experiment's data.root; pretraining needs its own folder, e.g. "
                      "--config.pretrain.data_root=data/synthetic_pretrain")
  if config.synthetic.enabled and config.pretrain.seed == config.synthetic.seed:
    raise ConfigError(f"config.pretrain.seed = {config.pretrain.seed} equals config.synthetic.seed:"
                      " the pretraining set would hold the same persons as the test split; "
                      "choose another seed, e.g. --config.pretrain.seed="
                      f"{config.synthetic.seed + 1}")


def _check_divisibility(config, num_devices):
  if num_devices is None:
    import jax  # Deferred: importing jax is slow and most checks above do not need it.
    num_devices = jax.device_count()
  per_modality = config.data.ids_per_batch * config.data.images_per_id
  if per_modality % num_devices:
    raise ConfigError(
        f"config.data.ids_per_batch * config.data.images_per_id = {per_modality} images per "
        f"modality does not divide over {num_devices} devices; choose P and K with P*K a "
        f"multiple of {num_devices}")
  if config.eval.batch_size % num_devices:
    raise ConfigError(f"config.eval.batch_size = {config.eval.batch_size} does not divide over "
                      f"{num_devices} devices; use a multiple of {num_devices}")


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able plain dict (tuples become lists) for the workdir and checkpoints."""
  return config.to_dict()
