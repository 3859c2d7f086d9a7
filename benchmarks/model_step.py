"""Training-step time of the JAX ReIDResNet against an equivalent eager PyTorch model, on CPU.

One step = forward (train mode) + backward + Adam update, loss = mean(g^2) of the BNNeck output.
Both models have the same layout: two stems (conv1, bn1, relu, maxpool per modality), shared
layer1..4 with last stride 1, non-local blocks (O(N) rank-one form, method.md 2.1), GeM and a
BNNeck without shift. The batch is half visible, half infrared, in the training steps' order
[visible; infrared]. All variants run in the same process, alternating `--repeats` rounds of
`--steps` steps (medians printed), so the ratios compare like with like on this machine: the
JAX step once per `--conv-backwards` setting (model.conv_backward: "xla" = autodiff's
gradients, "custom" = the hand-written convolution, max-pool and batch norm gradients of
dakd_jax/models/) and the torch step.

  python benchmarks/model_step.py --batch 16 --height 128 --width 64 --steps 5
  python benchmarks/model_step.py --batch 24 --height 192 --width 96 --threads 1

The CPU/wall column (process CPU time over wall time) shows how many threads really worked:
the XLA flags set by --threads 1 do not keep XLA:CPU on one thread (CPU/wall 1.4-1.5 on two
cores), so for a one-thread comparison run the script under `taskset -c 0`.

Both run each stem on its own images only: the JAX step is compiled for its batch's modality
codes, as the training steps are (NumPy codes, resnet.static_modality_runs; under
--conv-backwards xla the JAX model runs both stems on every image and keeps each image's own
output, the program the demo's numbers were measured with; the stem is about 3% of the
ResNet-50 FLOPs).
"""
import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dakd_jax.models import resnet  # pylint: disable=g-import-not-at-top,wrong-import-position
from train_step import limit_xla_threads  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--depth", type=int, default=50, choices=(10, 18, 50))
  parser.add_argument("--net-width", type=int, default=64, help="base channels (64 = real)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--height", type=int, default=128)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="JAX compute dtype (torch always runs float32)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="CPU threads for both (torch.set_num_threads; XLA intra-op threads)")
  parser.add_argument("--conv-backwards", default="xla,custom",
                      help="model.conv_backward settings timed, comma-separated")
  parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
  return parser.parse_args()


def make_jax_step(args, images, modality, conv_backward):
  """A function running one compiled JAX training step per call (the first call compiles)."""
  step, state, images = jax_step_parts(args, images, modality, conv_backward)
  holder = {"state": state}

  def run():
    holder["state"], loss = step(holder["state"], images)
    return float(loss)  # waits for the step
  return run


def jax_step_parts(args, images, modality, conv_backward):
  """(jitted step(state, images) -> (state, loss) donating its state, compiled for the NumPy
  `modality` codes; the initial state; the images as a device array)."""
  model = resnet.create_model(args.depth, args.net_width, dtype=jnp.dtype(args.dtype),
                              conv_backward=conv_backward)
  variables = resnet.init_variables(model, jax.random.key(0), images.shape[1:3])
  optimizer = optax.adam(3.5e-4)
  state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))

  def step(state, images):
    params, batch_stats, opt_state = state

    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                 modality, train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.square(out["features"])), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return jax.jit(step, donate_argnums=0), state, jnp.asarray(images)


