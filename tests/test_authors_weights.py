"""The authors' released checkpoints: embeddings equal to a torch network of their layout, file
layouts and metadata, every refusal, a pickled callable that never runs, the convert CLI.

The torch network (tests/torch_resnet.py `AuthorsNetwork`) has the authors' parameter names: a
real ResNet-50 of width 64, last stride 1, non-local blocks, GeM with p = 2.6, BNNeck with zero
shift, random weights and BN statistics; the teacher also has class-centre memories. It is saved
as the authors did: a teacher `.t` dict with numpy metrics (numpy 1.26 module names, tensors
tagged as saved on a GPU), a student `.pth` dict with 'ablation'/'config', and a flat state dict
under `module.`. Inputs are 96 x 48 (layer4 map 6 x 3).

Our models are built from `jax.eval_shape` shapes, not initialised: an authors' file fills every
leaf, and `apply` would fail on a leaf the import left abstract.
"""
import builtins
import copy
import json
import os
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from dakd_jax.models import resnet
from dakd_jax.models import weights
from tests.torch_resnet import make_authors_network
from tests.torch_resnet import make_torch_resnet
from tests.torch_resnet import numpy_state_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 96, 48
NET_WIDTH = 64
GEM_P = 2.6
TOLERANCE = 1e-4  # max |ours - torch| / max |torch| of the unit embeddings
TEACHER_METADATA = {"epoch": 79, "mAP": np.float64(0.6731), "mINP": np.float64(0.5012),
                    "cmc": np.linspace(0.7, 0.99, 20).astype(np.float32)}
STUDENT_METADATA = {"epoch": 59, "mAP": np.float64(0.7125),
                    "cmc": np.linspace(0.72, 0.995, 20).astype(np.float32),
                    "ablation": {"use_ikd": True, "use_ckd": True},
                    "config": {"dataset": "sysu", "lr": 0.1, "temperatures": [4, 3, 5, 2, 6]}}


def abstract_model(depth=50, **kwargs):
  """The model and the shapes of its variables (nothing computed)."""
  model = resnet.create_model(depth, NET_WIDTH, **kwargs)
  shapes = jax.eval_shape(lambda: resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH)))
  return model, shapes


def released_model():
  return abstract_model(modality_specific_stem=False, non_local=True)


def respell_for_numpy1(path):
  """Rewrites the pickle of a torch zip file with numpy 1.26's module names."""
  with zipfile.ZipFile(path) as archive:
    entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in entries:
      if name.endswith("/data.pkl"):
        assert b"numpy._core.multiarray\n" in data
        data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
      archive.writestr(name, data)


def pickle_bytes(path):
  with zipfile.ZipFile(path) as archive:
    return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.fixture(scope="module")
def torch_net():
  return make_authors_network(NET_WIDTH, seed=0, gem_p=GEM_P, memory_classes=5)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(4, HEIGHT, WIDTH, 3)).astype(np.float32)


def torch_embeddings(net, images):
  with torch.no_grad():
    return net(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()


@pytest.fixture(scope="module")
def expected(torch_net, images):
  """The torch network's embeddings, computed in float64 so that the comparison measures our
  float32 error (about 3e-6 here) rather than torch's own float32 error (about 2e-5)."""
  with torch.no_grad():
    net64 = copy.deepcopy(torch_net).double()
    return net64(torch.from_numpy(images.transpose(0, 3, 1, 2)).double()).numpy()


@pytest.fixture(scope="module")
def files(torch_net, tmp_path_factory):
  """{'teacher_t', 'student_pth', 'flat_pth'}: the three layouts of the same network."""
  directory = tmp_path_factory.mktemp("authors")
  state = torch_net.state_dict()
  network = {name: value for name, value in state.items() if not name.startswith("memory")}
  paths = {"teacher_t": str(directory / "teacher_best.t"),
           "student_pth": str(directory / "student_best.pth"),
           "flat_pth": str(directory / "flat.pth")}
  with pytest.MonkeyPatch.context() as patch:  # As if the tensors had been saved on a GPU.
    patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save({"net": state, **TEACHER_METADATA}, paths["teacher_t"])
  respell_for_numpy1(paths["teacher_t"])
  torch.save({"net": network, **STUDENT_METADATA}, paths["student_pth"])
  torch.save({f"module.{name}": value for name, value in network.items()}, paths["flat_pth"])
  return paths


@pytest.fixture(scope="module")
def released_embed():
  model, shapes = released_model()
  return shapes, jax.jit(lambda v, x, m: model.apply(v, x, m, train=False)["embedding"])


def assert_embeddings_match(actual, expected):
  error = np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected))
  assert error <= TOLERANCE, f"relative error {error:.2e}"


