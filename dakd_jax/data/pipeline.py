"""Grain input pipelines from prepared ArrayRecord sources to uint8 host batches.

Data flow: `tfds_builders` (random-access source + metadata) -> here -> host batches -> the
sharding code turns them into global arrays -> one compiled step augments, normalises and runs
the model. Nothing here decodes or resizes: images were stored at the training size.

Training: `grain.MapDataset.range(start_step, num_steps)` -> draw the global batch of each step
(`sampler.batch_indices`, a function of (seed, step)) -> load this process's slice of it ->
`to_iter_dataset` (background threads) -> optional `mp_prefetch` worker processes. Every process
draws the same global batch; process `p` of `P` loads positions `[p*n/P, (p+1)*n/P)` of the
visible half and of the infrared half, so concatenating the processes' slices in process order
gives the global batch. Because a batch depends only on (seed, step), the step is the data
position: a resumed run starts the iterator at its restored step (`start_step`) and sees the
batches an uninterrupted run would, with any worker or process count.

Evaluation: fixed-size batches in order, the last one padded and masked, so the evaluation step
compiles once.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Sequence

import grain
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from dakd_jax.data import sampler
from dakd_jax.data import tfds_builders

# Batches each reading process keeps ready: enough to hide a slow read, small enough for memory
# (one RegDB batch of 2 x 40 images at 288x144 is ~10 MB).
_PREFETCH_BATCHES = 4


class ImageReader:
  """Reads the `image` feature of a source into a preallocated batch.

  For a prepared TFDS ArrayRecord source it reads the raw records in one batched call and parses
  only the image bytes (one protobuf parse + one copy per image, ~3x faster than TFDS's decoding
  of all six features); a `tfds_builders.SplitView` the same way, through its rows. Any other
  indexable of dicts (e.g. a list in a test) is read through `source[i]["image"]`.
  """

  def __init__(self, source: Sequence[dict[str, Any]]):
    self._rows = None
    if isinstance(source, tfds_builders.SplitView):
      self._rows, source = source.rows, source.images
    self._source = source
    self._raw = getattr(source, "data_source", None)
    info = getattr(source, "dataset_info", None)
    if self._raw is None or info is None:
      self._raw = None
      return
    self._shape = tuple(info.features["image"].shape)
    try:
      matches = not len(source) or np.array_equal(self._parse(self._raw[0]), source[0]["image"])
    except (ValueError, KeyError, IndexError):
      matches = False
    if not matches:
      raise ValueError(f"the image feature of {info.data_dir} is not stored as raw uint8 "
                       "bytes; prepare it with dakd_jax.data.tfds_builders")

  def _parse(self, record: bytes) -> np.ndarray:
    feature = tf_example_pb2.Example.FromString(record).features.feature["image"]
    return np.frombuffer(feature.bytes_list.value[0], dtype=np.uint8).reshape(self._shape)

  def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Images of `indices` as uint8 [len(indices), H, W, 3], written into `out` if given."""
    if self._rows is not None:
      indices = self._rows[np.asarray(indices, dtype=np.int64)]
    indices = [int(i) for i in indices]
    if self._raw is not None:
      images = map(self._parse, self._raw.__getitems__(indices) if indices else [])
    else:
      images = (self._source[i]["image"] for i in indices)
    for position, image in enumerate(images):
      if out is None:
        out = np.empty((len(indices),) + image.shape, dtype=np.uint8)
      out[position] = image
    return out


def process_slice(size: int, process_index: int, process_count: int) -> slice:
  """Positions `[p*size/P, (p+1)*size/P)` of a global batch of `size` owned by process p.

  Raises ValueError if `size` does not divide by `process_count` or the index is out of range.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
  if size % process_count:
    raise ValueError(f"global batch size {size} does not divide across {process_count} "
                     "processes; change ids_per_batch * images_per_id or the batch size")
  local = size // process_count
  return slice(process_index * local, (process_index + 1) * local)


class _DrawBatch:
  """step -> global batch indices (picklable for worker processes)."""

  def __init__(self, seed, visible_by_label, infrared_by_label, ids_per_batch, images_per_id):
    self._seed = seed
    self._visible_by_label = visible_by_label
    self._infrared_by_label = infrared_by_label
    self._ids_per_batch = ids_per_batch
    self._images_per_id = images_per_id

  def __call__(self, step: int) -> dict[str, Any]:
    visible, infrared, labels = sampler.batch_indices(
        int(step), seed=self._seed, visible_by_label=self._visible_by_label,
        infrared_by_label=self._infrared_by_label, ids_per_batch=self._ids_per_batch,
        images_per_id=self._images_per_id)
    return {"visible": visible, "infrared": infrared, "labels": labels, "step": int(step)}


class _LoadSlice:
  """Global batch indices -> this process's slice of images."""

  def __init__(self, reader: ImageReader, positions: slice):
    self._reader = reader
    self._positions = positions

  def __call__(self, drawn: dict[str, Any]) -> dict[str, np.ndarray]:
    return {
        "visible": self._reader.read(drawn["visible"][self._positions]),
        "infrared": self._reader.read(drawn["infrared"][self._positions]),
        "labels": drawn["labels"][self._positions].astype(np.int32),
        "step": np.int64(drawn["step"]),
    }


def end_with_parent(worker_index: int, worker_count: int) -> None:
  """Grain worker start-up (`mp_prefetch(worker_init_fn=...)`): on Linux the kernel kills the
  worker when the process that started it dies. Without it a `kill -9` of the run (the main
  process alone, e.g. by hand) leaves its loader workers running, holding its output pipe.
  Elsewhere, or where the parent is already gone, nothing changes."""
  del worker_index, worker_count
  if not sys.platform.startswith("linux"):
    return
  import ctypes  # pylint: disable=g-import-not-at-top
  parent = os.getppid()
  pr_set_pdeathsig = 1
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
  if os.getppid() != parent:  # The parent died before the request: end as it would have.
    os._exit(1)  # pylint: disable=protected-access


