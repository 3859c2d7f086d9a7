"""ReIDResNet: routing of the two stems, masked stem BN, non-local block, GeM, BNNeck, bf16.

Small ResNet-18 (width 8) on 64 x 48 inputs (layer4 map 4 x 3). Expectations are NumPy
re-statements of method.md 2.1-2.3 written here, or invariants (per-sample routing).
"""
import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dakd_jax.models import batch_norm
from dakd_jax.models import conv
from dakd_jax.models import resnet

HEIGHT, WIDTH = 64, 48
EPS = 1e-5
MODALITY = np.array([0, 1, 1, 0], np.int32)


def randomise(variables, seed):
  """Random BN affine parameters and running statistics (non-local output BNs become non-zero)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(variables)
  for path, value in flat.items():
    shape = value.shape
    if path[-1] == "mean":
      flat[path] = jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
    elif path[-1] == "var":
      flat[path] = jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
    elif path[-1] == "scale":
      flat[path] = jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    elif path[-1] == "bias" and path[-2].endswith(("bn", "bn1", "bn2", "bn3")):
      flat[path] = jnp.asarray(rng.normal(0.0, 0.1, shape), jnp.float32)
  return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def net():
  model = resnet.create_model(18, 8)
  variables = resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH))
  images = np.random.default_rng(1).normal(size=(4, HEIGHT, WIDTH, 3)).astype(np.float32)
  return model, variables, randomise(variables, 2), images


def make_eval(model):
  return jax.jit(lambda v, x, m: model.apply(v, x, m, train=False, return_feature_map=True))


def make_train(model):
  return jax.jit(lambda v, x, m: model.apply(v, x, m, train=True, mutable=["batch_stats"]))


def numpy_gem(x, p, eps=1e-6):
  return np.mean(np.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def test_init_variables_under_eval_shape_matches_concrete_init(net):
  model, variables, _, _ = net
  key = jax.random.key(0)
  for make in (lambda: resnet.init_variables(model, key, (HEIGHT, WIDTH, 3)),
               lambda: resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH))):
    abstract = jax.eval_shape(make)
    shape_of = lambda leaf: (leaf.shape, leaf.dtype)
    assert (jax.tree_util.tree_map(shape_of, abstract)
            == jax.tree_util.tree_map(shape_of, variables))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))


def test_init_compiles_once_per_network_and_image_size(net):
  """A run initialises the same network several times (stages, evaluations): one program per
  network and image size serves them all, whatever the key (on CPU, the unoptimised one); the
  values are model.init's."""
  model, variables, _, _ = net
  other_size = (HEIGHT + 32, WIDTH)
  for key, size in ((1, (HEIGHT, WIDTH)), (3, other_size)):
    again = resnet.init_variables(resnet.create_model(18, 8), jax.random.key(key), size)
  programs = resnet._jit_init_unoptimised._cache_size()  # pylint: disable=protected-access
  # An equal network built again, other keys, both sizes: no new program.
  resnet.init_variables(resnet.create_model(18, 8), jax.random.key(4), (HEIGHT, WIDTH))
  resnet.init_variables(model, jax.random.key(5), other_size)
  assert resnet._jit_init_unoptimised._cache_size() == programs  # pylint: disable=protected-access
  images = jnp.zeros((2, *other_size, 3))
  # Compiled unoptimised too: LLVM's optimisation of the PRNG code is 10 s here and changes no
  # value that the tolerance below could see.
  expected = jax.jit(lambda key: model.init(key, images, jnp.array([0, 1]), train=False),
                     compiler_options={"xla_backend_optimization_level": 0})(jax.random.key(3))
  jax.tree.map(lambda e, a: np.testing.assert_allclose(e, a, rtol=1e-6, atol=1e-7),
               expected, again)
  assert jax.tree.structure(again) == jax.tree.structure(variables)


