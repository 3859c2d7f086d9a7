"""Accelerator report in one command: training steps and evaluation extraction at the SYSU size.

  python benchmarks/gpu_report.py                      # on a GPU/TPU: under 8 minutes on one GPU
  python benchmarks/gpu_report.py --tiny --output /tmp/BENCHMARKS.md   # CPU smoke run, seconds
  python benchmarks/gpu_report.py --remat stem,non_local --multipliers 4 --output REMAT.md

Measures, on random uint8 batches through the real compiled steps (augmentation, forward, loss,
backward, update; see train_step.py), for float32 and bfloat16 and batches x1/x2/x4 of the
config's (SYSU-MM01: 384x128, 8 ids x 4 images, ResNet-50 width 64):
  - the teacher step (3n images through the network) and the student step (2n images through
    the student, plus the frozen teacher's inference on the same 2n), the latter also with the
    other distill.student_forward at x1 (grouped one call or two calls: which is faster here);
  - evaluation extraction (inference-mode unit embeddings) at eval.batch_size x1/x2/x4;
and prints, per row: images/s, step time, compile time, the memory XLA plans for the step
(arguments, outputs and temporaries), the device's peak memory so far, XLA's FLOPs per step and
the model FLOP utilisation (MFU = FLOPs per step / step time / the device's peak FLOP/s from
PEAK_TFLOPS below). Writes the table with the device name to BENCHMARKS.md. Rows run in order
of importance (x1 first) and a row is skipped when the time budget (--budget-s) would be
exceeded, so the run ends in time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402  benchmarks/train_step.py: the step runners
from dakd_jax import builders  # noqa: E402
from dakd_jax import config as config_lib  # noqa: E402
from dakd_jax import sharding as sharding_lib  # noqa: E402
from dakd_jax import writers  # noqa: E402
from dakd_jax.evaluation import extract  # noqa: E402
from dakd_jax.train import memory_plan  # noqa: E402
from dakd_jax.train.steps import STUDENT_FORWARDS  # noqa: E402

# Dense (no sparsity) peak TFLOP/s per device kind: (substring of jax's device_kind, bfloat16,
# float32 at JAX's default precision, source). On NVIDIA Ampere and later, XLA's default
# precision runs float32 convolutions on TF32 tensor cores, so float32 rows are compared with
# the TF32 peak (with jax_default_matmul_precision=highest they would run at the much lower
# FP32 peak). On TPUs the default precision multiplies float32 in bfloat16 passes. First match
# wins, so specific names come before general ones.
PEAK_TFLOPS = (
    ("H200", 989.4, 494.7, "NVIDIA H200 SXM datasheet: BF16 1979, TF32 989 TFLOPS with "
                           "sparsity, halved for dense"),
    ("H100 PCIe", 756.0, 378.0, "NVIDIA H100 PCIe datasheet: BF16 1513, TF32 756 with "
                                "sparsity, halved"),
    ("H100", 989.4, 494.7, "NVIDIA H100 SXM datasheet: BF16 1979, TF32 989 with sparsity, "
                           "halved"),
    ("A100", 312.0, 156.0, "NVIDIA A100 datasheet: BF16 312, TF32 156 dense"),
    ("L4", 121.0, 60.0, "NVIDIA L4 datasheet: BF16 242, TF32 120 with sparsity, halved"),
    ("TPU v4", 275.0, 275.0, "Google Cloud TPU v4: 275 bf16 TFLOPS per chip"),
    ("TPU v5 lite", 197.0, 197.0, "Google Cloud TPU v5e: 197 bf16 TFLOPS per chip"),
    ("TPU v5", 459.0, 459.0, "Google Cloud TPU v5p: 459 bf16 TFLOPS per chip"),
    ("TPU v6 lite", 918.0, 918.0, "Google Cloud TPU v6e: 918 bf16 TFLOPS per chip"),
)
TINY = {"model.depth": 18, "model.width": 4, "model.non_local": False,
        "data.image_height": 48, "data.image_width": 48,
        "data.ids_per_batch": 2, "data.images_per_id": 2, "eval.batch_size": 8}
GIB = 1024 ** 3
COLUMNS = ("what", "dtype", "batch", "img/s", "step ms", "compile s", "XLA GiB",
           "device peak GiB", "GFLOP/step", "MFU %")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/sysu.py")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--multipliers", default="1,2,4", help="batch multiples of the config's")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="start no row expected to end after this many seconds")
  parser.add_argument("--output", default="BENCHMARKS.md")
  parser.add_argument("--tiny", action="store_true",
                      help="ResNet-18 width 4 at 48x48, 2 ids x 2 images (a CPU smoke test)")
  parser.add_argument("--peak-tflops", type=float, default=0.0,
                      help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS by kind)")
  parser.add_argument("--remat", default=None,
                      help="model.remat override, e.g. stem,non_local (default: the config's)")
  parser.add_argument("--allow-cpu", action="store_true",
                      help="run the full size on a CPU (hours); --tiny needs no flag")
  return parser.parse_args(argv)


def peak_tflops(device_kind: str, dtype: str, override: float) -> tuple[float, str]:
  """(peak TFLOP/s, where it comes from); (0, reason) when unknown."""
  if override > 0:
    return override, "--peak-tflops"
  for name, bf16, f32, source in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return (bf16 if dtype == "bfloat16" else f32), source
  return 0.0, f"no peak known for {device_kind!r} (pass --peak-tflops)"


def measure(jitted, args, steps: int, images: int, peak: float) -> dict:
  """Compiles jitted(*args), then times `steps` calls after one warm-up call.

  args[0] is the donated state, threaded through the calls. Returns the row's numbers.
  """
  started = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - started
  memory = compiled.memory_analysis()
  flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
  state, rest = args[0], args[1:]

  def call(state):
    out = compiled(state, *rest)
    return (out[0], out[1]) if isinstance(out, tuple) else (state, out)

  state, out = call(state)
  jax.block_until_ready(out)
  durations = []
  for _ in range(steps):
    started = time.perf_counter()
    state, out = call(state)
    jax.block_until_ready(out)
    durations.append(time.perf_counter() - started)
  step_s = statistics.median(durations)
  device_memory = writers.device_memory_bytes()
  # What the step needs on the device, as the training stages' start-up plan counts it.
  step_bytes = memory_plan.step_bytes(memory)
  return {"img/s": images / step_s, "step ms": 1e3 * step_s, "compile s": compile_s,
          "XLA GiB": step_bytes / GIB,
          "device peak GiB": None if device_memory is None else device_memory[1] / GIB,
          "GFLOP/step": flops / 1e9,
          "MFU %": 100.0 * flops / step_s / (peak * 1e12) if peak > 0 and flops else None}


def step_row(what, config, model, variables, mesh, steps, peak):
  """Measures the teacher step, or the student step with the forward named in `what`
  ("student grouped" / "student two_calls"), at config's batch."""
  rng = np.random.default_rng(0)
  if what == "teacher step":
    jitted, extra, state = train_step.make_teacher_runner(config, model, variables, mesh, rng)
  else:
    jitted, extra, state = train_step.make_student_runner(
        config, model, variables, mesh, rng, student_forward=what.split()[1])
  batch = sharding_lib.host_to_global(train_step.random_batch(config, rng), mesh)
  n = train_step.pairs_per_step(config)
  images = 3 * n if what == "teacher step" else 2 * n
  return measure(jitted, (state, *extra, batch), steps, images, peak), images


