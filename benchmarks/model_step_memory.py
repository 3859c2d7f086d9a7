"""Peak memory of one training step, JAX against the equivalent eager PyTorch step, on CPU.

  python benchmarks/model_step_memory.py                       # the teacher step's 96 images
  python benchmarks/model_step_memory.py --batch 24 --height 192 --width 96

The step is benchmarks/model_step.py's (ResNet-50 two-stem forward in train mode, backward, Adam
update), and so is the PyTorch model. The default batch is what the SYSU-MM01 teacher step puts
through the network: 8 ids x 4 images x 2 modalities plus the channel-augmented view, 96 images
of 384x128. Each side runs in a fresh process of its own (one process's peak would hide the
other's): build the model (JAX: and compile the step ahead of time), reset the kernel's peak-RSS
mark (/proc/self/clear_refs), run the first step and read the peak (VmHWM). The first step, as
later ones reuse what the allocators kept from it. Printed per side: the resident memory before
the step (parameters, input batch, libraries, the compiled program; JAX's Adam moments, which
PyTorch creates inside its first step, 2x the parameters, ~0.2 GiB for ResNet-50), the step's
peak, and the difference, which is what the step itself allocates; for JAX also XLA's own plan
(arguments, outputs, temporaries, donated bytes). The ratio line compares the steps' own
allocations.
"""
import argparse
import json
import os
import subprocess
import sys

GIB = 1024 ** 3
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=96)
  parser.add_argument("--height", type=int, default=384)
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--depth", type=int, default=50, choices=(10, 18, 50))
  parser.add_argument("--net-width", type=int, default=64)
  parser.add_argument("--conv-backward", default="custom", choices=("xla", "custom"),
                      help="model.conv_backward of the JAX step (custom: what CPU runs use)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--side", choices=("jax", "torch"), default=None,
                      help="internal: measure one side in this process and print JSON")
  return parser.parse_args(argv)


def status_bytes(field: str) -> int:
  """A /proc/self/status memory field (VmRSS, VmHWM) in bytes."""
  with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"/proc/self/status has no {field} (this needs Linux)")


def reset_peak() -> None:
  """Sets the kernel's peak-RSS mark (VmHWM) to the current RSS."""
  with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
    clear.write("5")


def measure(args) -> dict:
  """One side's numbers, measured in this process."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import model_step  # pylint: disable=g-import-not-at-top
  from train_step import limit_xla_threads  # pylint: disable=g-import-not-at-top
  limit_xla_threads(args.threads)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.height, args.width, 3)).astype(np.float32)
  modality = (np.arange(args.batch) >= args.batch // 2).astype(np.int32)
  step_args = argparse.Namespace(depth=args.depth, net_width=args.net_width, dtype="float32",
                                 threads=args.threads)
  result = {}
  if args.side == "jax":
    step, state, images = model_step.jax_step_parts(step_args, images, modality,
                                                    args.conv_backward)
    compiled = step.lower(state, images).compile()
    analysis = compiled.memory_analysis()
    result["xla"] = {
        "arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes, "donated": analysis.alias_size_in_bytes}
    holder = {"state": state}

    def run():
      holder["state"], loss = compiled(holder["state"], images)
      return float(loss)
  else:
    run = model_step.make_torch_step(step_args, images, modality)
  # The first step is measured: later ones reuse the memory the allocators kept from it.
  reset_peak()
  before = status_bytes("VmRSS")
  run()
  result.update(resident_before=before, peak=status_bytes("VmHWM"))
  return result


def child(side: str, argv: list[str]) -> dict:
  """Runs one side in a fresh process and returns its numbers."""
  done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--side={side}"],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"the {side} side failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.side:
    print(json.dumps(measure(args)))
    return {}
  sides = {side: child(side, argv) for side in ("jax", "torch")}
  print(f"ResNet-{args.depth} width {args.net_width}, one training step of {args.batch} images "
        f"at {args.height}x{args.width}, float32, JAX conv_backward={args.conv_backward}, "
        f"{args.threads} threads, each side in its own process")
  print(f"{'':8s}{'resident before GiB':>21s}{'step peak GiB':>15s}{'step allocates GiB':>20s}")
  for side, numbers in sides.items():
    numbers["step"] = numbers["peak"] - numbers["resident_before"]
    print(f"{side:8s}{numbers['resident_before'] / GIB:21.2f}{numbers['peak'] / GIB:15.2f}"
          f"{numbers['step'] / GIB:20.2f}")
  xla = sides["jax"]["xla"]
  print(f"XLA's plan: arguments {xla['arguments'] / GIB:.2f}, outputs {xla['outputs'] / GIB:.2f}, "
        f"temporaries {xla['temporaries'] / GIB:.2f}, donated (outputs written over arguments) "
        f"{xla['donated'] / GIB:.2f} GiB")
  print(f"JAX's step allocates {sides['jax']['step'] / max(sides['torch']['step'], 1):.2f}x "
        "PyTorch's; its peak is "
        f"{sides['jax']['peak'] / max(sides['torch']['peak'], 1):.2f}x PyTorch's")
  return sides


if __name__ == "__main__":
  main()
