"""Every problem of a dataset's files in one message, and system junk skipped with one warning.

The readers (`sysu.py`, `llcm.py`) list identity folders whose entries must all be images: a
stray file would change the gallery draws. Instead of stopping at the first, they collect every
stray or empty entry (`list_image_names`) and raise one `DatasetError` listing the first
MAX_SHOWN and the count (`raise_if_stray`). Files an operating system leaves behind
(`.DS_Store`, `Thumbs.db`, `desktop.ini`, AppleDouble `._*`) are not the user's: the readers
skip them, and `junk_warning` names them all in one line when a dataset is loaded.
Before a preparation decodes anything, `unreadable_images` opens every image's header (the
RegDB lists name files the folder scan never sees) so that all of them are reported at once.
Inside `listings_read_once` (an evaluation's lookup of every protocol) each folder is listed once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import os
from typing import Sequence

from PIL import Image

from dakd_jax.errors import DatasetError

SYSTEM_JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
MAX_SHOWN = 10


def is_system_junk(name: str) -> bool:
  """Whether a file name is one an operating system writes by itself (never a dataset file)."""
  return name.lower() in SYSTEM_JUNK_NAMES or name.startswith("._")


# {(folder, extensions): (names, stray)} inside `listings_read_once`, else None.
_LISTINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("listings", default=None)


@contextlib.contextmanager
def listings_read_once():
  """Within the block `list_image_names` lists each folder once and then answers from memory.

  An evaluation's protocols read the same folders for every trial and setting (SYSU-MM01 lists
  its whole test split twice per protocol: 80 times for the 40 protocols of the demo's closing
  evaluation, each a stat of every file); the files do not change within one lookup.
  """
  token = _LISTINGS.set({})
  try:
    yield
  finally:
    _LISTINGS.reset(token)


def list_image_names(folder: str, extensions: Sequence[str], stray: list[str]) -> list[str]:
  """Sorted image file names in `folder` (Python string order), system junk left out.

  Every other entry that is not a non-empty file with one of `extensions` is appended to
  `stray` as its path (an empty image file is marked ' (empty)').
  """
  listings = _LISTINGS.get()
  key = (folder, tuple(extensions))
  if listings is not None and key in listings:
    names, found_stray = listings[key]
    stray.extend(found_stray)
    return list(names)
  names, found_stray = [], []
  for name in sorted(os.listdir(folder)):
    if is_system_junk(name):
      continue
    path = os.path.join(folder, name)
    if not (os.path.isfile(path) and name.lower().endswith(tuple(extensions))):
      found_stray.append(path)
    elif os.path.getsize(path) == 0:
      found_stray.append(f"{path} (empty)")
    else:
      names.append(name)
  if listings is not None:
    listings[key] = (tuple(names), tuple(found_stray))
  stray.extend(found_stray)
  return names


def _shown(paths: Sequence[str]) -> str:
  more = f" and {len(paths) - MAX_SHOWN} more" if len(paths) > MAX_SHOWN else ""
  return ", ".join(paths[:MAX_SHOWN]) + more


def raise_if_stray(title: str, stray: Sequence[str], extensions: Sequence[str]) -> None:
  """Raises one DatasetError naming every stray entry (the first MAX_SHOWN and the count)."""
  if stray:
    raise DatasetError(
        f"{title}: {len(stray)} entr{'y' if len(stray) == 1 else 'ies'} in identity folders "
        f"{'is not an image file' if len(stray) == 1 else 'are not image files'} "
        f"({', '.join(extensions)}, not empty): {_shown(stray)}. Remove them: they would "
        "change the gallery draws.")


def find_system_junk(root: str) -> list[str]:
  """Paths of the system junk files anywhere under `root`, sorted."""
  found = []
  for folder, _, names in os.walk(root):
    found.extend(os.path.join(folder, name) for name in names if is_system_junk(name))
  return sorted(found)


def junk_warning(title: str, junk: Sequence[str]) -> str | None:
  """The one warning line about skipped system junk, or None when there is none."""
  if not junk:
    return None
  return (f"dakd_jax: warning: {title}: skipped {len(junk)} system file(s) that are not part "
          f"of the dataset: {_shown(junk)}")


def _is_unreadable(path: str) -> bool:
  try:
    with Image.open(path) as image:  # Reads the header only.
      image.size  # pylint: disable=pointless-statement
    return False
  except (OSError, SyntaxError, ValueError):
    return True


def unreadable_images(paths: Sequence[str], title: str) -> None:
  """Raises one DatasetError naming every path in `paths` that is missing or whose header is
  not an image's (the first MAX_SHOWN and the count); returns None when all open."""
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    bad = [path for path, unreadable in zip(paths, pool.map(_is_unreadable, paths, chunksize=256))
           if unreadable]
  if bad:
    raise DatasetError(
        f"{title}: {len(bad)} image file(s) cannot be opened as images: {_shown(bad)}. "
        "Re-extract them from the dataset archive or delete them (and their list entries).")
