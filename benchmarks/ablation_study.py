"""The paper's distillation ablation (method.md 4.6) on the synthetic demo data: both presets,
several seeds, one table and one CMC picture.

  python benchmarks/ablation_study.py                        # about 15 minutes on 2 CPU cores
  python benchmarks/ablation_study.py --out=workdirs/ablation_study --seeds=0,1,2
  python benchmarks/ablation_study.py --set=distill.epochs=2  # any config field, every run
  python benchmarks/ablation_study.py --ablations=only_kd,full_mlkd  # a subset of the four

Everything runs through the package's public entry points (`dakd_jax.load_config`,
`dakd_jax.run_stages`) with `configs/demo.py[:preset]` and its settings unchanged; seeds are
`config.seed`. For each preset (default, released_code) the study:
  1. runs the pretrain stage once (seed 0): the demo's stand-in for ImageNet weights, the start
     of every later run of the preset, as one ImageNet file would be;
  2. trains one teacher from it (seed = the first seed; --teacher_per_seed: one per seed);
  3. for each seed, distils one student per ablation (only_kd, mlkd_no_instance, mlkd_no_class,
     full_mlkd) from that teacher. Nothing is tuned per ablation: the four students of a seed
     differ only in `distill.ablation`, and the comparison between them is paired (same
     teacher, same seed: same batches and augmentation keys).
Each network is scored by its stage's last training-time evaluation (SYSU-MM01 all-search
single-shot, eval.num_trials gallery trials; no best-of selection). Writes <out>/ablation.md
(mean +- sample std over seeds of R1, mAP, mINP, plus the paired full_mlkd - only_kd difference),
<out>/ablation.json (every seed's numbers and CMC) and <out>/cmc.png. A finished run is resumed,
not retrained, so running the study again only redoes what is missing. Programs are compiled
once per preset and ablation (a persistent XLA cache, <out>/jax_cache or
$JAX_COMPILATION_CACHE_DIR, serves later seeds).
"""
import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

PRESETS = ("default", "released_code")
ABLATIONS = ("only_kd", "mlkd_no_instance", "mlkd_no_class", "full_mlkd")
CONFIG = os.path.join(REPO, "configs", "demo.py")
METRICS = ("R1", "mAP", "mINP")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="workdirs/ablation_study", help="output folder")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated config.seed values")
  parser.add_argument("--presets", default=",".join(PRESETS))
  parser.add_argument("--ablations", default=",".join(ABLATIONS),
                      help="comma-separated distill.ablation values to train (default: all "
                           "four; the paired row needs only_kd and full_mlkd)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override applied to every run (repeatable)")
  parser.add_argument("--teacher_per_seed", action="store_true",
                      help="train a teacher per seed (default: one teacher per preset, seed "
                           "= the first seed, shared by every student of the preset)")
  parser.add_argument("--compilation_cache", default="",
                      help="persistent XLA compilation cache folder; '' = "
                           "$JAX_COMPILATION_CACHE_DIR if set, else <out>/jax_cache")
  return parser.parse_args(argv)


def enable_compilation_cache(folder):
  """Runs of the same preset and ablation compile the same programs: seeds 2.. reuse them. Every
  program is kept, the quick ones too: each run builds its steps anew, so even a program that
  compiles in 0.5 s would otherwise be compiled again by every run."""
  import jax  # Deferred: after argument parsing.
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def run(config_path, overrides, workdir):
  """load_config + run_stages, as a notebook would; returns run_stages' result."""
  import dakd_jax  # Deferred: importing it is cheap, running it is not.
  config = dakd_jax.load_config(config_path, overrides)
  return dakd_jax.run_stages(config, workdir)


def last_scores(stage_workdir):
  """R1, mAP, mINP (percent) and the mean CMC of a stage's last evaluation (first setting)."""
  from dakd_jax.train import loop  # Deferred like run.
  last = loop.read_last_evaluation(stage_workdir)
  if last is None:
    raise RuntimeError(f"{stage_workdir} has no evaluation: did its run finish?")
  setting, values = next(iter(last["results"].items()))
  mean = values["mean"]
  return {"setting": setting, "trials": len(values["trials"]), "step": last["step"],
          "R1": 100 * mean["cmc"][0], "mAP": 100 * mean["mAP"], "mINP": 100 * mean["mINP"],
          "cmc": [100 * v for v in mean["cmc"]]}


def run_study(out, seeds, presets, extra_overrides, *, ablations=ABLATIONS,
              teacher_per_seed=False, log=print):
  """Trains everything (or resumes it) and returns {preset: {network: [scores per seed]}},
  network in ('teacher',) + ablations, seeds in the order given. The teacher list has one
  entry (seeds[0]) unless teacher_per_seed."""
  common = {"log.progress": False, "eval.pictures": False}
  common.update(dict(item.split("=", 1) for item in extra_overrides))
  started = time.perf_counter()
  scores = {}
  for preset in presets:
    preset_dir = os.path.join(out, preset)
    # Seed 0 for the stand-in of ImageNet weights, whatever the seeds: every run of a preset
    # starts from this one file, as every real run starts from the same ImageNet file.
    run(f"{CONFIG}:{preset}", {**common, "stage": "pretrain", "seed": 0,
                               "pretrain.enabled": True}, preset_dir)
    backbone = os.path.join(preset_dir, "pretrain", "backbone.npz")
    log(f"[{time.perf_counter() - started:.0f} s] {preset}: pretrain done")
    scores[preset] = {name: [] for name in ("teacher", *ablations)}
    for index, seed in enumerate(seeds):
      base = {**common, "seed": seed, "pretrain.enabled": False, "model.init_weights": backbone}
      teacher_seed = seed if teacher_per_seed else seeds[0]
      teacher_dir = os.path.join(preset_dir, f"teacher_seed{teacher_seed}")
      if teacher_per_seed or index == 0:
        run(f"{CONFIG}:{preset}", {**base, "seed": teacher_seed, "stage": "teacher"},
            teacher_dir)
        scores[preset]["teacher"].append(last_scores(os.path.join(teacher_dir, "teacher")))
      for ablation in ablations:
        workdir = os.path.join(preset_dir, f"seed{seed}", ablation)
        run(f"{CONFIG}:{preset}", {
            **base, "stage": "student", "distill.ablation": ablation,
            "distill.teacher_checkpoint": os.path.join(teacher_dir, "teacher")}, workdir)
        scores[preset][ablation].append(last_scores(os.path.join(workdir, "student")))
      log(f"[{time.perf_counter() - started:.0f} s] {preset}: seed {seed} done")
  return scores