def test_output_shapes_follow_last_stride_and_pooled_is_gem_of_map(net):
  model, _, variables, images = net
  assert resnet.output_features(50, 64) == 2048
  assert resnet.output_features(18, 64) == 512
  out = make_eval(model)(variables, images, MODALITY)
  assert out["feature_map"].shape == (4, HEIGHT // 16, WIDTH // 16, 64)
  np.testing.assert_allclose(out["pooled"], numpy_gem(np.asarray(out["feature_map"]), 3.0),
                             rtol=1e-5)
  strided = resnet.create_model(18, 8, last_stride=2)
  out2 = make_eval(strided)(variables, images, MODALITY)
  # 48 px: 24 (conv1) -> 12 (pool) -> 6 -> 3 -> 2 with a stride-2 layer4 (3x3, pad 1).
  assert out2["feature_map"].shape == (4, 2, 2, 64)


def test_mixed_batch_routes_each_sample_to_its_own_stem(net):
  model, _, variables, images = net
  run = make_eval(model)
  mixed = run(variables, images, MODALITY)
  visible = run(variables, images, np.zeros(4, np.int32))
  infrared = run(variables, images, np.ones(4, np.int32))
  for key in ("features", "embedding", "pooled"):
    expected = np.where(MODALITY[:, None] == 1, infrared[key], visible[key])
    np.testing.assert_allclose(mixed[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
  # The stems really differ, so the check above is not vacuous.
  assert np.abs(np.asarray(visible["features"] - infrared["features"])).max() > 1e-2


def test_stems_are_separate_and_later_layers_shared(net):
  model, _, variables, images = net
  params = variables["params"]
  assert {"stem_visible", "stem_infrared"} <= params.keys() and "stem" not in params
  assert not any(name.startswith("layer1_0") and name != "layer1_0" for name in params)

  @jax.jit
  def grads(params, modality):
    def loss(params):
      out, _ = model.apply({**variables, "params": params}, images, modality, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(out["features"] * jnp.arange(out["features"].shape[1]))
    return jax.grad(loss)(params)

  def norm(tree):
    return float(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))

  for own, other, code in (("stem_visible", "stem_infrared", 0),
                           ("stem_infrared", "stem_visible", 1)):
    g = grads(params, np.full(4, code, np.int32))
    assert norm(g[other]) == 0.0, other
    assert norm(g[own]) > 0.0 and norm(g["layer1_0"]) > 0.0


def test_stem_bn_statistics_come_from_own_samples_only(net):
  model, _, variables, images = net

  @jax.jit
  def run(variables, modality):
    is_stem_conv = lambda mdl, _: isinstance(mdl.parent, resnet.Stem) and mdl.name == "conv1"
    return model.apply(variables, images, modality, train=True,
                       mutable=["batch_stats", "intermediates"], capture_intermediates=is_stem_conv)

  _, state = run(variables, MODALITY)
  for stem, code in (("stem_visible", 0), ("stem_infrared", 1)):
    conv = np.asarray(state["intermediates"][stem]["conv1"]["__call__"][0])[MODALITY == code]
    old = variables["batch_stats"][stem]["bn1"]
    new = state["batch_stats"][stem]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv.mean(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv.var(axis=(0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
  _, state = run(variables, np.zeros(4, np.int32))
  np.testing.assert_array_equal(state["batch_stats"]["stem_infrared"]["bn1"]["mean"],
                                variables["batch_stats"]["stem_infrared"]["bn1"]["mean"])
  np.testing.assert_array_equal(state["batch_stats"]["stem_infrared"]["bn1"]["var"],
                                variables["batch_stats"]["stem_infrared"]["bn1"]["var"])
  assert np.abs(np.asarray(state["batch_stats"]["stem_visible"]["bn1"]["mean"]
                           - variables["batch_stats"]["stem_visible"]["bn1"]["mean"])).max() > 1e-3


class StemRouting(nn.Module):
  """The network's stems and max-pool alone (resnet._stem_and_pool), under the CPU setting:
  `runs` None routes by masks, static_modality_runs(...) routes each stem to its images."""
  dtype: jnp.dtype = jnp.float64

  @nn.compact
  def __call__(self, images, modality, train, groups, runs):
    model = resnet.create_model(18, 4, dtype=self.dtype, conv_backward="custom")
    return resnet._stem_and_pool(  # pylint: disable=protected-access
        model, images, modality, train, groups, conv.conv_general_dilated_for("custom"),
        "custom", runs)


@pytest.mark.parametrize("codes, groups", [
    ([0, 1], 1), ([0, 1, 1, 0, 0, 0], 1), ([1, 1, 0, 0], 2), ([0, 0, 1, 1, 0, 0], 3),
    ([0, 0, 0], 1), ([1, 1], 2)])
def test_static_codes_route_each_stem_to_its_own_images_as_the_masks_do(codes, groups):
  """Values, gradients (parameters and images) and running averages of the static routing
  equal the masked one's (float64, random BN), including the teacher's [V; I; V] layout, BN
  groups of one modality each, and a batch with a single modality (the other stem untouched).
  """
  with jax.enable_x64(True):
    codes = np.asarray(codes, np.int32)
    rng = np.random.default_rng(len(codes) + groups)
    images = jnp.asarray(rng.normal(size=(len(codes), 16, 12, 3)))
    module = StemRouting()
    variables = module.init(jax.random.key(0), images, jnp.asarray([0, 1] * (len(codes) // 2)
                                                                    + [0] * (len(codes) % 2)),
                            False, 1, None)
    variables = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape)) * 0.3,
                             variables)
    upstream = jnp.asarray(rng.normal(size=(len(codes), 4, 3, 4)))
    runs = resnet.static_modality_runs(codes, groups)
    assert runs is not None and sum(stop - start for _, start, stop in runs) == len(codes)

    def loss(params, images, modality, runs):
      out, updates = module.apply({**variables, "params": params}, images, modality, True,
                                  groups, runs, mutable=["batch_stats"])
      return jnp.sum(out * upstream), (out, updates["batch_stats"])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
    static = grad(variables["params"], images, codes, runs)
    masked = grad(variables["params"], images, jnp.asarray(codes), None)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10),
                 static, masked)
    if set(codes.tolist()) == {0}:  # The infrared stem got no images and moved nothing.
      (_, (_, stats)) = static
      jax.tree.map(np.testing.assert_array_equal, stats["stem_infrared"],
                   variables["batch_stats"]["stem_infrared"])


def test_static_routing_needs_known_codes_and_whole_groups():
  assert resnet.static_modality_runs(np.array([0, 0, 1], np.int32)) == ((0, 0, 2), (1, 2, 3))
  assert resnet.static_modality_runs(jnp.array([0, 0, 1])) is None  # values unknown in a trace
  assert resnet.static_modality_runs(np.zeros(0, np.int32)) is None
  assert resnet.static_modality_runs(np.array([0, 1, 0, 1], np.int32), groups=2) is None
  with pytest.raises(ValueError, match=r"modality codes must be 0 \(visible\) or 1"):
    resnet.static_modality_runs(np.array([0, 2], np.int32))


def training_jaxpr(setting, modality, differentiate=False):
  """The jaxpr of a training-mode loss (or its gradient) of ResNet-18 width 4 without non-local
  blocks on zero images of 32x16 under model.conv_backward `setting` (traced only)."""
  model = resnet.create_model(18, 4, conv_backward=setting, non_local=False)
  variables = jax.eval_shape(lambda: resnet.init_variables(model, jax.random.key(0), (32, 16)))

  def loss(params, batch_stats):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats},
                         jnp.zeros((len(modality), 32, 16, 3)), modality, train=True,
                         mutable=["batch_stats"])
    return out["features"].sum()
  return jax.make_jaxpr(jax.grad(loss) if differentiate else loss)(variables["params"],
                                                                    variables["batch_stats"])


