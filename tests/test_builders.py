"""builders: what config fields turn into.

init_model_variables: without an initial weights file both two-stream stems start from one
random stem, as ImageNet weights make them; with a native weights file every leaf, including two
different stems, is the file's. num_workers: the loader workers chosen for this host.
"""
import jax
import numpy as np
import pytest

from dakd_jax import builders
from dakd_jax import config as config_lib
from dakd_jax.models import resnet
from dakd_jax.models import weights

SMALL = {"model.width": 4, "data.image_height": 48, "data.image_width": 32}


def small_config(**extra):
  return config_lib.load_config("configs/demo.py", dict(SMALL, **extra), validate_config=False)


def leaves_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


def test_random_init_ties_the_stems_to_the_visible_one():
  config = small_config()
  model = builders.model_from_config(config)
  key = jax.random.key(3)
  variables = builders.init_model_variables(config, model, key)
  # The independent expectation: the untied initialisation with the same key.
  untied = resnet.init_variables(model, key, builders.image_size(config))
  assert not leaves_equal(untied["params"]["stem_visible"], untied["params"]["stem_infrared"])
  for collection in ("params", "batch_stats"):
    tree = variables[collection]
    assert leaves_equal(tree["stem_infrared"], tree["stem_visible"])
    # The visible stem is the one kept; everything else is the untied initialisation.
    assert leaves_equal(tree["stem_visible"], untied[collection]["stem_visible"])
    others = {name: value for name, value in tree.items() if not name.startswith("stem")}
    assert leaves_equal(others, {name: untied[collection][name] for name in others})
  # Separate buffers: the training state holding them is donated to the compiled step.
  for kept, copied in zip(jax.tree.leaves(variables["params"]["stem_visible"]),
                          jax.tree.leaves(variables["params"]["stem_infrared"])):
    assert kept is not copied


def test_native_weights_file_keeps_its_own_two_stems(tmp_path):
  config = small_config()
  model = builders.model_from_config(config)
  saved = resnet.init_variables(model, jax.random.key(5), builders.image_size(config))
  # A trained two-stream model: different stem kernels and different stem BN statistics.
  stats = saved["batch_stats"]["stem_infrared"]["bn1"]
  saved["batch_stats"]["stem_infrared"]["bn1"] = {"mean": stats["mean"] + 0.25,
                                                  "var": stats["var"] * 2.0}
  path = str(tmp_path / "two_stream.npz")
  weights.save_variables(saved, path)
  loaded = builders.init_model_variables(small_config(**{"model.init_weights": path}), model,
                                         jax.random.key(6))
  assert jax.tree.structure(loaded) == jax.tree.structure(saved)
  jax.tree.map(np.testing.assert_array_equal, loaded, saved)
  assert not leaves_equal(loaded["params"]["stem_visible"], loaded["params"]["stem_infrared"])
  np.testing.assert_allclose(loaded["batch_stats"]["stem_infrared"]["bn1"]["var"], 2.0)


def test_shared_stem_model_is_left_as_initialised():
  config = small_config(**{"model.modality_specific_stem": False})
  model = builders.model_from_config(config)
  variables = builders.init_model_variables(config, model, jax.random.key(3))
  untied = resnet.init_variables(model, jax.random.key(3), builders.image_size(config))
  assert "stem" in variables["params"] and "stem_infrared" not in variables["params"]
  assert leaves_equal(variables, untied)


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
