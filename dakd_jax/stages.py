"""The stages that use a trained network: evaluation, extraction of new images, export.

Like the training loops (`train/loop.py`), each takes its parts built once by `stage_parts`
(the network, the evaluator or extractor, the restored variables) and hands them to the modules
below: the report writers, the deployment export. Outputs:
  <workdir>/eval/      config.json, results.json, features.npz, pictures; <workdir>/report.md
  <workdir>/extract/   config.json, embeddings of image folders, a ranking and its picture
  <workdir>/export/    config.json, extractor.onnx, extractor.stablehlo, manifest.json
  <workdir>/stages.json  stage=all: every stage's network on one protocol (`summarize_stages`)
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from dakd_jax import errors
from dakd_jax import provenance
from dakd_jax import sharding as sharding_lib
from dakd_jax import stage_parts
from dakd_jax.data import prepare
from dakd_jax.evaluation import evaluations
from dakd_jax.evaluation import evaluator as evaluator_lib
from dakd_jax.evaluation import folders
from dakd_jax.evaluation import report
from dakd_jax.evaluation import robustness_report
from dakd_jax.train import loop


def write_config(config: ml_collections.ConfigDict, directory: str) -> str:
  """Writes `directory`/config.json (the resolved config) and returns its path.

  The file is replaced whole (written beside it, then renamed), so a failed write leaves the
  previous one. Raises StorageError when it cannot be written.
  """
  path = os.path.join(directory, "config.json")
  temporary = f"{path}.tmp-{os.getpid()}"
  with errors.writing(f"config {path}"):
    os.makedirs(directory, exist_ok=True)
    try:
      with open(temporary, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
      os.replace(temporary, path)
    finally:
      if os.path.exists(temporary):  # A write cut short (full disk) leaves nothing behind.
        os.remove(temporary)
  return path


def describe_protocol(config: ml_collections.ConfigDict, data: prepare.DataBundle,
                      evaluator: evaluator_lib.Evaluator) -> dict:
  """What a report states next to its numbers (style.md: every report names its protocol)."""
  settings = sorted({p.setting for p in evaluator.protocols}, key=[
      p.setting for p in evaluator.protocols].index)
  description = {"dataset": data.dataset, "settings": settings,
                 "trials": sorted({p.trial for p in evaluator.protocols}),
                 **evaluator.settings.describe(),
                 "embedding": "unit BNNeck feature, inference mode", "similarity": "cosine"}
  if data.spec.trials:
    description["training_trial"] = data.trial
  return description


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str,
                   parts: stage_parts.EvaluationParts) -> dict:
  """stage=eval: every protocol of config.eval on a checkpoint (or saved features).

  Reads config.eval.features if set, else the variables `parts` restored from
  config.eval.checkpoint (default <workdir>/student): a stage checkpoint (its best evaluated
  step, else its newest) or a weights file. Prints the table and writes
  <workdir>/eval/{config.json, results.json, features.npz} and, with
  config.eval.pictures, the pictures and <workdir>/report.md; an evaluation of another
  checkpoint or with other settings writes them in <workdir>/eval/<tag>/ instead
  (`evaluations.evaluation_tag`). Every evaluation is listed in <workdir>/eval/index.json.
  With config.eval.corruption, the corrupted evaluations go to their own folder instead
  (`robustness_report.run`).
  """
  tag = evaluations.evaluation_tag(config, workdir)
  out_dir = evaluations.evaluation_dir(workdir, tag)
  data, model, evaluator = parts.data, parts.model, parts.evaluator
  variables, described = parts.variables, parts.source
  is_main = jax.process_index() == 0
  if config.eval.features:
    embeddings = report.load_saved_features(config.eval.features, data)
  else:
    embeddings = evaluator.embed(variables, rows=np.arange(len(data.test_meta["label"])))
  source = described["source"]
  results = evaluator.score(embeddings)
  summary = {"source": source,
             "checkpoint_selection": described.get("selection_label", "not a stage checkpoint"),
             "protocol": describe_protocol(config, data, evaluator),
             "data_fingerprint": data.fingerprint, "results": results}
  summary["workdir"] = workdir  # Sources inside it are found again in a moved copy.
  if data.held_out:
    summary["training_set"] = data.held_out
  if described.get("file_metadata"):
    summary["recorded_by_file"] = described["file_metadata"]
  summary["provenance"] = provenance.describe()
  if robustness_report.is_requested(config):  # Its own folder; eval/results.json untouched.
    corrupted = robustness_report.run(config, workdir, data, evaluator, variables, embeddings,
                                      summary, is_main=is_main)
    if is_main:
      write_config(config, robustness_report.output_dir(config, workdir))
    return corrupted
  if is_main:
    print("\n" + report.format_table(results, title=report.table_title(summary)))
    if report.format_verification(results):
      print(report.format_verification(results))
    if summary.get("recorded_by_file"):
      print(report.format_recorded(summary["recorded_by_file"], results))
    replaced = evaluations.replaced_evaluation(workdir, out_dir, source)
    if replaced:
      print(replaced)
    with errors.writing(f"evaluation results in {out_dir}"):
      write_config(config, out_dir)
      if not config.eval.features:
        report.save_features(os.path.join(out_dir, "features.npz"), embeddings, data,
                             source=source)
      report.write_results(os.path.join(out_dir, "results.json"), summary)
      index = evaluations.record_evaluation(workdir, tag, summary)
      if config.eval.pictures:
        paths = report.write_run_pictures(
            workdir, data, embeddings, evaluator.rows, summary, top_k=config.eval.visual_top_k,
            num_queries=config.eval.num_visual_queries, seed=config.seed, out_dir=out_dir)
        if config.eval.analysis:
          paths.update(report.write_analysis_pictures(
              workdir, data, embeddings, evaluator.rows, method=config.eval.analysis_method,
              seed=config.seed, max_identities=config.eval.analysis_identities,
              num_queries=min(4, config.eval.num_visual_queries),
              top_k=min(4, config.eval.visual_top_k), model=model, variables=variables,
              out_dir=out_dir))
        path = evaluations.report_path(workdir, tag)
        report.write_report(workdir, config.to_dict(), summary, paths, path=path,
                            evaluations=evaluations.format_index(
                                index, os.path.relpath(workdir, os.path.dirname(path))))
        print(f"dakd_jax: pictures in {out_dir}, report in {path}")
      if len(index) > 1:
        print(f"dakd_jax: {len(index)} evaluations in this workdir, listed in "
              f"{os.path.join(workdir, 'eval', evaluations.INDEX_NAME)}")
  return summary


def extract_stage(config: ml_collections.ConfigDict, workdir: str,
                  parts: stage_parts.EvaluationParts) -> dict:
  """stage=extract: embeds config.extract's folders with the extractor of `parts` (the network
  of eval.checkpoint, default <workdir>/student) and ranks the queries against the gallery;
  see `folders`."""
  e = config.extract
  described = parts.source
  out_dir = os.path.join(workdir, folders.OUT_DIR)
  with errors.writing(f"extracted embeddings in {out_dir}"):
    write_config(config, out_dir)
    result = folders.extract_folders(
        parts.extractor, out_dir, query_dir=e.query_dir, query_modality=e.query_modality,
        gallery_dir=e.gallery_dir, gallery_modality=e.gallery_modality,
        top_k=config.eval.visual_top_k, num_pictured=config.eval.num_visual_queries)
  print(f"dakd_jax: embeddings of {len(result['query_files'])} query and "
        f"{len(result.get('gallery_files', []))} gallery image(s) from {described['source']} "
        f"in {out_dir}")
  return result


VERIFY_IMAGES = 8  # test images of each modality run through the exported files


def verification_images(data: prepare.DataBundle | None):
  """(images uint8 [n, H, W, 3], modality codes [n]) of the prepared test split: the first
  VERIFY_IMAGES of each modality; (None, None) without a dataset."""
  if data is None:
    return None, None
  modality = np.asarray(data.test_meta["modality"])
  rows = np.concatenate([np.flatnonzero(modality == code)[:VERIFY_IMAGES] for code in (0, 1)])
  images = np.stack([data.test_source[int(row)]["image"] for row in rows])
  return images, modality[rows].astype(np.int32)


def recorded_results(workdir: str, source: str, use_flip: bool = False) -> dict | None:
  """The headline numbers of the workdir's evaluation of `source` with the exported settings
  (flip as `use_flip`, no re-ranking or query expansion): <workdir>/eval/results.json, else
  that checkpoint's evaluation in eval/<tag>/; found also when the workdir was copied or moved
  since; None when there is none."""
  wanted = evaluations.in_workdir(source, workdir)
  folders_to_read = [evaluations.evaluation_dir(workdir, "")] + [
      os.path.join(workdir, entry["folder"]) for entry in evaluations.read_index(workdir).values()
      if isinstance(entry, dict) and "folder" in entry]
  for folder in folders_to_read:
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      stored = json.load(f)
    protocol = stored.get("protocol", {})
    is_plain = bool(protocol.get("flip")) == use_flip and not any(
        protocol.get(name) for name in ("rerank", "query_expansion"))
    stored_source = evaluations.in_workdir(stored.get("source", ""),
                                           stored.get("workdir", workdir))
    if stored_source == wanted and is_plain:
      return {"protocol": protocol, "results": {
          setting: values["mean"] for setting, values in stored["results"].items()}}
  return None


def export_stage(config: ml_collections.ConfigDict, workdir: str,
                 parts: stage_parts.EvaluationParts) -> dict:
  """stage=export: the network of `parts` (eval.checkpoint, default <workdir>/student) as a
  verified ONNX file and a StableHLO file with a manifest, in <workdir>/export (see
  `dakd_jax.deploy`); verified on the test images of `parts.data` when there is one."""
  from dakd_jax import deploy  # Deferred: the optional export extra.
  model, variables, described = parts.model, parts.variables, parts.source
  images, modality = verification_images(parts.data)
  out_dir = os.path.join(workdir, "export")
  write_config(config, out_dir)
  manifest = {"checkpoint": described["source"], "checkpoint_stage": described["stage"],
              "dataset": config.data.dataset,
              "results": recorded_results(workdir, described["source"], config.eval.flip),
              "authors_metadata": described.get("file_metadata")}
  written = deploy.export_extractor(
      model, jax.device_get(variables), image_height=config.data.image_height,
      image_width=config.data.image_width, out_dir=out_dir, manifest=manifest,
      verify_images=images, verify_modality=modality, use_flip=config.eval.flip,
      show_progress=config.log.progress and jax.process_index() == 0)
  print(f"dakd_jax: exported {described['source']} to {out_dir} (extractor.onnx, "
        "extractor.stablehlo, manifest.json)")
  return written


STAGES_SUMMARY = "stages.json"


def _stage_row(name: str, source: str, step, results: dict) -> dict:
  return {"name": name, "source": source, "step": step, "results": results}


def _difference(row: dict, reference: dict, setting: str) -> str:
  """'R1 +13.19, mAP +8.68' (percentage points) of row over reference on `setting`."""
  ours, theirs = row["results"][setting]["mean"], reference["results"][setting]["mean"]
  return (f"R1 {100 * (ours['cmc'][0] - theirs['cmc'][0]):+.2f}, "
          f"mAP {100 * (ours['mAP'] - theirs['mAP']):+.2f}, "
          f"mINP {100 * (ours['mINP'] - theirs['mINP']):+.2f}")


def format_stages(summary: dict) -> str:
  """The printed form of `summarize_stages`' result: its table, then the teacher's difference
  to the network it started from and the student's difference to the teacher."""
  setting, rows = summary["setting"], summary["rows"]
  trials = len(rows[0]["results"][setting]["trials"])
  table = report.format_table(
      {row["name"]: row["results"][setting] for row in rows},
      title=f"every stage on {setting}, {trials} trials\n(the last evaluation of each stage, "
            "no best-of selection)")
  by_name = {row["name"].split(" (")[0]: row for row in rows}
  lines = [table]
  start = by_name.get("initial weights", by_name["untrained"])
  if "teacher" in by_name:
    lines.append(f"teacher - {start['name']}: {_difference(by_name['teacher'], start, setting)}")
  if "teacher" in by_name and "student" in by_name:
    difference = _difference(by_name["student"], by_name["teacher"], setting)
    lines.append(f"student - teacher: {difference}")
  return "\n".join(lines)