@pytest.mark.parametrize("setting, stem_batch", [("custom", 2), ("xla", 4)])
def test_the_network_routes_numpy_codes_statically_under_the_cpu_setting(setting, stem_batch):
  """[V, V, I, I] as NumPy codes: under 'custom' each stem convolves its 2 images; under 'xla'
  (the demo's program) both stems convolve all 4."""
  jaxpr = training_jaxpr(setting, np.array([0, 0, 1, 1], np.int32))
  stem_inputs = _conv_input_shapes(jaxpr.jaxpr)
  assert [shape for shape in stem_inputs if shape[1:] == (32, 16, 3)] == \
      [(stem_batch, 32, 16, 3)] * 2


def _conv_input_shapes(jaxpr):
  """Input shapes of every convolution in a jaxpr, nested calls included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      shapes.append(tuple(eqn.invars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes.extend(_conv_input_shapes(getattr(sub, "jaxpr", sub)))
  return shapes


def test_masked_batch_norm_matches_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(2.0, 3.0, size=(5, 3, 2, 4)).astype(np.float32)
  mask = np.array([True, False, True, True, False])
  bn = batch_norm.GroupedBatchNorm()
  variables = bn.init(jax.random.key(0), x, mask, train=False)
  scale, bias = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                          "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": variables["batch_stats"]}
  out, state = bn.apply(variables, x, mask, train=True, mutable=["batch_stats"])
  selected = x[mask].astype(np.float64)
  mean, var = selected.mean(axis=(0, 1, 2)), selected.var(axis=(0, 1, 2))
  expected = (x[mask] - mean) / np.sqrt(var + EPS) * scale + bias
  np.testing.assert_allclose(np.asarray(out)[mask], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
  everyone, _ = bn.apply(variables, x, None, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(
      everyone, (x - x.mean(axis=(0, 1, 2))) / np.sqrt(x.var(axis=(0, 1, 2)) + EPS) * scale + bias,
      rtol=1e-4, atol=1e-5)
  out, state = bn.apply(variables, x, np.zeros(5, bool), train=True, mutable=["batch_stats"])
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(state["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(state["batch_stats"]["var"], np.ones(4))


def test_shared_stem_ignores_modality_and_equals_visible_stem(net):
  model, _, variables, images = net
  shared = resnet.create_model(18, 8, modality_specific_stem=False)
  renamed = {collection: {("stem" if name == "stem_visible" else name): tree
                          for name, tree in variables[collection].items()
                          if name != "stem_infrared"}
             for collection in variables}
  abstract = jax.eval_shape(functools.partial(shared.init, train=False), jax.random.key(0),
                            images[:2], MODALITY[:2])
  shape_of = lambda leaf: (leaf.shape, leaf.dtype)
  assert jax.tree_util.tree_map(shape_of, abstract) == jax.tree_util.tree_map(shape_of, renamed)
  run = make_eval(shared)
  mixed = run(renamed, images, MODALITY)
  for modality in (np.zeros(4, np.int32), np.ones(4, np.int32)):
    np.testing.assert_array_equal(run(renamed, images, modality)["features"], mixed["features"])
  two_stream = make_eval(model)(variables, images, np.zeros(4, np.int32))
  np.testing.assert_allclose(mixed["features"], two_stream["features"], rtol=1e-5, atol=1e-6)


def test_bnneck_batch_statistics_in_training_running_statistics_in_eval(net):
  model, _, variables, images = net
  assert set(variables["params"]["bnneck"]) == {"scale"}  # frozen zero shift = no shift
  out, state = make_train(model)(variables, images, MODALITY)
  pooled = np.asarray(out["pooled"], np.float64)
  scale = np.asarray(variables["params"]["bnneck"]["scale"])
  mean, var = pooled.mean(axis=0), pooled.var(axis=0)
  np.testing.assert_allclose(out["features"], (pooled - mean) / np.sqrt(var + EPS) * scale,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["features"]).mean(axis=0), 0.0, atol=1e-4)
  old = variables["batch_stats"]["bnneck"]
  np.testing.assert_allclose(state["batch_stats"]["bnneck"]["mean"],
                             0.9 * old["mean"] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  assert "embedding" not in out

  out = make_eval(model)(variables, images, MODALITY)
  pooled = np.asarray(out["pooled"], np.float64)
  expected = (pooled - old["mean"]) / np.sqrt(old["var"] + EPS) * scale
  np.testing.assert_allclose(out["features"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      out["embedding"], expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5,
      atol=1e-6)


def test_non_local_block_identity_at_init_and_matches_quadratic_form():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
  block = resnet.NonLocalBlock()
  variables = block.init(jax.random.key(5), x, train=False)
  np.testing.assert_array_equal(block.apply(variables, x, train=False), x)
  params = variables["params"]
  for name in ("theta", "phi", "val"):  # PyTorch default init, fan_in = 8
    assert np.abs(params[name]["kernel"]).max() <= 1 / np.sqrt(8)
  assert 0.5 < np.abs(params["out"]["kernel"]).max() <= 1.0  # fan_in = 1

  params = {**params, "out_bn": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 8), jnp.float32),
                                 "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}}
  stats = {"out_bn": {"mean": jnp.asarray(rng.normal(size=8), jnp.float32),
                      "var": jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32)}}
  out = block.apply({"params": params, "batch_stats": stats}, x, train=False)

  p = jax.tree_util.tree_map(np.asarray, params)
  flat = x.reshape(2, 24, 8).astype(np.float64)
  proj = {k: flat @ p[k]["kernel"].reshape(8, 1) + p[k]["bias"] for k in ("theta", "phi", "val")}
  affinity = proj["theta"] @ proj["phi"].transpose(0, 2, 1) / 24  # [2, N, N], no softmax
  y = affinity @ proj["val"]
  w = y @ p["out"]["kernel"].reshape(1, 8) + p["out"]["bias"]
  s = jax.tree_util.tree_map(np.asarray, stats)["out_bn"]
  bn = (w - s["mean"]) / np.sqrt(s["var"] + EPS) * p["out_bn"]["scale"] + p["out_bn"]["bias"]
  np.testing.assert_allclose(out, (flat + bn).reshape(x.shape), rtol=1e-4, atol=1e-5)


def test_non_local_blocks_follow_the_last_blocks_of_layer2_and_layer3(net):
  _, variables, _, _ = net
  found = sorted(name for name in variables["params"] if name.startswith("non_local"))
  assert found == ["non_local2_0", "non_local2_1", "non_local3_0", "non_local3_1"]
  images, modality = jnp.zeros((2, HEIGHT, WIDTH, 3)), jnp.array([0, 1])
  for kwargs, expected in (({}, ["non_local2_2", "non_local2_3", "non_local3_3",
                                 "non_local3_4", "non_local3_5"]),
                           ({"non_local": False}, [])):
    model = resnet.create_model(50, 8, **kwargs)
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              images, modality)
    assert sorted(n for n in abstract["params"] if n.startswith("non_local")) == expected


@pytest.mark.parametrize("p", [3.0, 2.5])
def test_gem_matches_numpy(p):
  x = np.random.default_rng(6).normal(size=(2, 3, 4, 5)).astype(np.float32)  # negatives clamp
  gem = resnet.GeM()
  variables = gem.init(jax.random.key(0), x)
  assert float(variables["params"]["p"]) == 3.0
  out = gem.apply({"params": {"p": jnp.float32(p)}}, x)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, numpy_gem(x.astype(np.float64), p), rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_state(net):
  model, _, variables, images = net
  bf16 = resnet.create_model(18, 8, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(functools.partial(bf16.init, train=False), jax.random.key(0),
                            images, MODALITY)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract))
  reference = make_eval(model)(variables, images, MODALITY)
  out = make_eval(bf16)(variables, images, MODALITY)
  for key in ("pooled", "features"):
    assert out[key].dtype == jnp.float32 and np.all(np.isfinite(out[key]))
    error = np.linalg.norm(out[key] - reference[key]) / np.linalg.norm(reference[key])
    assert error < 2e-2, (key, error)
  out, state = make_train(bf16)(variables, images, MODALITY)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state))
  assert out["features"].dtype == jnp.float32 and np.all(np.isfinite(out["features"]))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="depth must be one of"):
    resnet.create_model(101, 8)
  model = resnet.create_model(18, 8)
  images = jnp.zeros((2, HEIGHT, WIDTH, 3))
  with pytest.raises(ValueError, match="modality must have shape"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images,
                   jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"images must be \[n, H, W, 3\]"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                   images[..., :1], jnp.zeros((2,), jnp.int32))
  variables = resnet.init_variables(model, jax.random.key(0), (HEIGHT, WIDTH))
  with pytest.raises(ValueError, match="bn_groups must be >= 1 and divide the batch of 2"):
    model.apply(variables, images, jnp.zeros((2,), jnp.int32), train=True, bn_groups=3,
                mutable=["batch_stats"])
  with pytest.raises(ValueError, match=r"remat parts must be among .*\['blocks'\]"):
    model.clone(remat=("blocks",)).apply(variables, images, jnp.zeros((2,), jnp.int32))


@pytest.mark.slow
def test_remat_recomputes_the_same_values_and_gradients(net):
  model, _, variables, images = net
  remat = model.clone(remat=resnet.REMAT_PARTS)

  def grads(model):
    def loss(params):
      out, state = model.apply({**variables, "params": params}, images, MODALITY, train=True,
                               mutable=["batch_stats"])
      return jnp.sum(out["features"] * jnp.arange(out["features"].shape[1])), state
    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  (plain, plain_state), (recomputed, recomputed_state) = grads(model), grads(remat)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, recomputed)
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain_state, recomputed_state)
  # Same variables: checkpoints and weight files fit either way.
  shape_of = lambda leaf: leaf.shape
  assert (jax.tree_util.tree_map(
      shape_of, jax.eval_shape(lambda: remat.init(jax.random.key(0), images, MODALITY)))
          == jax.tree_util.tree_map(shape_of, variables))
