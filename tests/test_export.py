"""Tests of dakd_jax/deploy: the extractor function, the ONNX and StableHLO files, the manifest,
verification and the missing-extra error.

The files are reloaded in a fresh Python process that blocks `dakd_jax` from importing, as a
service would load them, and compared with the JAX extractor for both modalities and two batch
sizes. The extractor itself is checked against `model.apply` on images normalised by NumPy here.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dakd_jax import deploy
from dakd_jax.deploy import export
from dakd_jax.deploy import extractor
from dakd_jax.deploy import onnx_export
from dakd_jax.deploy import verify
from dakd_jax.models import resnet

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEIGHT, WIDTH = 64, 48  # layer4 stays 4x3 with last stride 1
PRESETS = {"two_stream": True, "shared_stem": False}

# Loads both files with onnxruntime and jax.export only; dakd_jax is blocked on purpose.
LOADER = textwrap.dedent("""
    import json, os, sys
    sys.modules["dakd_jax"] = None
    import jax, numpy as np, onnxruntime
    out_dir, inputs_path, outputs_path = sys.argv[1:]
    with open(os.path.join(out_dir, "manifest.json")) as file:
      manifest = json.load(file)
    session = onnxruntime.InferenceSession(os.path.join(out_dir, manifest["files"]["onnx"]),
                                           providers=["CPUExecutionProvider"])
    with open(os.path.join(out_dir, manifest["files"]["stablehlo"]), "rb") as file:
      exported = jax.export.deserialize(bytearray(file.read()))
    names = [manifest["inputs"][key]["name"] for key in ("images", "modality")]
    inputs, results = np.load(inputs_path), {}
    for case in sorted({key.split("/")[0] for key in inputs.files}):
      images, modality = inputs[case + "/images"], inputs[case + "/modality"]
      feeds = dict(zip(names, (images, modality)))
      results[case + "/onnx"] = session.run([manifest["output"]["name"]], feeds)[0]
      results[case + "/stablehlo"] = np.asarray(exported.call(images, modality))
    np.savez(outputs_path, **results)
