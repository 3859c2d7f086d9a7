"""benchmarks/step_memory.py: its parsing of JAX's residual listing against hand-worked lines,
and a small run in which rematerialising the stem removes exactly the stem's activations."""

import pytest

from tests.benchmark_scripts import load_benchmark


def load_step_memory():
  return load_benchmark("step_memory")


def test_residual_lines_are_sized_from_dtype_and_shape():
  step_memory = load_step_memory()
  size, shape, source = step_memory.residual_bytes(
      "f32[24,96,48,64] output of sub from /x/normalization.py:205:6 (_normalize)")
  assert (size, shape) == (24 * 96 * 48 * 64 * 4, (24, 96, 48, 64))
  assert step_memory.producer(source) == "sub"
  size, shape, source = step_memory.residual_bytes(
      "bf16[3,5] from the argument params['conv1']['kernel']")
  assert (size, shape) == (3 * 5 * 2, (3, 5))
  assert step_memory.producer(source) == "argument (parameters, images)"
  assert step_memory.residual_bytes("f32[] from a literal")[0] == 4  # a scalar: one element
  assert step_memory.residual_bytes("some other printed line") is None


def test_activations_are_assigned_to_the_network_part_of_their_resolution():
  label = load_step_memory().resolution_label
  assert label((6, 48, 24, 16), height=96) == "stem (H/2)"
  assert label((6, 24, 12, 16), height=96) == "max-pool + layer1 (H/4)"
  assert label((6, 6, 3, 512), height=96) == "layer3 + layer4 (H/16)"
  assert label((6, 1, 1, 512), height=96) == "per-image scalars (non-local, GeM)"
  assert label((6, 512), height=96) == "vectors (pooling, BNNeck, BN statistics)"
  assert label((1, 1, 1, 64), height=96) == "vectors (pooling, BNNeck, BN statistics)"


@pytest.mark.slow
def test_stem_remat_drops_the_stem_activations_and_nothing_else(capsys):
  step_memory = load_step_memory()
  # The demo's network with one block per stage (ResNet-10): the stem is the subject.
  results = step_memory.main(["--config", "configs/demo.py", "--height", "48", "--width", "48",
                              "--pairs", "4", "--remats", ";stem", "--depth", "10"])
  (temp_plain, plain, convs_plain), (temp_remat, remat, convs_remat) = (results["none"],
                                                                       results["stem"])
  assert temp_plain > 0 and temp_remat > 0
  # ResNet-10: 12 convolutions per stem pass and stages forward (stem, 4 blocks of 2, 3
  # downsamples), more backward; a kept remat can only add convolutions.
  assert convs_remat >= convs_plain > 12
  # The demo stem (width 16) keeps at least its conv output, [12 images, 24, 24, 16] float32.
  assert plain["stem (H/2)"] >= 12 * 24 * 24 * 16 * 4
  assert "stem (H/2)" not in remat
  # The feature maps after the max-pool are kept alike, but for the max-pool's own residual
  # (on CPU the hand-written gradient's int8 window index per output, [12, 12, 12, 16], 1 byte
  # each), which the remat recomputes with the stem; the small rest (statistics) moves by far
  # less than the stem's share.
  pool_index = 12 * 12 * 12 * 16
  assert plain["max-pool + layer1 (H/4)"] - remat["max-pool + layer1 (H/4)"] == pool_index
  for part in ("layer2 (H/8)", "layer3 + layer4 (H/16)"):
    assert remat[part] == plain[part] > 0, part
  assert sum(plain.values()) - sum(remat.values()) == pytest.approx(
      plain["stem (H/2)"] + pool_index, rel=0.01)
  printed = capsys.readouterr().out
  assert "model.remat = stem:" in printed and "summary (ratios to the first setting)" in printed
