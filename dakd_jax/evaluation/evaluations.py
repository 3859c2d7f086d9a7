"""Where each evaluation of a workdir lives, so that one never silently replaces another.

The default evaluation (the workdir's own student, plain settings) stays where CI and the README
read it: `<workdir>/eval/results.json`, `eval/cmc.png`, `eval/ranked_*.png`, `report.md`. Any
other evaluation (another checkpoint, saved features, re-ranking, flip, query expansion) goes
to `<workdir>/eval/<tag>/` with its own `report.md`, named by `evaluation_tag`. Every evaluation
is recorded in `<workdir>/eval/index.json`, which each report lists. Paths recorded there are
relative to the workdir, so a copied or moved workdir still finds its evaluations.
"""
from __future__ import annotations

import datetime
import json
import os
import re
from typing import Callable

import ml_collections

from dakd_jax import errors

INDEX_NAME = "index.json"
WORKDIR_MARK = "<workdir>"
# Settings that change an evaluation's numbers, each with the word its tag gets. Other
# evaluation options (corruptions, ...) add a (word-of-config) function here: None leaves the
# word out.
SETTING_WORDS: tuple[Callable[[ml_collections.ConfigDict], str | None], ...] = (
    lambda config: "flip" if config.eval.flip else None,
    lambda config: "rerank" if config.eval.rerank else None,
    lambda config: "aqe" if config.eval.query_expansion else None,
)


def _clean(text: str) -> str:
  """A file-name-safe word: letters, digits, '.', '_' and '-' only."""
  return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "checkpoint"


def checkpoint_word(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """None for the workdir's student (the default checkpoint); else a word naming what is
  evaluated: 'features', a stage of this workdir ('teacher'), or the file's or folder's name."""
  if config.eval.features:
    return "features-" + _clean(os.path.splitext(os.path.basename(config.eval.features))[0])
  source = config.eval.checkpoint
  if not source:
    return None
  source = os.path.abspath(source).rstrip(os.sep)
  workdir = os.path.abspath(workdir)
  if source == os.path.join(workdir, "student"):
    return None
  if source.startswith(workdir + os.sep):
    return _clean(os.path.relpath(source, workdir).replace(os.sep, "-"))
  return _clean(os.path.splitext(os.path.basename(source))[0])


def setting_words(config: ml_collections.ConfigDict) -> list[str]:
  """The words of SETTING_WORDS that apply to `config`, in table order."""
  return [word for word in (rule(config) for rule in SETTING_WORDS) if word]


def evaluation_tag(config: ml_collections.ConfigDict, workdir: str) -> str:
  """'' for the default evaluation; else e.g. 'rerank', 'teacher', 'teacher-flip-rerank'."""
  words = [checkpoint_word(config, workdir)] + setting_words(config)
  return "-".join(word for word in words if word)


def evaluation_dir(workdir: str, tag: str) -> str:
  """<workdir>/eval for the default evaluation, <workdir>/eval/<tag> for the others."""
  return os.path.join(workdir, "eval", tag) if tag else os.path.join(workdir, "eval")


def report_path(workdir: str, tag: str) -> str:
  """<workdir>/report.md for the default evaluation, <workdir>/eval/<tag>/report.md else."""
  return os.path.join(evaluation_dir(workdir, tag), "report.md") if tag else os.path.join(
      workdir, "report.md")


def in_workdir(path: str, workdir: str) -> str:
  """`path` with a leading `workdir` written as '<workdir>' (also inside a longer text, such as
  'W/student/checkpoints step 80 [last step]'): the same in every copy of the workdir."""
  workdir = os.path.abspath(workdir)
  if path == workdir or path.startswith(workdir + os.sep):
    return WORKDIR_MARK + path[len(workdir):]
  return path


def read_index(workdir: str) -> dict:
  """{tag: entry} of <workdir>/eval/index.json ({} when there is none or it is unreadable)."""
  path = os.path.join(workdir, "eval", INDEX_NAME)
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError):
    return {}
  return index if isinstance(index, dict) else {}


def record_evaluation(workdir: str, tag: str, summary: dict) -> dict:
  """Adds (or replaces) the entry of `tag` in <workdir>/eval/index.json; returns the index.

  An entry: {'folder', 'report' (relative to the workdir), 'source' (with '<workdir>' for
  the workdir), 'settings' (the tag's setting words), 'written' (UTC), 'headline' (the first
  setting's mean rank-1 and mAP)}.
  """
  index = read_index(workdir)
  first = next(iter(summary["results"].values()))["mean"]
  index[tag or "default"] = {
      "folder": os.path.relpath(evaluation_dir(workdir, tag), workdir).replace(os.sep, "/"),
      "report": os.path.relpath(report_path(workdir, tag), workdir).replace(os.sep, "/"),
      "source": in_workdir(summary["source"], workdir),
      "setting": next(iter(summary["results"])),
      "headline": {"R1": first["cmc"][0], "mAP": first["mAP"]},
      "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  path = os.path.join(workdir, "eval", INDEX_NAME)
  temporary = f"{path}.tmp-{os.getpid()}"
  with errors.writing(f"evaluation index {path}"):
    with open(temporary, "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
    os.replace(temporary, path)
  return index


def replaced_evaluation(workdir: str, out_dir: str, source: str) -> str | None:
  """A line saying what an evaluation about to be written in `out_dir` replaces, when the
  evaluation there is of another checkpoint step or file (compared by its place in the
  workdir, which may have been moved since); None otherwise."""
  path = os.path.join(out_dir, "results.json")
  try:
    with open(path) as f:
      stored = json.load(f)
    earlier = stored.get("source")
    earlier_in_workdir = in_workdir(earlier, stored.get("workdir", workdir))
  except (OSError, ValueError, AttributeError, TypeError):
    return None
  if earlier_in_workdir == in_workdir(source, workdir):
    return None
  return (f"dakd_jax: {out_dir} held the evaluation of {earlier}; it is replaced by that of "
          f"{source} (same settings: the newer checkpoint)")


def format_index(index: dict, to_workdir: str = ".") -> list[str]:
  """Markdown lines listing the workdir's evaluations, for a report whose folder reaches the
  workdir by the relative path `to_workdir` ('.' or '../..')."""
  lines = ["| evaluation | checkpoint | setting | R1 | mAP | written | report |",
           "|---|---|---|---|---|---|---|"]
  for tag, entry in sorted(index.items(), key=lambda item: (item[0] != "default", item[0])):
    headline = entry.get("headline", {})
    lines.append(
        f"| {tag} | `{entry.get('source', '-')}` | {entry.get('setting', '-')} | "
        f"{100 * headline.get('R1', float('nan')):.2f} | "
        f"{100 * headline.get('mAP', float('nan')):.2f} | {entry.get('written', '-')} | "
        f"[{entry.get('report', '-')}]({to_workdir}/{entry.get('report', '')}) |")
  return lines