""")


def random_variables(model, seed):
  """Initial variables with every leaf perturbed, so that BN statistics, the non-local blocks
  (whose output BN starts at zero) and both stems all change the embedding. Kernels keep their
  scale (x(1 + 0.1 noise)) so activations stay of order one through the network."""
  variables = resnet.init_variables(model, jax.random.key(seed), (HEIGHT, WIDTH))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  perturbed = []
  for path, leaf in leaves:
    leaf, noise = np.asarray(leaf), rng.standard_normal(np.shape(leaf))
    if path[-1].key == "var":
      leaf = rng.uniform(0.5, 1.5, leaf.shape)
    elif path[-1].key == "kernel":
      leaf = leaf * (1 + 0.1 * noise)
    else:
      leaf = leaf + 0.1 * noise
    perturbed.append(leaf.astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, perturbed)


def small_model(modality_specific_stem):
  return resnet.create_model(10, 8, modality_specific_stem=modality_specific_stem, non_local=True)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def exported(request, tmp_path_factory):
  """One export per preset: (preset name, out_dir, model, variables, returned manifest)."""
  model = small_model(PRESETS[request.param])
  variables = random_variables(model, seed=1)
  out_dir = str(tmp_path_factory.mktemp(request.param))
  caller = {"checkpoint": "/runs/demo/student/best_7", "results": {"mAP": 12.5}}
  manifest = deploy.export_extractor(model, variables, image_height=HEIGHT, image_width=WIDTH,
                                     out_dir=out_dir, manifest=caller)
  return request.param, out_dir, model, variables, manifest


def test_extractor_function_matches_model_apply_on_numpy_normalised_images():
  model = small_model(True)
  variables = random_variables(model, seed=2)
  images = np.random.default_rng(0).integers(0, 256, (4, HEIGHT, WIDTH, 3), dtype=np.uint8)
  modality = np.array([0, 1, 1, 0], np.int32)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  normalised = ((images / 255.0 - mean) / std).astype(np.float32)
  features = np.asarray(model.apply(variables, normalised, modality, train=False)["features"])
  expected = features / np.linalg.norm(features, axis=1, keepdims=True)
  got = np.asarray(jax.jit(deploy.extractor_function(model, variables))(images, modality))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Per-sample routing: row i of a mixed batch equals the same image in a one-modality batch.
  extract = jax.jit(deploy.extractor_function(model, variables))
  visible = np.asarray(extract(images, np.zeros(4, np.int32)))
  infrared = np.asarray(extract(images, np.ones(4, np.int32)))
  np.testing.assert_allclose(got, np.where(modality[:, None] == 1, infrared, visible), atol=1e-6)
  assert np.abs(visible - infrared).max() > 1e-3


def test_extractor_function_flip_averages_the_mirror_and_runs_float32():
  model = small_model(True)
  variables = random_variables(model, seed=3)
  images = np.random.default_rng(1).integers(0, 256, (3, HEIGHT, WIDTH, 3), dtype=np.uint8)
  modality = np.array([1, 0, 1], np.int32)
  plain = jax.jit(deploy.extractor_function(model, variables))
  both = np.asarray(plain(images, modality)) + np.asarray(plain(images[:, :, ::-1], modality))
  expected = both / np.linalg.norm(both, axis=1, keepdims=True)
  bf16_model = model.clone(dtype=jnp.bfloat16)
  flipped = jax.jit(deploy.extractor_function(bf16_model, variables, use_flip=True))
  np.testing.assert_allclose(np.asarray(flipped(images, modality)), expected, atol=1e-5)


@pytest.mark.parametrize("window, strides, padding", [
    ((1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))),
    ((1, 2, 3, 1), (1, 1, 2, 1), ((0, 0), (0, 1), (2, 0), (0, 0))),
    ((2, 1, 1, 2), (2, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (1, 0))),
])
def test_max_of_slices_equals_reduce_window_max(window, strides, padding):
  x = jax.random.normal(jax.random.key(0), (4, 9, 8, 3))
  expected = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
  got = onnx_export.max_of_slices(x, window_dimensions=window, window_strides=strides,
                                  padding=padding, base_dilation=(1,) * 4,
                                  window_dilation=(1,) * 4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_evaluate_for_onnx_removes_nested_max_pools_and_keeps_values():
  pool = jax.jit(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
  function = lambda x: jnp.sin(pool(nn.relu(x)))  # relu is a custom_jvp call
  x = jax.random.normal(jax.random.key(1), (2, 7, 6, 5))
  closed = jax.make_jaxpr(function)(x)
  rewritten = lambda x: onnx_export.evaluate_for_onnx(closed.jaxpr, closed.consts, x)[0]

  def primitives(jaxpr):
    names = set()
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for inner in jax.extend.core.jaxprs_in_params(eqn.params):
        names |= primitives(inner)
    return names

  assert "reduce_window_max" in primitives(closed.jaxpr)
  assert "reduce_window_max" not in primitives(jax.make_jaxpr(rewritten)(x).jaxpr)
  np.testing.assert_array_equal(np.asarray(rewritten(x)), np.asarray(function(x)))


@pytest.mark.slow
def test_files_reload_in_a_fresh_process_and_match_the_jax_extractor(exported, tmp_path):
  preset, out_dir, model, variables, _ = exported
  rng = np.random.default_rng(5)
  cases = {}
  for batch in (2, 5):
    images = rng.integers(0, 256, (batch, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for name, modality in (("visible", np.zeros(batch)), ("infrared", np.ones(batch)),
                           ("mixed", np.arange(batch) % 2)):
      cases[f"{name}_{batch}"] = (images, modality.astype(np.int32))
  np.savez(tmp_path / "inputs.npz", **{f"{case}/{part}": array for case, pair in cases.items()
                                       for part, array in zip(("images", "modality"), pair)})
  env = dict(os.environ, PYTHONPATH="", JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", LOADER, out_dir, str(tmp_path / "inputs.npz"),
                  str(tmp_path / "outputs.npz")], check=True, env=env, cwd=tmp_path, timeout=300)
  outputs = np.load(tmp_path / "outputs.npz")
  extract = jax.jit(deploy.extractor_function(model, variables))
  for case, (images, modality) in cases.items():
    expected = np.asarray(extract(images, modality))
    for artefact in ("onnx", "stablehlo"):
      got = outputs[f"{case}/{artefact}"]
      assert got.dtype == np.float32 and got.shape == (len(images), 64), (case, artefact)
      np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{case} {artefact}")
  # The modality input reaches the files' stems: it matters for two stems and only then.
  for artefact in ("onnx", "stablehlo"):
    gap = np.abs(outputs[f"visible_5/{artefact}"] - outputs[f"infrared_5/{artefact}"]).max()
    assert (gap > 1e-3) if preset == "two_stream" else (gap == 0.0), (artefact, gap)


def test_manifest_describes_the_files(exported):
  _, out_dir, model, _, returned = exported
  with open(os.path.join(out_dir, "manifest.json")) as file:
    manifest = json.load(file)
  assert manifest == returned
  assert manifest["checkpoint"] == "/runs/demo/student/best_7"
  assert manifest["results"] == {"mAP": 12.5}
  assert manifest["inputs"] == {
      "images": {"name": "images", "shape": ["batch", HEIGHT, WIDTH, 3], "dtype": "uint8",
                 "layout": "NHWC", "channels": "RGB"},
      "modality": {"name": "modality", "shape": ["batch"], "dtype": "int32"}}
  assert manifest["output"]["name"] == "embedding"
  assert manifest["normalization"]["mean"] == [0.485, 0.456, 0.406]
  assert manifest["normalization"]["std"] == [0.229, 0.224, 0.225]
  assert manifest["modality_codes"] == {"visible": 0, "infrared": 1}
  assert manifest["embedding_width"] == 8 * 8  # ResNet-10 width 8: 8 * width channels
  assert manifest["model"]["modality_specific_stem"] == model.modality_specific_stem
  assert manifest["versions"]["jax"] == jax.__version__
  for name in ("flax", "onnx", "onnxruntime", "jax2onnx"):
    assert manifest["versions"][name]
  assert sorted(manifest["verification"]["max_abs_diff"]) == ["extractor.onnx",
                                                               "extractor.stablehlo"]
  assert sorted(os.listdir(out_dir)) == ["extractor.onnx", "extractor.stablehlo", "manifest.json"]


def test_verification_names_a_file_that_computes_another_function(exported, tmp_path):
  _, out_dir, model, variables, _ = exported
  other = random_variables(model, seed=9)
  images = verify.random_verification_images(3, HEIGHT, WIDTH)
  extract = deploy.extractor_function(model, variables)
  for artefact in ("extractor.onnx", "extractor.stablehlo"):
    tampered = str(tmp_path / artefact)
    shutil.copytree(out_dir, tampered)
    specs = extractor.input_specs(HEIGHT, WIDTH)
    wrong = deploy.extractor_function(model, other)
    data = (onnx_export.convert_to_onnx(wrong, specs) if artefact.endswith("onnx")
            else export.stablehlo_bytes(wrong, specs, ("cpu",)))
    with open(os.path.join(tampered, artefact), "wb") as file:
      file.write(data)
    with pytest.raises(deploy.ExportError, match=rf"{artefact} differs .* > tolerance") as error:
      deploy.verify_export(tampered, extract, images)
    untouched = "extractor.stablehlo" if artefact.endswith("onnx") else "extractor.onnx"
    assert f"{untouched} differs" not in str(error.value)


def test_failed_verification_writes_no_manifest(tmp_path, monkeypatch, capsys):
  """...and, with the output in a file, the export said what it was doing while it ran (a
  conversion slowed down here to outlast the progress interval) and ended its lines."""
  model = small_model(False)
  variables = random_variables(model, seed=4)
  other = random_variables(model, seed=5)
  convert = onnx_export.convert_to_onnx

  def slow_wrong_convert(extract, specs):
    del extract
    time.sleep(0.5)
    # A converter that writes another network's graph must fail the export.
    return convert(deploy.extractor_function(model, other), specs)
  monkeypatch.setattr(onnx_export, "convert_to_onnx", slow_wrong_convert)
  monkeypatch.setenv("DAKD_PROGRESS_EVERY_S", "0.1")
  (tmp_path / "manifest.json").write_text("{}")  # stale, from an earlier export
  with pytest.raises(deploy.ExportError, match="extractor.onnx differs.*no manifest.json written"):
    deploy.export_extractor(model, variables, image_height=HEIGHT, image_width=WIDTH,
                            out_dir=str(tmp_path), manifest={}, verify_count=2)
  assert not (tmp_path / "manifest.json").exists()
  lines = capsys.readouterr().err.strip().splitlines()
  assert sum(line.startswith("dakd_jax: export: ONNX conversion | elapsed 0:00:0")
             for line in lines) >= 2
  assert re.fullmatch(r"dakd_jax: export: done in 0:00:\d\d", lines[-1])


def test_bad_arguments_name_the_field(tmp_path):
  model = small_model(False)
  arguments = dict(image_height=HEIGHT, image_width=WIDTH, out_dir=str(tmp_path), manifest={})
  with pytest.raises(ValueError, match=r"verify_images must be uint8 \[n, 64, 48, 3\]"):
    deploy.export_extractor(model, {}, **arguments,
                            verify_images=np.zeros((2, 48, 64, 3), np.uint8))
  with pytest.raises(ValueError, match=r"verify_modality must be \[2\] codes.*values \[0 2\]"):
    export.export_extractor(model, {}, **arguments, verify_modality=np.array([0, 2]),
                            verify_images=np.zeros((2, HEIGHT, WIDTH, 3), np.uint8))
  with pytest.raises(ValueError, match="manifest must hold JSON values"):
    deploy.export_extractor(model, {}, **dict(arguments, manifest={"checkpoint": object()}))
  with pytest.raises(ValueError, match=r"manifest keys \['versions'\]"):
    export.build_manifest({"versions": 1}, image_height=1, image_width=1, embedding_width=1,
                          model=model, use_flip=False, platforms=("cpu",), verification={})


def test_missing_extra_gives_one_line_error_naming_it():
  child = textwrap.dedent("""
      import sys
      for name in ("jax2onnx", "onnx", "onnxruntime"):
        sys.modules[name] = None
      from dakd_jax import deploy  # importable without the extra
      messages = []
      for name in ("jax2onnx", "onnx", "onnxruntime"):
        for other in ("jax2onnx", "onnx", "onnxruntime"):
          sys.modules.pop(other, None)
        sys.modules[name] = None
        try:
          deploy.export_extractor(None, None, image_height=64, image_width=48, out_dir="/x",
                                  manifest={})
        except deploy.ExportError as error:
          messages.append(str(error))
      print("\\n".join(messages))
  """)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env=env, check=True, timeout=300)
  expected = ("stage=export needs the optional packages jax2onnx, onnx and onnxruntime: "
              "pip install -e '.[export]'")
  assert result.stdout.splitlines() == [expected] * 3
  with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as file:
    extra = tomllib.load(file)["project"]["optional-dependencies"]["export"]
  assert sorted(requirement.split(">=")[0] for requirement in extra) == [
      "jax2onnx", "onnx", "onnxruntime"]
