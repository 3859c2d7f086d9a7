"""What a preparation wrote, recorded so that a damaged or incomplete prepared copy is found.

A prepared copy (`<prepared_dir>/<dataset>/<config>/<version>/`) is keyed by its source tree
only; a later truncation (a full disk, a copy cut short, `truncate`) would otherwise surface as
a reader error deep in a run. After a preparation, `record_files` writes RECORD_NAME beside the
files: each file's size and a CRC-32 of its first and last 64 KiB (cheap however large the file
is; a changed size or end is what truncation and interrupted copies leave). `find_damage`
compares a copy with its record before it is opened.
"""
from __future__ import annotations

import json
import os
import zlib

RECORD_NAME = "dakd_files.json"
CHECKED_BYTES = 64 * 1024  # read at each end of every file


def file_signature(path: str) -> dict:
  """{'size': bytes, 'crc32': CRC-32 of the first and last CHECKED_BYTES} of one file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    checksum = zlib.crc32(f.read(CHECKED_BYTES))
    if size > CHECKED_BYTES:
      f.seek(max(CHECKED_BYTES, size - CHECKED_BYTES))
      checksum = zlib.crc32(f.read(CHECKED_BYTES), checksum)
  return {"size": size, "crc32": checksum}


def _listed_files(directory: str) -> list[str]:
  return sorted(name for name in os.listdir(directory)
                if name != RECORD_NAME and os.path.isfile(os.path.join(directory, name)))


def record_files(directory: str) -> dict:
  """Writes `directory`/RECORD_NAME: {file name: file_signature} of every file there; returns
  it. Written beside, then renamed, so a cut write leaves no half record."""
  record = {name: file_signature(os.path.join(directory, name))
            for name in _listed_files(directory)}
  path = os.path.join(directory, RECORD_NAME)
  with open(f"{path}.tmp", "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(f"{path}.tmp", path)
  return record


def has_record(directory: str) -> bool:
  """Whether a preparation recorded its files in `directory`."""
  return os.path.isfile(os.path.join(directory, RECORD_NAME))


def find_damage(directory: str) -> list[str]:
  """What differs between the files in `directory` and their record: one phrase per damaged
  file ('x.array_record-00000-of-00001: 100 bytes, 4325376 recorded'), empty when the copy is
  whole. An unreadable record counts as damage."""
  try:
    with open(os.path.join(directory, RECORD_NAME)) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return [f"{RECORD_NAME}: unreadable"]
  damage = []
  for name, expected in sorted(record.items()):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      damage.append(f"{name}: missing")
      continue
    found = file_signature(path)
    if found["size"] != expected.get("size"):
      damage.append(f"{name}: {found['size']} bytes, {expected.get('size')} recorded")
    elif found["crc32"] != expected.get("crc32"):
      damage.append(f"{name}: its contents changed")
  return damage


def describe_damage(directory: str, damage: list[str]) -> str:
  """One line: the copy, the first damaged file and how many more."""
  more = f" (and {len(damage) - 1} more file(s))" if len(damage) > 1 else ""
  return f"the prepared copy {directory} is damaged: {damage[0]}{more}"
