"""Config loading, overrides and validation, through the CLI and through load_config.

The CLI's refusals run in-process (`tests.test_cli.run_cli`: `cli.main_from_args`, what run.py
calls after its flags); a real run.py process where the command line itself or the device count
it sees is the subject."""
import json
import os
import subprocess
import sys

import pytest

from dakd_jax import config as config_lib
from tests import xla_flags
from tests.test_cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(*args, env=None):
  """run.py in a subprocess: the real command line, its own flag parsing included."""
  return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=env)


def test_cli_overrides_reach_the_resolved_config():
  result = run_py("--config=configs/regdb.py:trial=3,released_code", "--print_config",
                   "--config.mask_threshold=0.8", "--config.distill.temperatures=(4,2)",
                   "--config.distill.strong_uses_weak_at_2_6=false", "--config.eval.rerank=true")
  assert result.returncode == 0, result.stderr
  resolved = json.loads(result.stdout)
  assert resolved["mask_threshold"] == 0.8
  assert resolved["distill"]["temperatures"] == [4.0, 2.0]
  assert resolved["eval"]["rerank"] is True
  # From the file arguments: the RegDB trial and the released preset.
  assert resolved["data"]["trial"] == 3
  assert resolved["data"]["dataset"] == "regdb"
  assert resolved["distill"]["mask_keep"] == "low"
  assert resolved["distill"]["mask_mode"] == "scale"
  assert resolved["augment"]["cutswap_mode"] == "whole_image"
  assert resolved["model"]["modality_specific_stem"] is False


@pytest.mark.parametrize("override, expected", [
    ("--config.mask_threshold=1.5", "config.mask_threshold = 1.5 is out of range"),
    ("--config.distill.temperatures=(4,0)", "every one > 0"),
    ("--config.mask_treshold=0.5", "unknown config field 'mask_treshold'"),
    ("--config.mask_threshold=abc", "could not convert string to float: 'abc'"),
    ("--config.distill.mask_keep=middle", "choose one of ('low', 'high')"),
])
def test_cli_rejects_bad_values_before_running(override, expected):
  result = run_cli(["--print_config", override], config="configs/sysu.py")
  assert result.returncode == 2
  assert expected in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_rejects_a_batch_the_devices_cannot_split():
  """Refused by the device count a process sees: a process with 2 (fake) devices."""
  # images_per_id=3 makes ids_per_batch=3 give 9 images, which cannot split over 2 devices.
  result = run_py("--config=configs/sysu.py", "--print_config", "--config.data.ids_per_batch=3",
                  "--config.data.images_per_id=3",
                  env=dict(os.environ, XLA_FLAGS=xla_flags.with_device_count(2)))
  assert result.returncode == 2
  assert "does not divide" in result.stderr and "2 devices" in result.stderr, result.stderr
  assert "Traceback" not in result.stderr


def test_load_config_matches_cli_defaults():
  config = config_lib.load_config("configs/regdb.py:trial=4", ["mask_threshold=0.25"])
  assert config.data.trial == 4 and config.mask_threshold == 0.25
  assert config.data.image_height == 288 and config.data.images_per_id == 5
  assert config.teacher.decay_epochs == (30, 60)
  assert config.distill.mask_keep == "high"  # default preset: the paper's reading


def test_load_config_parses_strings_by_field_type():
  config = config_lib.load_config("configs/sysu.py", {
      "model.depth": "18", "distill.logit_standardize": "false",
      "eval.modes": "('indoor',)", "distill.lr": "1e-3", "data.root": "x/y"})
  assert config.model.depth == 18
  assert config.distill.logit_standardize is False
  assert config.eval.modes == ("indoor",)
  assert config.distill.lr == pytest.approx(1e-3)
  assert config.data.root == "x/y"


@pytest.mark.parametrize("overrides, expected", [
    ({"distill.ablation": "full"}, "config.distill.ablation = 'full' is not allowed"),
    ({"model.depth": 101}, "config.model.depth = 101 is not allowed"),
    ({"augment.cutswap_min": 0.7}, "must be below config.augment.cutswap_max"),
    ({"teacher.decay_epochs": (40, 20)}, "need two epochs D1 < D2"),
    ({"teacher.lr": 0.0}, "config.teacher.lr = 0.0 is out of range: must be in (0.0, inf)"),
    ({"eval.shots": ("single", "double")}, "config.eval.shots"),
    ({"model.init_weights": "/no/such/weights.safetensors"}, "no such file or directory"),
    ({"data.trial": 11}, "config.data.trial = 11 is out of range: must be in [1, 10]"),
    ({"distill.temperatures": (4.0, 3.0)}, "strong_uses_weak_at_2_6 = True needs 5"),
    ({"data.num_workers": -2}, "config.data.num_workers = -2 is out of range: must be in [-1,"),
    ({"distill.student_forward": "one_call"},
     "config.distill.student_forward = 'one_call' is not allowed: choose one of ('grouped', "
     "'two_calls')"),
    ({"model.remat": ("stem", "blocks")}, "config.model.remat = ('stem', 'blocks'): each entry "
                                          "must be one of ('stem', 'non_local')"),
    ({"seeds": (1, 2, 1)}, "config.seeds = (1, 2, 1) repeats a seed"),
])
def test_validate_names_the_field(overrides, expected):
  if "strong_uses_weak_at_2_6" in expected:
    overrides = dict(overrides, **{"distill.strong_uses_weak_at_2_6": True})
  config = config_lib.load_config("configs/sysu.py", overrides, validate_config=False)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, num_devices=1)
  assert expected in str(error.value)


