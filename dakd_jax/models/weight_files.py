"""Weight files on disk: safetensors, npz and torch pickles read as tensors, with their metadata.

First step of every weight import (ImageNet initialisation, method.md 2.4; the authors' released
checkpoints; our own variable files): a file becomes a flat {name: array} state dict plus the
JSON-able metadata saved beside it. `weights.py` then maps the names onto the model; this module
knows nothing about the model.

Torch files (`.pth`, `.pt`, `.t`) are read on the CPU with `torch.load(weights_only=True)`:
tensors, containers and plain Python values, plus exactly the numpy globals that the authors'
checkpoints use for their recorded metrics (`_NUMPY_GLOBALS`). Nothing else is ever unpickled; a
file that needs more is refused with a message saying how to save it as tensors.

An authors' checkpoint is a dict {'net': state dict, 'epoch', 'mAP', 'mINP', 'cmc', 'ablation',
'config'}; a `.safetensors` converted from one (`weights.convert_to_safetensors`) records the
metadata and the file's kind in its header under the `HEADER_*` keys.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from dakd_jax.errors import MissingFileError
from dakd_jax.errors import WeightsError  # pylint: disable=unused-import  (re-exported)
import safetensors
from numpy._core import multiarray

TORCH_EXTENSIONS = (".pth", ".pt", ".t")
EXTENSIONS = (".safetensors", ".npz") + TORCH_EXTENSIONS
CONVERT_HINT = ("install torch (CPU wheel is enough) or convert the file on a machine that has "
                "torch with `python -m dakd_jax.models.weights convert SRC DST.safetensors`")
# Keys of our .safetensors header (strings): the checkpoint's metadata as JSON, and its kind.
HEADER_METADATA = "dakd_jax.metadata"
HEADER_KIND = "dakd_jax.kind"
# The kinds of authors' file a converted header may record (see torch_layout.describe).
AUTHORS_KINDS = ("authors_teacher", "authors_student", "authors_network")

# What torch's weights-only unpickler needs for numpy arrays and scalars (the authors' 'cmc',
# 'mAP', 'mINP'): the reconstruct and scalar functions under numpy 2's and numpy 1's module
# names, the array and dtype classes, and the float dtype classes that a BUILD of a dtype checks.
# Object arrays stay refused: their dtype class is not listed.
_reconstruct = multiarray._reconstruct  # pylint: disable=protected-access
_NUMPY_GLOBALS = (
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (multiarray.scalar, "numpy._core.multiarray.scalar"),
    (multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    (np.dtypes.Float32DType, "numpy.dtypes.Float32DType"),
    (np.dtypes.Float64DType, "numpy.dtypes.Float64DType"),
)



@dataclasses.dataclass(frozen=True)
class WeightsHeader:
  """What a weights file holds, without its arrays.

  names: the state dict's names in file order.
  metadata: JSON-able entries saved beside an authors' state dict ('epoch' int, 'mAP'/'mINP'
    float, 'cmc' list of floats, 'ablation', 'config' text); {} for a bare state dict.
  is_checkpoint: the names come from the 'net' entry of a checkpoint dict (or a file converted
    from one).
  recorded_kind: the kind our converter wrote into a .safetensors header, else None.
  """
  names: tuple[str, ...]
  metadata: dict
  is_checkpoint: bool = False
  recorded_kind: str | None = None


def check_path(path: str) -> str:
  """Returns the lower-case extension of an existing weights file `path`.

  Raises FileNotFoundError if it does not exist, WeightsError for an unknown extension.
  """
  if not os.path.isfile(path):
    raise MissingFileError(f"weights file not found: {path!r} (check the path in the config; "
                            "nothing is downloaded at run time)")
  ext = os.path.splitext(path)[1].lower()
  if ext not in EXTENSIONS:
    raise WeightsError(f"unknown weights file extension {ext!r} in {path!r}: expected "
                       f"{', '.join(EXTENSIONS)}")
  return ext


def read_weights_file(path: str) -> tuple[dict[str, np.ndarray], WeightsHeader]:
  """Reads the whole state dict of `path` ({name: array}, bfloat16 widened to float32).

  Raises FileNotFoundError for a missing file; WeightsError (naming the file and the fix) for an
  unknown extension, a truncated or corrupted file, a torch file without torch installed, or one
  that holds objects other than tensors, numpy metrics and plain values.
  """
  ext = check_path(path)
  if ext == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    state = dict(_safetensors_call(path, load_file))
    return state, _safetensors_header(path)
  if ext == ".npz":
    state = _read_npz(path)
    return state, WeightsHeader(tuple(state), {})
  torch = _import_torch(path)
  tensors, header = _read_torch(path, mmap=False)
  return {name: _to_numpy(tensor, torch) for name, tensor in tensors.items()}, header


def read_weights_header(path: str) -> WeightsHeader:
  """The names and metadata of `path` without reading its arrays (torch files are memory-mapped,
  safetensors and npz read their directories only). Raises as `read_weights_file`."""
  ext = check_path(path)
  if ext == ".safetensors":
    return _safetensors_header(path)
  if ext == ".npz":
    _check_npz(path)
    with np.load(path, allow_pickle=False) as archive:
      return WeightsHeader(tuple(name for name in archive.files), {})
  return _read_torch(path, mmap=zipfile.is_zipfile(path))[1]


def _safetensors_call(path, function):
  try:
    return function(path)
  except safetensors.SafetensorError as err:
    raise WeightsError(f"{path!r} is not a readable .safetensors file ({err}); it is probably "
                       "truncated: copy or convert it again") from None


def _safetensors_header(path: str) -> WeightsHeader:
  def read(file_path):
    with safetensors.safe_open(file_path, "numpy") as archive:
      return tuple(archive.keys()), archive.metadata() or {}
  names, header = _safetensors_call(path, read)
  kind = header.get(HEADER_KIND)
  try:
    metadata = json.loads(header.get(HEADER_METADATA, "{}"))
  except json.JSONDecodeError as err:
    raise WeightsError(f"{path!r}: the {HEADER_METADATA} header entry is not JSON ({err}); "
                       "convert the checkpoint again") from None
  if kind is not None and kind not in AUTHORS_KINDS:
    raise WeightsError(f"{path!r}: the {HEADER_KIND} header entry is {kind!r}, expected one of "
                       f"{AUTHORS_KINDS}; convert the checkpoint again")
  return WeightsHeader(names, metadata, is_checkpoint=kind is not None, recorded_kind=kind)


def _check_npz(path: str) -> None:
  if not zipfile.is_zipfile(path):
    raise WeightsError(f"{path!r} is not a valid .npz file (not a zip archive of .npy arrays); "
                       "it is truncated or another format: write it again with numpy.savez")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  _check_npz(path)
  try:
    with np.load(path, allow_pickle=False) as archive:
      state = {name: archive[name] for name in archive.files}
  except (zipfile.BadZipFile, EOFError, OSError) as err:
    raise WeightsError(f"{path!r} is not a valid .npz file ({err}); write it again with "
                       "numpy.savez") from None
  except ValueError as err:
    if "allow_pickle" in str(err):  # numpy's refusal of object arrays.
      raise WeightsError(f"{path!r} holds object arrays, which are never unpickled; save "
                         "numeric arrays only") from None
    raise WeightsError(f"{path!r} is not a valid .npz file ({err}); write it again with "
                       "numpy.savez") from None
  for name, value in state.items():
    if not isinstance(value, np.ndarray):  # numpy returns a member without .npy header as bytes.
      raise WeightsError(f"{path!r} is not a valid .npz file (member {name!r} is not a .npy "
                         "array); write it again with numpy.savez")
  return state


def _import_torch(path: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise WeightsError(f"reading {path!r} needs torch: {CONVERT_HINT}") from err
  return torch


def _torch_load(path: str, mmap: bool, torch):
  """torch.load on the CPU with the weights-only unpickler and `_NUMPY_GLOBALS`."""
  try:
    with torch.serialization.safe_globals(list(_NUMPY_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
  except pickle.UnpicklingError:
    # torch's text suggests weights_only=False; this project never unpickles, so it is dropped.
    raise WeightsError(_refusal_message(path, torch)) from None
  except (RuntimeError, EOFError, OSError) as err:
    reason = str(err).split(". ", 1)[0] or type(err).__name__
    raise WeightsError(f"{path!r} is not a readable torch file ({reason}); it is probably "
                       "truncated or corrupted: copy it again") from None


def _refusal_message(path: str, torch) -> str:
  is_zip = zipfile.is_zipfile(path)
  if not is_zip and not _starts_like_pickle(path):
    return f"{path!r} is not a torch.save file (nor .safetensors or .npz); check the path"
  objects = ""
  if is_zip:
    allowed = {name for _, name in _NUMPY_GLOBALS}
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    objects = ", ".join(sorted(set(unsafe) - allowed))
  return (f"{path!r} holds objects other than tensors{f' ({objects})' if objects else ''}, and "
          "weights are only read as tensors, never unpickled. Where the code that wrote it runs, "
          "save the tensors only, torch.save(model.state_dict(), 'weights.pth'), and use that "
          "file, or convert it for machines without torch: `python -m dakd_jax.models.weights "
          "convert weights.pth weights.safetensors`")


def _starts_like_pickle(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(1) == b"\x80"  # The PROTO opcode that starts torch's legacy format.


def _read_torch(path: str, mmap: bool) -> tuple[dict[str, Any], WeightsHeader]:
  """Tensors {name: torch.Tensor} and header of a flat state dict or an authors' checkpoint."""
  torch = _import_torch(path)
  content = _torch_load(path, mmap, torch)
  is_checkpoint = isinstance(content, Mapping) and isinstance(content.get("net"), Mapping)
  state = content["net"] if is_checkpoint else content
  if not isinstance(state, Mapping) or not all(
      isinstance(value, torch.Tensor) for value in state.values()):
    keys = sorted(map(str, content))[:8] if isinstance(content, Mapping) else type(content)
    raise WeightsError(
        f"{path!r} is neither a flat state dict of tensors (name -> tensor) nor a checkpoint "
        f"dict whose 'net' entry is one (found {keys}); save model.state_dict() rather than "
        "the model or another training checkpoint")
  metadata = {str(key): metadata_value(key, value) for key, value in content.items()
              if key != "net"} if is_checkpoint else {}
  return dict(state), WeightsHeader(tuple(state), metadata, is_checkpoint=is_checkpoint)


def _to_numpy(tensor, torch) -> np.ndarray:
  # numpy has no bfloat16: widen it; other dtypes convert as they are.
  if tensor.dtype == torch.bfloat16:
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def metadata_value(key, value):
  """A checkpoint entry as JSON-able data: numpy/torch arrays become lists, numpy scalars Python
  numbers, 'config' becomes text (JSON for a mapping); unknown objects become their repr."""
  if key == "config" and not isinstance(value, str):
    return json.dumps(_jsonable(value), sort_keys=True)
  return _jsonable(value)


def _jsonable(value):
  if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors.
    return value.tolist()
  if isinstance(value, Mapping):
    return {str(key): _jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(item) for item in value]
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  return repr(value)


def safetensors_header_entries(metadata: dict, kind: str) -> dict[str, str]:
  """The header strings that record `metadata` and `kind` in a .safetensors we write."""
  return {HEADER_METADATA: json.dumps(metadata, sort_keys=True), HEADER_KIND: kind}


def is_torch_file(path: str) -> bool:
  """Whether `path` has one of the torch extensions (.pth, .pt, .t)."""
  return os.path.splitext(path)[1].lower() in TORCH_EXTENSIONS
