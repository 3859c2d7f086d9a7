"""ImageNet weight import: parity with a torchvision-named torch ResNet, file formats, errors, CLI.

The torch network (tests/torch_resnet.py) has torchvision's module and parameter names
(torchvision itself is not importable in this environment) and last stride 1. Random weights and
random BN running statistics make the eval-mode comparison sensitive to every imported tensor.
"""
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dakd_jax.models import resnet
from dakd_jax.models import weights
from tests.torch_resnet import make_torch_resnet
from tests.torch_resnet import numpy_state_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 64, 48  # layer4 map 4 x 3
NET_WIDTH = 8


@pytest.fixture(scope="module")
def resnet18_variables():
  """Two-stream ResNet-18 (width 8) with non-local blocks, freshly initialised."""
  model = resnet.create_model(18, NET_WIDTH)
  return model, resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH))


@pytest.fixture(scope="module")
def resnet50_variables():
  """Released-code layout: shared stem, no non-local blocks; ResNet-50 at width 8."""
  model = resnet.create_model(50, NET_WIDTH, modality_specific_stem=False, non_local=False)
  return model, resnet.init_variables(model, jax.random.key(1), (HEIGHT, WIDTH))


def _save_all_formats(state, net, directory):
  paths = {ext: os.path.join(directory, f"weights{ext}")
           for ext in (".safetensors", ".npz", ".pth")}
  save_file(state, paths[".safetensors"])
  np.savez(paths[".npz"], **state)
  torch.save(net.state_dict(), paths[".pth"])
  return paths


def _assert_trees_equal(left, right):
  flat_left, flat_right = traverse_util.flatten_dict(left), traverse_util.flatten_dict(right)
  assert flat_left.keys() == flat_right.keys()
  for path in flat_left:
    np.testing.assert_array_equal(np.asarray(flat_left[path]), np.asarray(flat_right[path]),
                                  err_msg=str(path))


@pytest.mark.parametrize("depth", [18, 50])
def test_import_matches_torch_forward(depth, tmp_path, resnet18_variables, resnet50_variables):
  model, variables = resnet18_variables if depth == 18 else resnet50_variables
  net = make_torch_resnet(depth, NET_WIDTH, seed=depth)
  state = numpy_state_dict(net)
  paths = _save_all_formats(state, net, tmp_path)
  imported = {}
  for ext, path in paths.items():
    loaded = weights.load_state_dict(path)
    assert loaded.keys() == state.keys(), ext
    for name in state:
      np.testing.assert_array_equal(loaded[name], state[name], err_msg=f"{ext} {name}")
    imported[ext] = weights.load_pretrained(variables, path, depth=depth)
  _assert_trees_equal(imported[".safetensors"], imported[".npz"])
  _assert_trees_equal(imported[".safetensors"], imported[".pth"])

  rng = np.random.default_rng(depth)
  images = rng.normal(size=(4, HEIGHT, WIDTH, 3)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  modality = jnp.array([0, 1, 1, 0], jnp.int32)
  outputs = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False, return_feature_map=True))(
      imported[".safetensors"], images, modality)
  scale = np.abs(expected).max()
  assert scale > 0.1  # the comparison is not between two near-zero maps
  np.testing.assert_allclose(np.asarray(outputs["feature_map"]), expected, rtol=1e-4,
                             atol=1e-4 * scale)