@pytest.mark.parametrize("overrides", [
    {"data.num_workers": -1}, {"model.remat": ()}, {"model.remat": ("stem", "non_local")},
    {"distill.student_forward": "two_calls"}])
def test_validate_accepts_auto_workers_remat_parts_and_student_forwards(overrides):
  config = config_lib.load_config("configs/sysu.py", overrides, validate_config=False)
  config_lib.validate(config, num_devices=1)


def test_eval_batch_must_divide_devices():
  config = config_lib.load_config("configs/sysu.py", {"eval.batch_size": 30},
                                  validate_config=False)
  config_lib.validate(config, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="eval.batch_size = 30 does not divide over 4"):
    config_lib.validate(config, num_devices=4)


def test_unknown_fields_and_unparsable_values_are_errors():
  with pytest.raises(config_lib.ConfigError, match="did you mean 'mask_threshold'"):
    config_lib.load_config("configs/sysu.py", ["mask_treshold=0.5"])
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.depth=fifty.*'fifty'"):
    config_lib.load_config("configs/sysu.py", ["model.depth=fifty"])
  with pytest.raises(config_lib.ConfigError, match="config file not found"):
    config_lib.load_config("configs/nope.py")
  with pytest.raises(config_lib.ConfigError, match="trial must be 1..10"):
    config_lib.load_config("configs/regdb.py:trial=12")
  with pytest.raises(config_lib.ConfigError, match="unknown preset 'bogus'"):
    config_lib.load_config("configs/sysu.py:bogus")


@pytest.mark.parametrize("overrides", [
    ["eval.rerank=yes"], ["model.depth=fifty"], ["mask_treshold=0.5"], ["teacher.epochs=1.5"],
])
def test_notebook_and_command_line_reject_the_same_override_the_same_way(overrides):
  """One parser by construction: the error a notebook gets is the line the command prints."""
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.load_config("configs/demo.py", overrides, validate_config=False)
  result = run_cli(["--print_config", *[f"--config.{o}" for o in overrides]])
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip() == f"dakd_jax: invalid config: {error.value}"


def test_notebook_and_command_line_resolve_the_same_config():
  overrides = {"distill.temperatures": (4, 3), "eval.rerank": True, "eval.modes": ("indoor",),
               "data.root": "some/where", "mask_threshold": 1}
  config = config_lib.load_config("configs/llcm.py", overrides)
  result = run_cli(["--print_config", "--config.distill.temperatures=(4,3)",
                    "--config.eval.rerank=true", "--config.eval.modes=indoor",
                    "--config.data.root=some/where", "--config.mask_threshold=1"],
                   config="configs/llcm.py")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout) == json.loads(json.dumps(config.to_dict()))
  assert config.mask_threshold == 1.0 and isinstance(config.mask_threshold, float)


@pytest.mark.parametrize("argv, expected", [
    (["run.py", "--config=a.py", "--workdir=w", "--config.x=1"],
     (["--config=a.py", "--config.x=1"], ["run.py", "--workdir=w"])),
    (["run.py", "--config", "a.py:p", "--config.x", "1", "--print_config"],
     (["--config=a.py:p", "--config.x=1"], ["run.py", "--print_config"])),
    (["run.py", "--configuration=z"], ([], ["run.py", "--configuration=z"])),
])
def test_split_argv_separates_config_arguments(argv, expected):
  assert config_lib.split_argv(argv) == expected


def test_every_shipped_config_validates():
  for name in ("sysu", "regdb", "llcm", "demo", "base"):
    for arg in ("", ":released_code"):
      config_lib.validate(config_lib.load_config(f"configs/{name}.py{arg}",
                                                 validate_config=False), num_devices=1)


@pytest.mark.parametrize("epochs, decay, warmup, expected", [
    (6, (4, 5), 1, 1),  # the old demo: only epoch 5 at the floor ...
    (52, (4, 5), 1, 47),  # ... the same points in a longer run: epochs 5..51
    (160, (20, 40), 10, 120),  # SYSU-MM01 recipe: epochs 40..159
    (10, (0, 1), 5, 5),  # warm-up (epochs 0..4) overrides the decay
    (8, (5, 8), 1, 0),  # D2 = epochs: never at the floor
])
def test_floor_epochs_counted_by_hand(epochs, decay, warmup, expected):
  assert config_lib.floor_epochs(epochs, decay, warmup) == expected