def summarize_stages(config: ml_collections.ConfigDict, workdir: str,
                     parts: stage_parts.EvaluationParts) -> dict:
  """stage=all's closing table: what each stage contributes, all on one protocol.

  `config` is the one the teacher and student trained with, `parts` built from it
  (`stage_parts.make_evaluation_parts(..., "summary")`). The protocol is the training-time one,
  whose first setting is reported, e.g. SYSU-MM01 all-search single-shot over
  config.eval.num_trials trials. Rows, in order:
    untrained        the architecture at the teacher's random initialisation
                     (stage_parts.teacher_keys), where the teacher starts when there are no
                     initial weights;
    initial weights  config.model.init_weights (a file, or the pretrain stage's backbone.npz),
                     the start of both the teacher and the student; only when set;
    teacher, student the stages' last training-time evaluations (loop.LAST_EVALUATION in
                     <workdir>/teacher and <workdir>/student), not a best-of selection.
  Prints the table (process 0), writes <workdir>/STAGES_SUMMARY and returns
  {'setting': name, 'rows': [{'name', 'source', 'step', 'results'}]}, where 'results' is the
  evaluator's {setting: {'mean', 'trials'}}.
  """
  evaluator, mesh = parts.evaluator, parts.mesh
  rows = [_stage_row("untrained (random init)", f"random initialisation, seed {config.seed}",
                     0, evaluator.run(sharding_lib.replicate(parts.variables, mesh)))]
  if parts.initial_variables is not None:
    label = "pretrain" if config.pretrain.enabled else "file"
    rows.append(_stage_row(f"initial weights ({label})", config.model.init_weights, 0,
                           evaluator.run(sharding_lib.replicate(parts.initial_variables,
                                                                mesh))))
  for stage in ("teacher", "student"):
    last = loop.read_last_evaluation(os.path.join(workdir, stage))
    if last is not None:
      name = f"{stage} ({config.distill.ablation})" if stage == "student" else stage
      rows.append(_stage_row(f"{name} (step {last['step']})", os.path.join(workdir, stage),
                             last["step"], last["results"]))
  summary = {"setting": next(iter(rows[0]["results"])), "rows": rows}
  if jax.process_index() == 0:
    report.write_results(os.path.join(workdir, STAGES_SUMMARY), summary)
    print("\n" + format_stages(summary), flush=True)
  return summary
