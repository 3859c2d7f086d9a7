"""builders: what a config field turns into on this host (loader workers)."""
import pytest

from dakd_jax import builders
from dakd_jax import config as config_lib


@pytest.mark.parametrize("value, cpus, expected", [
    (-1, 1, 0), (-1, 2, 0), (-1, 7, 0),  # few CPUs: in-process loading is faster
    (-1, 8, 2), (-1, 16, 4), (-1, 32, 8), (-1, 96, 8),  # a quarter of the CPUs, at most 8
    (0, 96, 0), (3, 2, 3),  # an explicit count is kept
])
def test_auto_workers_follow_the_cpu_count(value, cpus, expected):
  assert builders.resolve_num_workers(value, cpus) == expected


def test_auto_workers_reject_other_negative_counts():
  with pytest.raises(ValueError, match="data.num_workers must be >= -1"):
    builders.resolve_num_workers(-2, 4)


def test_start_up_line_says_what_was_chosen_and_why(monkeypatch):
  config = config_lib.load_config("configs/sysu.py", validate_config=False)
  assert config.data.num_workers == -1  # the shipped default is auto
  monkeypatch.setattr(builders.os, "cpu_count", lambda: 2)
  assert builders.num_workers(config) == 0
  assert builders.describe_num_workers(config) == (
      "data.num_workers=auto -> 0 (2 CPUs; fewer than 8 CPUs: loading in the main process is "
      "faster)")
  monkeypatch.setattr(builders.os, "cpu_count", lambda: 16)
  assert builders.describe_num_workers(config) == (
      "data.num_workers=auto -> 4 (16 CPUs; a quarter of the CPUs, at most 8)")
  config = config_lib.load_config("configs/sysu.py", {"data.num_workers": 3},
                                  validate_config=False)
  assert builders.describe_num_workers(config) == "data.num_workers=3 (as configured)"