def test_schedule_warning_names_fields_fraction_rate_and_a_fix():
  message = config_lib.teacher_schedule_warning(52, (4, 5), 1, 3.5e-4)
  assert "config.teacher.decay_epochs = (4, 5)" in message
  assert "config.teacher.epochs = 52" in message
  assert "(47 of 52, 90% of the run)" in message and "(3.5e-06)" in message
  # The suggested decay points, applied, leave at most half the run at the floor.
  suggested = message.split("--config.teacher.decay_epochs='(")[1].split(")")[0]
  first, second = (int(v) for v in suggested.split(","))
  assert 0 <= first < second
  assert config_lib.floor_epochs(52, (first, second), 1) <= 26
  assert config_lib.teacher_schedule_warning(52, (first, second), 1, 3.5e-4) is None


def test_schedule_warning_spares_half_runs_and_the_methods_recipes():
  assert config_lib.teacher_schedule_warning(10, (2, 5), 1, 1e-3) is None  # exactly 50%
  assert config_lib.teacher_schedule_warning(10, (2, 4), 1, 1e-3) is not None  # 60%
  # The method's schedules keep 75% / 62.5% at the floor on purpose (method.md 3.4) ...
  assert config_lib.floor_epochs(160, (30, 60), 10) / 160 > 0.5
  for decay in ((20, 40), (30, 60)):
    assert config_lib.teacher_schedule_warning(160, decay, 10, 3.5e-4) is None
  # ... but not once the run length changes under them.
  shortened = config_lib.teacher_schedule_warning(100, (20, 40), 10, 3.5e-4)
  assert "(60 of 100, 60% of the run)" in shortened


def test_shipped_configs_do_not_warn_and_a_longer_demo_does(caplog):
  for name in ("sysu", "regdb", "llcm", "demo"):
    for arg in ("", ":released_code"):
      teacher = config_lib.load_config(f"configs/{name}.py{arg}", validate_config=False).teacher
      assert config_lib.teacher_schedule_warning(
          teacher.epochs, tuple(teacher.decay_epochs), teacher.warmup_epochs, teacher.lr) is None
  # What the user sees at start-up: the run goes on, the warning is on stderr.
  longer = run_py("--config=configs/demo.py", "--print_config", "--config.teacher.epochs=60")
  assert longer.returncode == 0, longer.stderr
  assert "config.teacher.epochs = 60" in longer.stderr
  assert "(54 of 60, 90% of the run) train at 1%" in longer.stderr
  # (absl logs it: in this process, caplog holds what run.py prints)
  evaluating = run_cli(["--print_config", "--config.teacher.epochs=60", "--config.stage=eval"])
  assert evaluating.returncode == 0, evaluating.stderr
  assert "config.teacher.epochs" not in caplog.text  # no teacher is trained
  run_cli(["--print_config", "--config.teacher.epochs=60"])
  assert "(54 of 60, 90% of the run) train at 1%" in caplog.text  # the same check warns here


@pytest.mark.parametrize("field, value, expected", [
    ("mask_threshold", 1.5, "config.mask_threshold = 1.5 is out of range: must be in [0.0, 1.0]"),
    ("teacher.triplet_margin", -0.1,
     "config.teacher.triplet_margin = -0.1 is out of range: must be in [0.0, inf)"),
    ("teacher.weight_kl", -1.0, "config.teacher.weight_kl = -1.0 is out of range"),
    ("distill.centre_temperature", 0.0,
     "config.distill.centre_temperature = 0.0 is out of range: must be in (0.0, inf)"),
    ("distill.kd_weight", -2.0, "config.distill.kd_weight = -2.0 is out of range"),
    ("augment.flip_prob", 1.5, "config.augment.flip_prob = 1.5 is out of range"),
    ("augment.pad", -1, "config.augment.pad = -1 is out of range: must be in [0, inf)"),
    ("augment.cutswap_min", 0.0,
     "config.augment.cutswap_min = 0.0 is out of range: must be in (0.0, 1.0]"),
    ("augment.cutswap_max", 1.5, "config.augment.cutswap_max = 1.5 is out of range"),
])
def test_bounds_declared_by_the_settings_are_reported_with_the_config_field(field, value,
                                                                            expected):
  """The settings dataclasses declare these bounds (nothing in config.RANGES repeats them);
  start-up builds the settings and names the config field, with the fix."""
  from dakd_jax import builders
  assert field not in {row[0] for row in config_lib.RANGES}
  config = config_lib.load_config("configs/demo.py", {field: value})  # validate passes them
  with pytest.raises(config_lib.ConfigError) as error:
    builders.check_settings(config)
  assert str(error.value).startswith(expected), str(error.value)
  assert f"Fix: --config.{field}=" in str(error.value)
  builders.check_settings(config_lib.load_config("configs/demo.py"))  # the defaults pass