def assert_trees_equal(left, right):
  flat_left, flat_right = traverse_util.flatten_dict(left), traverse_util.flatten_dict(right)
  assert flat_left.keys() == flat_right.keys()
  for path in flat_left:
    np.testing.assert_array_equal(flat_left[path], flat_right[path], err_msg=str(path))


def test_files_are_written_as_the_authors_did(files):
  teacher = pickle_bytes(files["teacher_t"])
  assert b"numpy.core.multiarray\n" in teacher and b"numpy._core" not in teacher
  assert b"cuda:0" in teacher
  assert b"numpy._core.multiarray\n" in pickle_bytes(files["student_pth"])


@pytest.mark.parametrize("layout, kind", [("teacher_t", "authors_teacher"),
                                          ("student_pth", "authors_student"),
                                          ("flat_pth", "authors_network")])
def test_released_files_give_the_torch_embeddings(layout, kind, files, expected, images,
                                                  released_embed):
  shapes, embed = released_embed
  notes = []
  variables = weights.load_pretrained(shapes, files[layout], depth=50, log=notes.append)
  assert notes == []  # one stem, nothing copied
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(variables))
  assert weights.describe_weights_file(files[layout]) == kind
  modality = np.zeros(len(images), np.int32)
  assert_embeddings_match(embed(variables, images, modality), expected)


def test_reference_embeddings_depend_on_non_local_gem_and_bnneck(torch_net, images, expected):
  """Guards the parity test: each authors-only layer moves the embeddings far beyond TOLERANCE."""
  reference = torch_embeddings(torch_net, images)
  assert_embeddings_match(reference, expected)  # float32 and float64 torch agree
  scale = np.max(np.abs(reference))
  edits = {"backbone.NL_3.2.W.1.weight": 0.0, "backbone.NL_2.0.W.1.bias": 0.0,
           "backbone.pool.p": 3.0, "bn_neck.running_mean": 0.0}
  for name, value in edits.items():
    changed = copy.deepcopy(torch_net)
    with torch.no_grad():
      changed.state_dict()[name].fill_(value)
    difference = np.max(np.abs(torch_embeddings(changed, images) - reference)) / scale
    assert difference > 100 * TOLERANCE, name


def test_every_tensor_lands_on_its_named_leaf(torch_net):
  """Also catches swaps the forward pass cannot see (phi and g enter as a symmetric product)."""
  state = numpy_state_dict(torch_net)
  _, shapes = released_model()
  variables = weights.import_authors_network(shapes, state, depth=50)
  params, stats = variables["params"], variables["batch_stats"]
  hwio = lambda name: state[name].transpose(2, 3, 1, 0)
  for torch_block, ours in (("NL_2.0", "non_local2_2"), ("NL_2.1", "non_local2_3"),
                            ("NL_3.0", "non_local3_3"), ("NL_3.2", "non_local3_5")):
    prefix = f"backbone.{torch_block}"
    for torch_conv, flax_conv in (("theta", "theta"), ("phi", "phi"), ("g.0", "val"),
                                  ("W.0", "out")):
      np.testing.assert_array_equal(params[ours][flax_conv]["kernel"],
                                    hwio(f"{prefix}.{torch_conv}.weight"))
      np.testing.assert_array_equal(params[ours][flax_conv]["bias"],
                                    state[f"{prefix}.{torch_conv}.bias"])
    np.testing.assert_array_equal(params[ours]["out_bn"]["scale"], state[f"{prefix}.W.1.weight"])
    np.testing.assert_array_equal(params[ours]["out_bn"]["bias"], state[f"{prefix}.W.1.bias"])
    np.testing.assert_array_equal(stats[ours]["out_bn"]["var"],
                                  state[f"{prefix}.W.1.running_var"])
  assert params["gem"]["p"].shape == () and float(params["gem"]["p"]) == np.float32(GEM_P)
  np.testing.assert_array_equal(params["bnneck"]["scale"], state["bn_neck.weight"])
  np.testing.assert_array_equal(stats["bnneck"]["mean"], state["bn_neck.running_mean"])
  np.testing.assert_array_equal(stats["bnneck"]["var"], state["bn_neck.running_var"])
  np.testing.assert_array_equal(params["stem"]["conv1"]["kernel"], hwio("backbone.conv1.weight"))
  np.testing.assert_array_equal(stats["layer4_0"]["downsample_bn"]["mean"],
                                state["backbone.layer4.0.downsample.1.running_mean"])
  # A zero BNNeck shift is accepted, and so is none at all.
  del state["bn_neck.bias"]
  assert_trees_equal(weights.import_authors_network(shapes, state, depth=50), variables)