def extraction_row(model, variables, mesh, batch_size, image_size, steps, peak):
  """Measures inference-mode embedding of `batch_size` uint8 images per call."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (batch_size, *image_size, 3), dtype=np.uint8)
  modality = (np.arange(batch_size) % 2).astype(np.int32)
  embed = extract.jit_embed(extract.embed_function(model), mesh)
  args = (variables, sharding_lib.host_to_global(images, mesh),
          sharding_lib.host_to_global(modality, mesh), jax.random.key(0))
  return measure(embed, args, steps, batch_size, peak), batch_size


def planned_rows(dtypes, multipliers, student_forward):
  """(what, dtype, multiplier) in order of importance: every dtype at x1 first, then the
  student's other forward (distill.student_forward) at x1, to choose it on this device."""
  other = next(f for f in STUDENT_FORWARDS if f != student_forward)
  main = ("teacher step", f"student {student_forward}", "extraction")
  rows = [(what, dtype, multipliers[0]) for dtype in dtypes for what in main]
  rows += [(f"student {other}", dtype, multipliers[0]) for dtype in dtypes]
  return rows + [(what, dtype, m) for m in multipliers[1:] for dtype in dtypes for what in main]


def run_rows(args, base_config, mesh, kind, started):
  """Measures every planned row that fits the budget; returns (rows, skipped, peak sources)."""
  rows, skipped, sources, models = [], [], {}, {}
  dtypes, multipliers = args.dtypes.split(","), [int(m) for m in args.multipliers.split(",")]
  longest = 0.0
  for what, dtype, multiplier in planned_rows(dtypes, multipliers,
                                              base_config.distill.student_forward):
    elapsed = time.perf_counter() - started
    if rows and elapsed + 1.5 * longest > args.budget_s:
      skipped.append(f"{what} {dtype} x{multiplier}")
      continue
    config = scaled_config(base_config, dtype, multiplier)
    if dtype not in models:
      model = builders.model_from_config(config)
      models[dtype] = (model, builders.init_model_variables(config, model, jax.random.key(0)))
    model, variables = models[dtype]
    peak, sources[dtype] = peak_tflops(kind, dtype, args.peak_tflops)
    row_started = time.perf_counter()
    try:
      if what == "extraction":
        numbers, images = extraction_row(model, variables, mesh,
                                         config.eval.batch_size * multiplier,
                                         builders.image_size(config), args.steps, peak)
      else:
        numbers, images = step_row(what, config, model, variables, mesh, args.steps, peak)
    except Exception as error:  # pylint: disable=broad-except  # e.g. out of memory: go on
      skipped.append(f"{what} {dtype} x{multiplier} ({type(error).__name__}: "
                     f"{str(error).splitlines()[0][:120]})")
      continue
    longest = max(longest, time.perf_counter() - row_started)
    rows.append({"what": what, "dtype": dtype, "batch": images, **numbers})
    print(format_row(rows[-1]), flush=True)
  return rows, skipped, sources