def test_import_fills_every_stem_and_keeps_non_torchvision_layers(resnet18_variables):
  _, variables = resnet18_variables
  net = make_torch_resnet(18, NET_WIDTH, seed=3)
  state = numpy_state_dict(net)
  imported = weights.import_torchvision_resnet(variables, state, depth=18)
  stem_kernel = state["conv1.weight"].transpose(2, 3, 1, 0)
  for stem in ("stem_visible", "stem_infrared"):
    np.testing.assert_array_equal(imported["params"][stem]["conv1"]["kernel"], stem_kernel)
    np.testing.assert_array_equal(imported["params"][stem]["bn1"]["scale"], state["bn1.weight"])
    np.testing.assert_array_equal(imported["batch_stats"][stem]["bn1"]["var"],
                                  state["bn1.running_var"])
  np.testing.assert_array_equal(imported["params"]["layer3_0"]["downsample_conv"]["kernel"],
                                state["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(imported["batch_stats"]["layer2_1"]["bn2"]["mean"],
                                state["layer2.1.bn2.running_mean"])
  for name in ("gem", "bnneck", "non_local2_0", "non_local3_1"):
    for collection in ("params", "batch_stats"):
      if name in variables[collection]:
        _assert_trees_equal(imported[collection][name], variables[collection][name])
  leaves = jax.tree_util.tree_leaves(imported)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


def test_missing_and_unexpected_keys_are_listed(resnet18_variables):
  _, variables = resnet18_variables
  state = numpy_state_dict(make_torch_resnet(18, NET_WIDTH, seed=4))
  del state["layer2.0.downsample.0.weight"], state["bn1.running_var"]
  state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(weights.WeightsError) as error:
    weights.import_torchvision_resnet(variables, state, depth=18)
  message = str(error.value)
  assert "missing 2 ['bn1.running_var', 'layer2.0.downsample.0.weight']" in message
  assert "unexpected 1 ['layer5.0.conv1.weight']" in message


def test_shape_mismatch_names_parameter_and_shapes(resnet18_variables):
  _, variables = resnet18_variables
  state = numpy_state_dict(make_torch_resnet(18, 2 * NET_WIDTH, seed=5))
  with pytest.raises(weights.WeightsError,
                     match=r"conv1\.weight: file has \(16, 3, 7, 7\), the model expects "
                           r"\(8, 3, 7, 7\)"):
    weights.import_torchvision_resnet(variables, state, depth=18)


def test_depth_must_match_variables(resnet18_variables):
  _, variables = resnet18_variables
  state = numpy_state_dict(make_torch_resnet(50, NET_WIDTH, seed=6))
  with pytest.raises(weights.WeightsError, match="do not belong to a ResNet-50"):
    weights.import_torchvision_resnet(variables, state, depth=50)


def test_file_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nope.safetensors"):
    weights.load_state_dict(str(tmp_path / "nope.safetensors"))
  unknown = tmp_path / "weights.bin"
  unknown.write_bytes(b"\0")
  with pytest.raises(weights.WeightsError, match=r"unknown weights file extension '\.bin'"):
    weights.load_state_dict(str(unknown))
  nested = tmp_path / "checkpoint.pth"
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, nested)
  with pytest.raises(weights.WeightsError, match="neither a flat state dict"):
    weights.load_state_dict(str(nested))
  flat = tmp_path / "flat.pth"
  torch.save({"conv1.weight": torch.zeros(1)}, flat)
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(weights.WeightsError, match="needs torch: install torch .* convert"):
    weights.load_state_dict(str(flat))


def test_convert_cli_round_trip(tmp_path):
  net = make_torch_resnet(18, NET_WIDTH, seed=7)
  src, dst = tmp_path / "resnet.pth", tmp_path / "resnet.safetensors"
  torch.save(net.state_dict(), src)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "dakd_jax.models.weights", "convert", str(src), str(dst)],
      capture_output=True, text=True, env=env, check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "Warning" not in result.stderr, result.stderr  # runpy's double-import RuntimeWarning
  assert result.stdout.strip() == f"wrote {dst} (torchvision)"
  converted = load_file(str(dst))
  state = numpy_state_dict(net)
  assert converted.keys() == state.keys()
  for name in state:
    np.testing.assert_array_equal(converted[name], state[name], err_msg=name)
  assert weights.main(["convert", str(tmp_path / "missing.pth"), str(dst)]) == 1
  with pytest.raises(weights.WeightsError, match="must end in .safetensors"):
    weights.convert_to_safetensors(str(src), str(tmp_path / "out.npz"))
  with pytest.raises(weights.WeightsError, match=r"source must be a torch file"):
    weights.convert_to_safetensors(str(dst), str(tmp_path / "again.safetensors"))