def test_two_stream_model_gets_the_stem_in_both_stems(files, torch_net, images, expected):
  model, shapes = abstract_model(modality_specific_stem=True, non_local=True)
  notes = []
  variables = weights.load_pretrained(shapes, files["teacher_t"], depth=50, log=notes.append)
  assert len(notes) == 1
  assert "copied it into stem_infrared and stem_visible" in notes[0]
  assert files["teacher_t"] in notes[0]
  kernel = numpy_state_dict(torch_net)["backbone.conv1.weight"].transpose(2, 3, 1, 0)
  for stem in ("stem_visible", "stem_infrared"):
    np.testing.assert_array_equal(variables["params"][stem]["conv1"]["kernel"], kernel)
  assert_trees_equal(variables["batch_stats"]["stem_visible"],
                     variables["batch_stats"]["stem_infrared"])
  modality = np.array([0, 1, 1, 0], np.int32)
  outputs = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))(variables, images,
                                                                        modality)
  assert_embeddings_match(outputs["embedding"], expected)


def test_metadata_is_json_and_kinds_are_told_apart(files, tmp_path):
  teacher = weights.read_checkpoint_metadata(files["teacher_t"])
  assert teacher.keys() == {"epoch", "mAP", "mINP", "cmc"}
  assert teacher["epoch"] == 79 and type(teacher["epoch"]) is int
  assert teacher["mAP"] == 0.6731 and teacher["mINP"] == 0.5012
  assert teacher["cmc"] == TEACHER_METADATA["cmc"].tolist()
  assert json.loads(json.dumps(teacher)) == teacher
  student = weights.read_checkpoint_metadata(files["student_pth"])
  assert student.keys() == {"epoch", "mAP", "cmc", "ablation", "config"}
  assert student["ablation"] == STUDENT_METADATA["ablation"]
  assert isinstance(student["config"], str)
  assert json.loads(student["config"]) == STUDENT_METADATA["config"]
  assert weights.read_checkpoint_metadata(files["flat_pth"]) == {}
  torchvision = tmp_path / "resnet18.safetensors"
  save_file(numpy_state_dict(make_torch_resnet(18, 8, seed=1)), str(torchvision))
  assert weights.describe_weights_file(str(torchvision)) == "torchvision"
  assert weights.read_checkpoint_metadata(str(torchvision)) == {}
  native = tmp_path / "native.npz"
  np.savez(native, **{"params/gem/p": np.float32(3.0)})
  assert weights.describe_weights_file(str(native)) == "native"


def _edited(state, drop=(), add=None):
  edited = {name: value for name, value in state.items() if not name.startswith(drop)}
  edited.update(add or {})
  return edited