def _to_iterator(dataset: grain.MapDataset, num_workers: int,
                 read_threads: int) -> grain.DatasetIterator:
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=_PREFETCH_BATCHES))
  if num_workers > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PREFETCH_BATCHES),
                                            worker_init_fn=end_with_parent)
  return iter(iter_dataset)


def make_train_iterator(source: Sequence[dict[str, Any]], metadata: dict[str, np.ndarray], *,
                        seed: int, ids_per_batch: int, images_per_id: int, start_step: int,
                        num_steps: int, process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, read_threads: int = 2) -> grain.DatasetIterator:
  """Iterator over this process's slices of the training batches of steps start..num_steps-1.

  Args:
    source: the prepared "train" split (`tfds_builders.load_sources(...)["train"]`).
    metadata: `tfds_builders.split_metadata(source)`; uses "label" (0..C-1) and "modality".
    seed: sampler seed; the batch of step s depends only on (seed, s) (method.md 5.1).
    ids_per_batch, images_per_id: B and K; the global batch has n = B*K pairs.
    start_step: first global step yielded. num_steps: total steps of the run; the last step
      yielded is num_steps - 1 (an empty iterator if start_step >= num_steps).
    process_index, process_count: this process and how many share the batch (n % P == 0).
    num_workers: Grain worker processes (`mp_prefetch`); 0 reads in this process.
    read_threads: threads per reading process that prepare batches ahead.
  Yields:
    {"visible": uint8 [n/P, H, W, 3], "infrared": uint8 [n/P, H, W, 3],
     "labels": int32 [n/P] (shared by the visible and infrared image at each position),
     "step": int64 scalar (global step)}.
  Returns:
    A `grain.DatasetIterator`. The step is the data position: a resumed run restarts it at
    `start_step`, with any number of workers or processes. Call `close()` when done if
    num_workers > 0.
  Raises:
    ValueError: bad metadata (test-split labels), n not divisible by P, fewer than B labels
      with both modalities, negative start_step.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  visible_by_label, infrared_by_label = sampler.make_modality_indices(
      metadata["label"], metadata["modality"])
  positions = process_slice(ids_per_batch * images_per_id, process_index, process_count)
  draw = _DrawBatch(seed, visible_by_label, infrared_by_label, ids_per_batch, images_per_id)
  # Draw one batch now so configuration errors surface here, not inside a worker.
  draw(start_step)
  dataset = (grain.MapDataset.range(start_step, max(num_steps, start_step))
             .map(draw)
             .map(_LoadSlice(ImageReader(source), positions)))
  return _to_iterator(dataset, num_workers, read_threads)


class _EvalBatch:
  """Batch number -> this process's padded slice of that evaluation batch."""

  def __init__(self, reader, padded_indices, batch_size, positions, image_shape):
    self._reader = reader
    self._image_shape = image_shape
    self._padded_indices = padded_indices
    self._batch_size = batch_size
    self._positions = positions

  def __call__(self, batch: int) -> dict[str, np.ndarray]:
    start = int(batch) * self._batch_size
    rows = self._padded_indices[start:start + self._batch_size][self._positions]
    mask = rows >= 0
    order = np.arange(start, start + self._batch_size)[self._positions]
    images = np.zeros((len(rows),) + self._image_shape, dtype=np.uint8)
    # Padding only ever follows the real rows, so the real rows are a prefix.
    self._reader.read(rows[mask], images[:mask.sum()])
    return {"images": images, "mask": mask, "index": np.where(mask, order, -1)}


def make_eval_batches(source: Sequence[dict[str, Any]], indices: Sequence[int],
                      batch_size: int, process_index: int = 0, process_count: int = 1,
                      read_threads: int = 2) -> grain.DatasetIterator:
  """Fixed-size batches of `source[indices]` in order, the last one padded (method.md 5.3 input).

  Every process gets the same number of batches; process p holds positions
  `[p*batch_size/P, (p+1)*batch_size/P)` of each global batch.
  Args:
    source: a prepared split. indices: int [M] dataset indices to read, in the wanted order.
    batch_size: global batch size (divisible by process_count).
  Yields:
    {"images": uint8 [batch_size/P, H, W, 3] (zeros where padded),
     "mask": bool [batch_size/P] (True for real images),
     "index": int64 [batch_size/P], the position in `indices` of each image, -1 where padded}.
    ceil(M / batch_size) batches; none if M == 0.
  Raises:
    ValueError: indices not 1-D or outside the source, batch_size not divisible.
  """
  indices = np.asarray(indices, dtype=np.int64)
  if indices.ndim != 1:
    raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
  if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
    raise ValueError(f"indices must lie in 0..{len(source) - 1}, got range "
                     f"{indices.min()}..{indices.max()}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  positions = process_slice(batch_size, process_index, process_count)
  num_batches = -(-indices.size // batch_size)
  padded = np.full(num_batches * batch_size, -1, dtype=np.int64)
  padded[:indices.size] = indices
  image_shape = tuple(source[0]["image"].shape) if len(source) else (0, 0, 3)
  dataset = grain.MapDataset.range(num_batches).map(
      _EvalBatch(ImageReader(source), padded, batch_size, positions, image_shape))
  return _to_iterator(dataset, num_workers=0, read_threads=read_threads)