def test_truncated_and_garbage_files_are_refused_with_one_line(tmp_path):
  state = numpy_state_dict(make_torch_resnet(18, NET_WIDTH, seed=8))
  whole = tmp_path / "whole.safetensors"
  save_file(state, str(whole))
  data = whole.read_bytes()
  for size in (len(data) - 100, 40, 3):
    truncated = tmp_path / f"cut{size}.safetensors"
    truncated.write_bytes(data[:size])
    for read in (weights.load_state_dict, weights.describe_weights_file):
      with pytest.raises(weights.WeightsError) as error:
        read(str(truncated))
      message = str(error.value)
      assert "\n" not in message and repr(str(truncated)) in message
      assert "not a readable .safetensors file" in message and "truncated" in message
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip archive" * 10)
  with pytest.raises(weights.WeightsError, match=r"garbage\.npz' is not a valid \.npz file"):
    weights.load_state_dict(str(garbage))
  archive = tmp_path / "archive.npz"
  np.savez(archive, **state)
  cut = tmp_path / "cut.npz"
  cut.write_bytes(archive.read_bytes()[:-200])
  with pytest.raises(weights.WeightsError, match=r"cut\.npz' is not a valid \.npz file") as error:
    weights.load_state_dict(str(cut))
  assert "pickled" not in str(error.value)
  bad_member = tmp_path / "bad_member.npz"
  with zipfile.ZipFile(bad_member, "w") as archive:
    archive.writestr("conv1.weight.npy", b"not an array")
  with pytest.raises(weights.WeightsError, match=r"bad_member\.npz' is not a valid \.npz file"):
    weights.load_state_dict(str(bad_member))
  objects = tmp_path / "objects.npz"
  np.savez(objects, names=np.array([{"a": 1}], dtype=object))
  with pytest.raises(weights.WeightsError, match="object arrays, which are never unpickled"):
    weights.load_state_dict(str(objects))


def test_torch_files_with_objects_or_damage_are_refused_without_unpickling(tmp_path):
  module_file = tmp_path / "whole_model.pth"
  torch.save(make_torch_resnet(18, NET_WIDTH, seed=9), module_file)
  with pytest.raises(weights.WeightsError) as error:
    weights.load_state_dict(str(module_file))
  message = str(error.value)
  assert repr(str(module_file)) in message and "\n" not in message
  assert "holds objects other than tensors" in message
  assert "TorchResNet" in message  # names the pickled class
  assert "model.state_dict()" in message and "dakd_jax.models.weights convert" in message
  assert "weights_only" not in message
  legacy = tmp_path / "legacy.pth"
  torch.save({"conv1.weight": torch.zeros(1), "opt": torch.nn.Linear(1, 1)}, legacy,
             _use_new_zipfile_serialization=False)
  with pytest.raises(weights.WeightsError, match="holds objects other than tensors, and"):
    weights.load_state_dict(str(legacy))
  flat = tmp_path / "flat.pth"
  torch.save({"conv1.weight": torch.zeros(3)}, flat)
  cut = tmp_path / "cut.pth"
  cut.write_bytes(flat.read_bytes()[:-300])
  with pytest.raises(weights.WeightsError, match=r"not a readable torch file .*truncated"):
    weights.load_state_dict(str(cut))
  garbage = tmp_path / "garbage.t"
  garbage.write_bytes(b"plain text, not torch" * 5)
  with pytest.raises(weights.WeightsError, match=r"garbage\.t' is not a torch\.save file"):
    weights.load_state_dict(str(garbage))


def test_safetensors_header_entries_must_be_ours(tmp_path):
  state = {"conv1.weight": np.zeros((2, 3, 7, 7), np.float32)}
  for header, message in (({"dakd_jax.kind": "teacher"}, r"dakd_jax\.kind header entry is "
                                                           r"'teacher', expected one of"),
                          ({"dakd_jax.metadata": "{epoch"}, r"dakd_jax\.metadata header entry "
                                                            r"is not JSON")):
    path = str(tmp_path / "header.safetensors")
    save_file(state, path, metadata=header)
    with pytest.raises(weights.WeightsError, match=message):
      weights.load_state_dict(path)
    with pytest.raises(weights.WeightsError, match=message):
      weights.describe_weights_file(path)