class TorchBottleneck(torch.nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.conv3 = torch.nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(4 * planes)
    self.downsample = None
    if stride != 1 or inplanes != 4 * planes:
      self.downsample = torch.nn.Sequential(
          torch.nn.Conv2d(inplanes, 4 * planes, 1, stride, bias=False),
          torch.nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBasicBlock(torch.nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(planes)
    self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = torch.nn.Sequential(
          torch.nn.Conv2d(inplanes, planes, 1, stride, bias=False), torch.nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
    return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchNonLocal(torch.nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.theta, self.phi, self.g = (torch.nn.Conv2d(channels, 1, 1) for _ in range(3))
    self.W = torch.nn.Sequential(torch.nn.Conv2d(1, channels, 1), torch.nn.BatchNorm2d(channels))
    torch.nn.init.zeros_(self.W[1].weight)
    torch.nn.init.zeros_(self.W[1].bias)

  def forward(self, x):
    s = (self.phi(x) * self.g(x)).mean(dim=(1, 2, 3), keepdim=True)
    return x + self.W(self.theta(x) * s)


class TorchReIDResNet(torch.nn.Module):
  def __init__(self, depth, width):
    super().__init__()
    block = TorchBottleneck if depth == 50 else TorchBasicBlock
    self.stems = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Conv2d(3, width, 7, 2, 3, bias=False),
                            torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                            torch.nn.MaxPool2d(3, 2, 1)) for _ in range(2))
    inplanes, expansion = width, 4 if depth == 50 else 1
    for stage, (count, stride) in enumerate(zip(resnet.STAGE_SIZES[depth], (1, 2, 2, 1)), 1):
      planes, layers = width * 2 ** (stage - 1), []
      for index in range(count):
        layers.append(block(inplanes, planes, stride if index == 0 else 1))
        inplanes = planes * expansion
        if index in resnet.non_local_positions(depth, stage):
          layers.append(TorchNonLocal(inplanes))
      setattr(self, f"layer{stage}", torch.nn.Sequential(*layers))
    self.p = torch.nn.Parameter(torch.tensor(3.0))
    self.bottleneck = torch.nn.BatchNorm1d(inplanes)
    self.bottleneck.bias.requires_grad_(False)

  def forward(self, x, modality):
    parts = [self.stems[code](x[modality == code]) for code in (0, 1)]
    stem = parts[0].new_empty((x.shape[0],) + parts[0].shape[1:])
    for code in (0, 1):
      stem[modality == code] = parts[code]
    x = self.layer4(self.layer3(self.layer2(self.layer1(stem))))
    pooled = x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)
    return self.bottleneck(pooled)


def make_torch_step(args, images, modality):
  """A function running one eager PyTorch training step per call."""
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  model = TorchReIDResNet(args.depth, args.net_width).train()
  optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3.5e-4)
  images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  modality = torch.from_numpy(modality)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(images, modality).square().mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())
  return step


def time_steps(run, steps):
  """(wall seconds per step, process CPU seconds per step, last loss) over `steps` calls."""
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(steps):
    loss = run()
  return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps, loss


def main():
  args = parse_args()
  limit_xla_threads(args.threads)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.height, args.width, 3)).astype(np.float32)
  modality = (np.arange(args.batch) >= args.batch // 2).astype(np.int32)
  print(f"ResNet-{args.depth} width {args.net_width}, batch {args.batch} at {args.height}x"
        f"{args.width}, JAX {args.dtype}, {args.steps} timed steps, {os.cpu_count()} CPUs, "
        f"{args.threads} threads each, jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__}")
  runners = {f"jax {setting}": make_jax_step(args, images, modality, setting)
             for setting in args.conv_backwards.split(",")}
  runners["torch"] = make_torch_step(args, images, modality)
  first = {name: time_steps(run, 1)[0] for name, run in runners.items()}
  wall, cpu, loss = ({name: [] for name in runners} for _ in range(3))
  for _ in range(args.repeats):
    for name, run in runners.items():
      for times, value in zip((wall, cpu, loss), time_steps(run, args.steps)):
        times[name].append(value)
  print(f"median of {args.repeats} alternating rounds of {args.steps} steps")
  print(f"{'':14s}{'first step s':>14s}{'step s':>10s}{'images/s':>10s}{'CPU/wall':>10s}"
        f"{'x torch':>9s}{'loss':>10s}")
  torch_step = statistics.median(wall["torch"])
  for name in runners:
    step = statistics.median(wall[name])
    print(f"{name:14s}{first[name]:14.2f}{step:10.3f}{args.batch / step:10.1f}"
          f"{statistics.median(cpu[name]) / step:10.2f}{step / torch_step:9.2f}"
          f"{loss[name][-1]:10.4f}")
  print("(the first JAX step includes compilation)")


if __name__ == "__main__":
  main()
