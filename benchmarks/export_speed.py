"""Images/s of the exported extractor: the JAX function, onnxruntime, and the deserialised
StableHLO function, on this CPU, at the two re-ID input sizes, side by side.

The network is the default preset (ResNet-50 width 64, two stems, non-local blocks, last stride
1) with random weights (`init_variables`); weights do not change the speed. For each size the
ONNX and StableHLO files are written to a temporary folder as `export_extractor` writes them
(without its verification), then loaded the way a service would (an onnxruntime session;
`jax.export.deserialize` + `jax.jit(exported.call)`). Each runtime embeds the same uint8 batch
(half visible, half infrared); the first call (compilation or session warm-up) is timed apart.
The max abs difference from the JAX embeddings is printed as a check.

  python benchmarks/export_speed.py --batch 16 --steps 3

Needs the `export` extra (pip install -e '.[export]').
"""
import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from dakd_jax.deploy import export as export_lib
from dakd_jax.deploy import extractor as extractor_lib
from dakd_jax.deploy import onnx_export
from dakd_jax.deploy import packages
from dakd_jax.models import resnet

SIZES = ((288, 144), (384, 128))


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--depth", type=int, default=50, choices=(18, 50))
  parser.add_argument("--net-width", type=int, default=64, help="base channels (64 = real)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=3, help="timed batches after the first")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="CPU threads for each runtime (XLA intra-op; onnxruntime intra-op)")
  return parser.parse_args()


def limit_xla_threads(threads):
  """Must run before the first JAX computation: XLA reads the flags when its backend starts."""
  flags = (f"--xla_cpu_multi_thread_eigen={str(threads > 1).lower()} "
           f"intra_op_parallelism_threads={threads}")
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def time_calls(run, images, modality, steps):
  """(first call s, mean s per later call, last output)."""
  start = time.perf_counter()
  output = np.asarray(run(images, modality))
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    output = np.asarray(run(images, modality))
  return first, (time.perf_counter() - start) / steps, output


def load_runtimes(extract, image_size, folder, threads, onnxruntime):
  """{name: f(images, modality)} for JAX, onnxruntime and StableHLO; export s; file MiB."""
  specs = extractor_lib.input_specs(*image_size)
  start = time.perf_counter()
  stablehlo_path = os.path.join(folder, "extractor.stablehlo")
  with open(stablehlo_path, "wb") as file:
    file.write(export_lib.stablehlo_bytes(extract, specs, ("cpu",)))
  stablehlo_s = time.perf_counter() - start
  start = time.perf_counter()
  onnx_path = os.path.join(folder, "extractor.onnx")
  with open(onnx_path, "wb") as file:
    file.write(onnx_export.convert_to_onnx(extract, specs))
  onnx_s = time.perf_counter() - start
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
  with open(stablehlo_path, "rb") as file:
    call = jax.jit(jax.export.deserialize(bytearray(file.read())).call)
  runtimes = {
      "jax": jax.jit(extract),
      "onnxruntime": lambda images, modality: session.run(
          ["embedding"], {"images": images, "modality": modality})[0],
      "stablehlo": call,
  }
  sizes = {name: os.path.getsize(path) / 2**20 for name, path in
           (("onnxruntime", onnx_path), ("stablehlo", stablehlo_path))}
  return runtimes, {"onnxruntime": onnx_s, "stablehlo": stablehlo_s}, sizes


def main():
  args = parse_args()
  limit_xla_threads(args.threads)
  onnxruntime = packages.check_export_packages()["onnxruntime"]
  model = resnet.create_model(args.depth, args.net_width)
  variables = resnet.init_variables(model, jax.random.key(0), SIZES[0])
  versions = packages.library_versions()
  print(f"ResNet-{args.depth} width {args.net_width} (two stems, non-local), batch "
        f"{args.batch}, {args.steps} timed batches, {os.cpu_count()} CPUs, {args.threads} "
        f"threads each; jax {versions['jax']}, onnxruntime {versions['onnxruntime']}, jax2onnx "
        f"{versions['jax2onnx']}")
  print(f"{'size':>9s} {'runtime':>12s} {'export s':>9s} {'file MiB':>9s} {'first s':>8s} "
        f"{'batch s':>8s} {'images/s':>9s} {'max|diff|':>10s}")
  rng = np.random.default_rng(0)
  modality = (np.arange(args.batch) % 2).astype(np.int32)
  for height, width in SIZES:
    extract = extractor_lib.extractor_function(model, variables)
    images = rng.integers(0, 256, (args.batch, height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
      runtimes, export_s, sizes = load_runtimes(extract, (height, width), folder,
                                               args.threads, onnxruntime)
      reference = None
      for name, run in runtimes.items():
        first, step, output = time_calls(run, images, modality, args.steps)
        reference = output if reference is None else reference
        diff = float(np.max(np.abs(output - reference)))
        seconds = f"{export_s[name]:9.1f}" if name in export_s else f"{'-':>9s}"
        mib = f"{sizes[name]:9.1f}" if name in sizes else f"{'-':>9s}"
        print(f"{height:>4d}x{width:<4d} {name:>12s} {seconds} {mib} {first:8.2f} {step:8.3f} "
              f"{args.batch / step:9.1f} {diff:10.1e}")


if __name__ == "__main__":
  main()
