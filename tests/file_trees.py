"""Snapshots of folders for tests that check what a run wrote, or left untouched."""
import os


def tree_bytes(root) -> dict[str, bytes]:
  """{relative path: file bytes} for every file under root."""
  found = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as file:
        found[os.path.relpath(path, root)] = file.read()
  return found
