"""ImageNet weight import: parity with a torchvision-named torch ResNet, file formats, errors, CLI.

The torch network below is written here with torchvision's module and parameter names (torchvision
itself is not importable in this environment) and last stride 1. Random weights and random BN
running statistics make the eval-mode comparison sensitive to every imported tensor.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dakd_jax.models import resnet
from dakd_jax.models import weights

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 64, 48  # layer4 map 4 x 3
NET_WIDTH = 8


class TorchBasicBlock(torch.nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + shortcut)


class TorchBottleneck(torch.nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    shortcut = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + shortcut)


class TorchResNet(torch.nn.Module):
  """torchvision ResNet layout with last stride 1; forward returns the layer4 map (NCHW)."""

  def __init__(self, depth, width):
    super().__init__()
    block = TorchBottleneck if depth == 50 else TorchBasicBlock
    sizes = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(width)
    self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    self.inplanes = width
    for stage, (count, stride) in enumerate(zip(sizes, (1, 2, 2, 1)), start=1):
      setattr(self, f"layer{stage}", self._layer(block, width * 2 ** (stage - 1), count, stride))
    self.fc = torch.nn.Linear(self.inplanes, 10)

  def _layer(self, block, planes, count, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = torch.nn.Sequential(
          torch.nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          torch.nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes, 1, None) for _ in range(1, count)]
    return torch.nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def make_torch_resnet(depth, width, seed):
  """Random conv weights (He normal) and random BN affine parameters and running statistics."""
  torch.manual_seed(seed)
  net = TorchResNet(depth, width)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
        module.num_batches_tracked.fill_(7)
  return net.eval()


def numpy_state_dict(net):
  return {name: value.detach().numpy().copy() for name, value in net.state_dict().items()}


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
  with pytest.raises(weights.WeightsError, match="not a flat state dict"):
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
  converted = load_file(str(dst))
  state = numpy_state_dict(net)
  assert converted.keys() == state.keys()
  for name in state:
    np.testing.assert_array_equal(converted[name], state[name], err_msg=name)
  assert weights.main(["convert", str(tmp_path / "missing.pth"), str(dst)]) == 1
  with pytest.raises(weights.WeightsError, match="must end in .safetensors"):
    weights.convert_pth_to_safetensors(str(src), str(tmp_path / "out.npz"))
