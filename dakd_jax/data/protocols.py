"""Evaluation protocols: which images are queries and which are gallery, per trial.

Sits between the readers and the evaluation code: a `Protocol` names one setting (dataset,
mode, shots, direction, trial) and `query_gallery` returns its two record lists, drawn by the
dataset's own module (`sysu.gallery`, `regdb.query_gallery_of`) through its spec. The draws
reproduce the reference code file for file (method.md 7.2, 7.3).
"""
from __future__ import annotations

from dakd_jax.data import specs
from dakd_jax.data.records import ImageRecord, Protocol, ProtocolOptions  # pylint: disable=unused-import


def check_protocol(protocol: Protocol) -> None:
  """Raises ValueError (ConfigError for an unknown dataset) unless the dataset accepts it."""
  specs.get_spec(protocol.dataset).check_protocol(protocol)


def query_gallery(protocol: Protocol, root: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
  """(query, gallery) records of a protocol read from `root`.

  Raises ValueError for a protocol its dataset does not accept; DatasetError for missing or
  malformed files (see the dataset's reader).
  """
  spec = specs.get_spec(protocol.dataset)
  spec.check_protocol(protocol)
  return spec.query_gallery(protocol, root)
