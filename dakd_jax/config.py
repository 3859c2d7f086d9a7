"""Loading and validating configs: the first thing a run does, before anything compiles.

`run.py` loads configs through absl's `config_flags`; notebooks call `load_config(path,
overrides)`, which gives the same ConfigDict without flag parsing. Either way `validate(config)`
runs once at start-up and names the field, the value seen and what would be accepted.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field and the fix."""


ENUMS = {
    "stage": ("pretrain", "teacher", "student", "eval", "all", "extract"),
    "data.dataset": ("sysu_mm01", "regdb"),
    "model.depth": (18, 34, 50),
    "model.compute_dtype": ("float32", "bfloat16"),
    "augment.cutswap_mode": ("region", "whole_image"),
    "distill.mask_keep": ("low", "high"),
    "distill.mask_mode": ("scale", "select"),
    "distill.ablation": ("only_kd", "mlkd_no_instance", "mlkd_no_class", "full_mlkd"),
    "extract.query_modality": ("visible", "infrared"),
    "extract.gallery_modality": ("visible", "infrared"),
}
# (field, low, high, low inclusive, high inclusive); None = unbounded.
RANGES = (
    ("mask_threshold", 0.0, 1.0, True, True),
    ("augment.cutswap_prob", 0.0, 1.0, True, True),
    ("augment.cutswap_min", 0.0, 1.0, False, True),
    ("augment.cutswap_max", 0.0, 1.0, False, True),
    ("augment.erasing_prob", 0.0, 1.0, True, True),
    ("augment.flip_prob", 0.0, 1.0, True, True),
    ("augment.pad", 0, None, True, None),
    ("data.trial", 1, 10, True, True),
    ("data.image_height", 1, None, True, None),
    ("data.image_width", 1, None, True, None),
    ("data.ids_per_batch", 2, None, True, None),
    ("data.images_per_id", 1, None, True, None),
    ("data.num_workers", 0, None, True, None),
    ("model.width", 1, None, True, None),
    ("model.gem_p", 0.0, None, False, None),
    ("teacher.epochs", 0, None, True, None),
    ("teacher.steps_per_epoch", 0, None, True, None),
    ("teacher.lr", 0.0, None, False, None),
    ("teacher.weight_decay", 0.0, None, True, None),
    ("teacher.warmup_epochs", 0, None, True, None),
    ("teacher.memory_temperature", 0.0, None, False, None),
    ("teacher.hard_momentum", 0.0, 1.0, True, True),
    ("teacher.mean_momentum", 0.0, 1.0, True, True),
    ("teacher.triplet_margin", 0.0, None, True, None),
    ("teacher.eval_every_epochs", 1, None, True, None),
    ("distill.epochs", 0, None, True, None),
    ("distill.steps_per_epoch", 0, None, True, None),
    ("distill.lr", 0.0, None, False, None),
    ("distill.centre_temperature", 0.0, None, False, None),
    ("distill.eval_every_epochs", 1, None, True, None),
    ("eval.num_trials", 1, 10, True, True),
    ("eval.batch_size", 1, None, True, None),
    ("eval.max_rank", 1, None, True, None),
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
TUPLE_CHOICES = {
    "eval.modes": ("all", "indoor"),
    "eval.training_modes": ("all", "indoor"),
    "eval.shots": ("single", "multi"),
    "eval.directions": ("visible_to_thermal", "thermal_to_visible"),
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


def parse_value(field: str, text: str, current: Any) -> Any:
  """Parses a command-line string into the type of the field's current value."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
      if current and isinstance(current[0], float):
        value = tuple(float(v) for v in value)
      return value
  except (ValueError, SyntaxError) as error:
    raise ConfigError(
        f"--config.{field}={text!r}: cannot parse as {type(current).__name__} "
        f"(current value {current!r})") from error
  raise ConfigError(f"--config.{field}: fields of type {type(current).__name__} cannot be set")


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[str]) -> ml_collections.ConfigDict:
  """Applies overrides given as {'a.b': value} or ['a.b=value', ...] (strings are parsed)."""
  if not isinstance(overrides, Mapping):
    pairs = {}
    for item in overrides:
      item = item[len("--config."):] if item.startswith("--config.") else item
      if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form field=value")
      key, text = item.split("=", 1)
      pairs[key] = text
    overrides = pairs
  for dotted, value in overrides.items():
    current = get_field(config, dotted)
    if isinstance(value, str) and not isinstance(current, str):
      value = parse_value(dotted, value, current)
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as error:
      raise ConfigError(f"--config.{dotted}={value!r}: {error}") from error
  return config


def load_config(path: str, overrides: Mapping[str, Any] | Iterable[str] = (),
                *, validate_config: bool = True) -> ml_collections.ConfigDict:
  """Loads `configs/<x>.py[:arg]` like `--config=...` does, applies overrides, validates.

  Args:
    path: a config file, optionally with ':arg' (e.g. 'configs/regdb.py:trial=3').
    overrides: {'mask_threshold': 0.8} or ['mask_threshold=0.8', ...].
  Returns:
    A locked ConfigDict (a misspelt field is an error, never a new field).
  """
  file_path, _, arg = path.partition(":")
  if not os.path.isfile(file_path):
    raise ConfigError(f"config file not found: {file_path} (expected e.g. configs/demo.py)")
  # Config files import their siblings as `configs.base`: make the folder above importable.
  project_root = os.path.dirname(os.path.dirname(os.path.abspath(file_path)))
  if project_root not in sys.path:
    sys.path.insert(0, project_root)
  spec = importlib.util.spec_from_file_location("_dakd_config", file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None) if arg else module.get_config()
  config.lock()
  apply_overrides(config, overrides)
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
  for field, choices in ENUMS.items():
    value = get_field(config, field)
    if value not in choices:
      raise ConfigError(f"config.{field} = {value!r} is not allowed: choose one of {choices}")
  for spec in RANGES:
    _check_range(config, *spec)
  for field, choices in TUPLE_CHOICES.items():
    values = get_field(config, field)
    bad = [v for v in values if v not in choices]
    if bad or not values:
      raise ConfigError(f"config.{field} = {values!r}: each entry must be one of {choices} "
                        "and at least one is needed, e.g. --config." + field + "='" +
                        repr(choices[:1]) + "'")
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
  _check_pretrain(config)
  for field in ("model.init_weights", "distill.teacher_checkpoint", "checkpoint.resume",
                "eval.checkpoint", "eval.features", "extract.query_dir", "extract.gallery_dir"):
    path = get_field(config, field)
    if path and not os.path.exists(path):
      raise ConfigError(f"config.{field} = {path!r}: no such file or directory. Fix the path "
                        f"or leave it empty (--config.{field}='')")
  _check_divisibility(config, num_devices)


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