def scaled_config(base_config, dtype, multiplier):
  config = base_config.copy_and_resolve_references()
  with config.unlocked():
    config.model.compute_dtype = dtype
    config.data.ids_per_batch = base_config.data.ids_per_batch * multiplier
  return config


def format_value(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, str):
    return value
  if isinstance(value, int):
    return str(value)
  return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def column_width(column: str) -> int:
  return {"what": 17, "dtype": 8}.get(column, max(len(column), 6))


def format_row(row: dict) -> str:
  """One printed table line (the columns of COLUMNS, " | " between them)."""
  return " | ".join(f"{format_value(row[c]):>{column_width(c)}}" for c in COLUMNS)


def markdown(rows, skipped, sources, header: dict) -> str:
  """BENCHMARKS.md: what was run where, the table, what was skipped, where the peaks come from."""
  lines = ["# Benchmarks", "", f"Written by `benchmarks/gpu_report.py` on {header['date']}.", ""]
  lines += [f"- {key}: {value}" for key, value in header.items() if key != "date"]
  lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(format_value(row[c]) for c in COLUMNS) + " |" for row in rows]
  lines += ["", "Columns: batch = images through the trained network per step (teacher 3n: "
            "visible, infrared, channel view; student 2n, plus the frozen teacher's inference "
            "on the same 2n; 'student grouped' = one call with two BN groups, 'student "
            "two_calls' = the released two calls, same values) or per extraction call; "
            "step ms = median over the timed calls; compile s = lowering and compiling; "
            "XLA GiB = the compiled step's arguments + outputs + temporaries - donated "
            "(memory_analysis); device peak = the allocator's high-water mark of the process "
            "so far; GFLOP/step = XLA's cost analysis of the compiled step; MFU = GFLOP/step / "
            "step time / the device's peak."]
  lines += [f"- peak FLOP/s for {dtype}: {source}" for dtype, source in sources.items()]
  if skipped:
    lines += ["", "Skipped: " + "; ".join(skipped) + "."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  args = parse_args(argv)
  started = time.perf_counter()
  device = jax.devices()[0]
  if device.platform == "cpu" and not (args.tiny or args.allow_cpu):
    sys.exit("gpu_report: no accelerator found (JAX platform cpu). Run it on a GPU/TPU host, "
             "or use --tiny for a CPU smoke run.")
  overrides = dict(TINY) if args.tiny else {}
  if args.remat is not None:
    overrides["model.remat"] = tuple(part for part in args.remat.split(",") if part)
  config = config_lib.load_config(args.config, overrides, validate_config=False)
  mesh = sharding_lib.make_mesh()
  header = {
      "date": datetime.date.today().isoformat(),
      "device": f"{device.device_kind} x{jax.device_count()} ({device.platform})",
      "jax": jax.__version__,
      "command": "python benchmarks/gpu_report.py " + " ".join(sys.argv[1:] if argv is None
                                                                else argv),
      "network": f"ResNet-{config.model.depth} width {config.model.width}, "
                 f"{config.data.image_height}x{config.data.image_width}, "
                 f"{config.data.ids_per_batch} ids x {config.data.images_per_id} images at x1, "
                 f"student {config.distill.student_forward}, remat "
                 f"{','.join(config.model.remat) or 'none'}"
                 + ("" if config.model.non_local else ", non-local blocks off"),
  }
  print(f"gpu_report: {header['device']}, {header['network']}", flush=True)
  print(" | ".join(f"{c:>{column_width(c)}}" for c in COLUMNS), flush=True)
  rows, skipped, sources = run_rows(args, config, mesh, device.device_kind, started)
  header["total time"] = f"{time.perf_counter() - started:.0f} s"
  with open(args.output, "w") as f:
    f.write(markdown(rows, skipped, sources, header))
  print(f"gpu_report: wrote {args.output} ({len(rows)} rows, {len(skipped)} skipped) in "
        f"{header['total time']}", flush=True)


if __name__ == "__main__":
  main()