def mean_std(values):
  """'mean +- sample std' of a list; a single value is shown alone."""
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f"{values[0]:.2f}"
  return f"{values.mean():.2f} +- {values.std(ddof=1):.2f}"


def markdown_table(scores, seeds):
  """The study's table: one row per preset and network, then full_mlkd - only_kd per preset."""
  first = next(iter(next(iter(scores.values())).values()))[0]
  lines = [f"{first['setting']}, {first['trials']} gallery trials, last evaluation of each run; "
           f"mean +- sample std over runs (seeds {', '.join(str(s) for s in seeds)}), percent.",
           "", "| preset | network | runs | steps | R1 | mAP | mINP |",
           "|---|---|---|---|---|---|---|"]
  for preset, networks in scores.items():
    for name, runs in networks.items():
      label = "teacher" if name == "teacher" else f"student `{name}`"
      lines.append(f"| {preset} | {label} | {len(runs)} | {runs[0]['step']} | " +
                   " | ".join(mean_std([r[m] for r in runs]) for m in METRICS) + " |")
  if not all("full_mlkd" in networks and "only_kd" in networks for networks in scores.values()):
    return "\n".join(lines) + "\n"
  lines += ["", "Paired by seed (same teacher, same batches), full_mlkd - only_kd:", "",
            "| preset | R1 | mAP | mINP | full_mlkd ahead in R1 |", "|---|---|---|---|---|"]
  for preset, networks in scores.items():
    pairs = list(zip(networks["full_mlkd"], networks["only_kd"]))
    ahead = sum(f["R1"] > k["R1"] for f, k in pairs)
    lines.append(f"| {preset} | " + " | ".join(
        mean_std([f[m] - k[m] for f, k in pairs]) for m in METRICS) +
        f" | {ahead} of {len(pairs)} seeds |")
  return "\n".join(lines) + "\n"


def cmc_picture(scores, path):
  """One panel per preset: mean CMC over seeds of the teacher and each ablation, +- std band."""
  from dakd_jax.evaluation import plots
  figure, axes = plots.new_figure(1, len(scores), size=(6 * len(scores), 4.2))
  for axis, (preset, networks) in zip(axes[0], scores.items()):
    for name, runs in networks.items():
      curves = np.array([r["cmc"] for r in runs])
      ranks = np.arange(1, curves.shape[1] + 1)
      mean, std = curves.mean(0), curves.std(0, ddof=1) if len(runs) > 1 else 0 * curves[0]
      line, = axis.plot(ranks, mean, marker=".", linestyle="--" if name == "teacher" else "-",
                        label=f"{name} (R1 {mean[0]:.1f})")
      axis.fill_between(ranks, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    axis.set(title=f"{preset}: mean over {len(runs)} seed(s), band +- 1 std", xlabel="rank",
             ylabel="matching rate (%)", ylim=(0, 101))
    axis.set_xticks(ranks[::max(1, len(ranks) // 10)])
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
  figure.tight_layout()
  figure.savefig(path)
  return path


def main(argv=None):
  args = parse_args(argv)
  ablations = tuple(a for a in args.ablations.split(",") if a)
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown or not ablations:
    raise SystemExit(f"ablation_study: --ablations={args.ablations!r}: each must be one of "
                     f"{', '.join(ABLATIONS)}")
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  enable_compilation_cache(args.compilation_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                           or os.path.join(out, "jax_cache"))
  from absl import flags  # Grain reads absl flags; a script must mark them parsed.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  from dakd_jax import host_allocator
  host_allocator.keep_freed_memory()  # as run.py: freed buffers kept for the next step
  seeds = [int(s) for s in args.seeds.split(",")]
  presets = [p for p in args.presets.split(",") if p]
  started = time.perf_counter()
  scores = run_study(out, seeds, presets, args.set, ablations=ablations,
                     teacher_per_seed=args.teacher_per_seed)
  table = markdown_table(scores, seeds)
  with open(os.path.join(out, "ablation.md"), "w") as f:
    f.write(table)
  with open(os.path.join(out, "ablation.json"), "w") as f:
    json.dump({"seeds": seeds, "teacher_per_seed": args.teacher_per_seed,
               "overrides": args.set, "scores": scores}, f, indent=2)
  picture = cmc_picture(scores, os.path.join(out, "cmc.png"))
  print("\n" + table + f"\nwritten: {out}/ablation.md, ablation.json, {os.path.basename(picture)}"
        f" ({time.perf_counter() - started:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