REFUSALS = {
    "missing": (dict(drop=("backbone.NL_3.2.W.1.running_var",)), {},
                r"missing 1 \['NL_3\.2\.W\.1\.running_var'\], unexpected 0"),
    "unexpected": (dict(add={"backbone.layer2.0.conv4.weight": np.zeros((1,), np.float32)}), {},
                   r"missing 0 \[\], unexpected 1 \['backbone\.layer2\.0\.conv4\.weight'\]"),
    "shape": (dict(add={"bn_neck.weight": np.ones((1024,), np.float32)}), {},
              r"shape mismatch for bn_neck\.weight: file has \(1024,\), the model expects "
              r"\(2048,\)"),
    "non_local_shape": (dict(add={"backbone.NL_2.1.theta.weight": np.ones((2, 512, 1, 1),
                                                                          np.float32)}), {},
                        r"shape mismatch for backbone\.NL_2\.1\.theta\.weight: file has "
                        r"\(2, 512, 1, 1\)"),
    "bnneck_bias": (dict(add={"bn_neck.bias": np.full((2048,), 0.01, np.float32)}), {},
                    r"bn_neck\.bias is not zero \(max \|bias\| 0\.01\)"),
    "duplicate": (dict(add={"conv1.weight": np.ones((64, 3, 7, 7), np.float32)}), {},
                  r"holds both 'backbone\.conv1\.weight' and 'conv1\.weight'"),
    "file_without_non_local": (dict(drop=("backbone.NL_",)), {},
                               r"has no non-local blocks .*model\.non_local=True\): build it "
                               r"with model\.non_local=False"),
    "model_without_non_local": ({}, dict(non_local=False),
                                r"has non-local blocks \(NL_2\.0, NL_2\.1, NL_3\.0, NL_3\.1, "
                                r"NL_3\.2\) but the model has none"),
    "depth": ({}, dict(depth=18),
              r"holds a ResNet-50 \(bottleneck blocks, \(3, 4, 6, 3\) per stage\) but the "
              r"model is a ResNet-18: set model\.depth=50"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_key(case, torch_net, tmp_path):
  edit, model_kwargs, message = REFUSALS[case]
  path = str(tmp_path / "authors.safetensors")
  save_file(_edited(numpy_state_dict(torch_net), **edit), path)
  depth = model_kwargs.pop("depth", 50)
  _, shapes = abstract_model(depth, **{"modality_specific_stem": False, "non_local": True,
                                       **model_kwargs})
  with pytest.raises(weights.WeightsError, match=message) as error:
    weights.load_pretrained(shapes, path, depth=depth)
  assert path in str(error.value) and "\n" not in str(error.value)


class OpensAFile:
  """Unpickles to open(marker, 'w'): creating the marker would prove that the file ran code."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_callable_is_refused_and_never_runs(zip_format, tmp_path):
  marker = tmp_path / "marker"
  path = str(tmp_path / "evil_best.t")
  torch.save({"net": {"bn_neck.weight": torch.ones(4)}, "epoch": OpensAFile(str(marker))}, path,
             _use_new_zipfile_serialization=zip_format)
  readers = (lambda: weights.load_pretrained({}, path, depth=50),
             lambda: weights.read_checkpoint_metadata(path),
             lambda: weights.describe_weights_file(path),
             lambda: weights.convert_to_safetensors(path, str(tmp_path / "out.safetensors")))
  for read in readers:
    with pytest.raises(weights.WeightsError, match="holds objects other than tensors") as error:
      read()
    assert "weights_only" not in str(error.value)
    if zip_format:
      assert "(io.open)" in str(error.value)
  assert not marker.exists()
  assert not os.path.exists(tmp_path / "out.safetensors")


def test_convert_round_trip_loads_the_same_without_torch(files, tmp_path, monkeypatch):
  src, dst = files["teacher_t"], str(tmp_path / "teacher.safetensors")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "dakd_jax.models.weights", "convert", src, dst],
      capture_output=True, text=True, env=env, check=False, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "Warning" not in result.stderr, result.stderr
  assert result.stdout.strip() == f"wrote {dst} (authors_teacher)"
  names = set(load_file(dst))
  assert not any("memory" in name or "num_batches_tracked" in name for name in names)
  student = str(tmp_path / "student.safetensors")
  assert weights.convert_to_safetensors(files["student_pth"], student) == "authors_student"
  _, shapes = released_model()
  expected = {path: (weights.load_pretrained(shapes, path, depth=50),
                     weights.read_checkpoint_metadata(path), weights.describe_weights_file(path))
              for path in (src, files["student_pth"])}
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  for original, converted in ((src, dst), (files["student_pth"], student)):
    variables, metadata, kind = expected[original]
    assert_trees_equal(weights.load_pretrained(shapes, converted, depth=50), variables)
    assert weights.read_checkpoint_metadata(converted) == metadata
    assert weights.describe_weights_file(converted) == kind
