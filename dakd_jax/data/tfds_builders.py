"""TFDS builders that store SYSU-MM01 and RegDB as pre-resized ArrayRecord files.

Data flow: reader (`sysu.py`, `regdb.py`: files -> `ImageRecord`s) -> this module (decode once,
Lanczos-resize to the configured size, write ArrayRecord) -> `as_data_source` random access ->
Grain (`pipeline.py`). Training never decodes JPEG/BMP nor resizes.

Choices worth knowing:
- Builders derive from `tfds.core.ShardBasedBuilder` (a sibling of GeneratorBasedBuilder in
  TFDS 4.9.10). GeneratorBasedBuilder's writer shuffles by key hash through `tfds.core.shuffle`,
  which spills to disk through `tf.io.gfile` once a split passes 1 GB (SYSU-MM01 train at 384x128
  is ~5 GB) and so fails without TensorFlow; ShardBasedBuilder writes shards sequentially, keeps
  the reader's order (example i of a split is record i) and runs without TensorFlow.
- `image` is `tfds.features.Tensor(uint8, encoding=BYTES)`: read back with one `np.frombuffer`
  and a reshape, no PNG/JPEG decode (Image features only offer png/jpeg encodings and decode
  with PIL or OpenCV at every read). Cost: raw size on disk (SYSU-MM01 at 384x128 ~6.5 GB).
- Each split also gets a sidecar `<split>_metadata.npz` (label, identity, camera, modality,
  path) written inside TFDS's temporary directory, so it appears atomically with the data and
  `split_metadata` needs no image reads.
- A config per (size, RegDB trial, dataset root): `h288_w144_trial1_root1a2b3c4d`. A new size
  prepares a new directory; the same one is reused. The root hash keeps a synthetic tree and the
  real one apart in one data_dir. A changed dataset under the same root is NOT detected: delete
  `<data_dir>/<dataset>/<config>` to rebuild.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from dakd_jax.data import records as records_lib
from dakd_jax.data.records import DatasetError, ImageRecord

# split name -> the records of that split (both modalities), in a fixed order.
RecordsFn = Callable[[str], list[ImageRecord]]
SPLITS = ("train", "test")
DATASETS = ("sysu_mm01", "regdb")
DATASET_VERSION = "1.0.0"
# Examples per ArrayRecord shard; ShardWriter keeps one shard's examples in memory while writing
# (1024 x 384x128x3 bytes ~ 150 MB).
_SHARD_SIZE = 1024
_METADATA_FIELDS = ("label", "identity", "camera", "modality", "path")


@dataclasses.dataclass(eq=False)
class ReidConfig(tfds.core.BuilderConfig):
  """One prepared variant: image size, RegDB trial (0 for SYSU-MM01), resolved dataset root."""
  height: int = 0
  width: int = 0
  trial: int = 0
  root: str = ""


def root_digest(root: str) -> str:
  """8 hex digits of sha256 of the resolved (realpath) dataset root."""
  return hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:8]


def make_config(dataset: str, root: str, height: int, width: int,
                trial: int | None = None) -> ReidConfig:
  """The BuilderConfig naming one prepared variant.

  Raises ValueError for an unknown dataset, a non-positive size, a RegDB trial outside 1..10 or
  a trial given for SYSU-MM01.
  """
  if dataset not in DATASETS:
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got height={height} width={width}")
  if dataset == "regdb" and (trial is None or not 1 <= trial <= 10):
    raise ValueError(f"regdb needs trial in 1..10, got {trial!r}")
  if dataset == "sysu_mm01" and trial is not None:
    raise ValueError(f"sysu_mm01 has no trials, got trial={trial!r}; pass trial=None")
  trial_part = f"_trial{trial}" if trial is not None else ""
  return ReidConfig(
      name=f"h{height}_w{width}{trial_part}_root{root_digest(root)}", version=DATASET_VERSION,
      description=f"{dataset} at {height}x{width} from {os.path.realpath(root)}",
      height=height, width=width, trial=trial or 0, root=os.path.realpath(root))


def _features(height: int, width: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(height, width, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.BYTES),
      "label": tfds.features.Scalar(dtype=np.int32),
      "identity": tfds.features.Scalar(dtype=np.int32),
      "camera": tfds.features.Scalar(dtype=np.int32),
      "modality": tfds.features.Scalar(dtype=np.int32),
      "path": tfds.features.Text(),
  })


def _split_table(records: list[ImageRecord], root: str,
                 label_map: dict[int, int] | None) -> dict[str, np.ndarray]:
  """Per-example metadata of one split, aligned with the written order."""
  return {
      "label": np.array([label_map[r.identity] if label_map is not None else -1
                         for r in records], dtype=np.int32),
      "identity": np.array([r.identity for r in records], dtype=np.int32),
      "camera": np.array([r.camera for r in records], dtype=np.int32),
      "modality": np.array([records_lib.MODALITY_CODE[r.modality] for r in records],
                           dtype=np.int32),
      "path": np.array([os.path.relpath(r.path, root).replace(os.sep, "/") for r in records],
                       dtype=np.str_),
  }


class _Progress:
  """One progress bar over all images of all splits, opened on first use."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self._total, self._desc, self._enabled, self._bar = total, desc, enabled, None

  def update(self, count: int) -> None:
    if not self._enabled:
      return
    if self._bar is None:
      self._bar = tqdm.tqdm(total=self._total, desc=self._desc, unit=" images")
    self._bar.update(count)
    if self._bar.n >= self._total:
      self._bar.close()


class ReidBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Shared builder: splits "train" and "test", both modalities, images pre-resized.

  Not registered in the TFDS registry (configs are made per root by `make_config`); open a
  prepared directory elsewhere with `tfds.builder_from_directory`.
  """
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Pre-resized uint8 images, raw bytes, reader order."}
  # TFDS 4.9.10 derives code_path through `importlib_resources`, which is not installed on
  # Python >= 3.9 (only needed for checksums, which manual datasets do not have).
  code_path = pathlib.Path(__file__)

  def __init__(self, *, config: ReidConfig, records_fn: RecordsFn | None = None,
               progress: bool = True, **kwargs):
    """config: from `make_config`; records_fn: split -> records (default: the dataset's reader
    over config.root, imported lazily); kwargs go to tfds (data_dir, file_format)."""
    self._records_fn = records_fn
    self._progress = progress
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=_features(config.height, config.width))

  def _read_records(self, split: str) -> list[ImageRecord]:
    # Abstract: SysuMm01 and Regdb read their own on-disk layouts.
    raise NotImplementedError(f"{type(self).__name__} does not know how to read {split!r}")

  def _shard_iterators_per_split(self, dl_manager):
    del dl_manager  # Nothing is downloaded; records come from config.root.
    config = self.builder_config
    split_records = {}
    for split in SPLITS:
      split_records[split] = (self._records_fn or self._read_records)(split)
      if not split_records[split]:
        raise DatasetError(f"{self.name}: split {split!r} has no images under {config.root}")
    label_map = records_lib.make_label_map(split_records["train"])
    progress = _Progress(sum(map(len, split_records.values())),
                         f"Preparing {self.name} {config.name}", self._progress)
    generators = {}
    for split, records in split_records.items():
      table = _split_table(records, config.root, label_map if split == "train" else None)
      # self.data_dir is TFDS's temporary directory here, renamed only on success.
      np.savez(os.path.join(self.data_dir, f"{split}_metadata.npz"), **table)
      generators[split] = [
          _ShardGenerator(records[start:start + _SHARD_SIZE], start, table, config, progress)
          for start in range(0, len(records), _SHARD_SIZE)]
    return generators


class _ShardGenerator:
  """Yields (key, example) for one shard, decoding images in a thread pool (PIL frees the GIL)."""

  def __init__(self, records, start, table, config, progress):
    self._records, self._start, self._table = records, start, table
    self._config, self._progress = config, progress

  def __call__(self) -> Iterator[tuple[int, dict]]:
    height, width = self._config.height, self._config.width
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      images = pool.map(lambda r: records_lib.load_image(r.path, height, width), self._records)
      for offset, image in enumerate(images):
        index = self._start + offset
        example = {name: self._table[name][index] for name in _METADATA_FIELDS}
        example["image"] = image
        self._progress.update(1)
        yield index, example


class SysuMm01(ReidBuilder, skip_registration=True):
  """SYSU-MM01 (method.md 6.1): train = train+val ids (both modalities), test = test ids."""
  name = "sysu_mm01"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Extract SYSU-MM01 so that <root>/cam1..cam6 and <root>/exp/{train,val,test}_id.txt exist.")

  def _read_records(self, split):
    from dakd_jax.data import sysu  # pylint: disable=g-import-not-at-top
    return sysu.read_sysu(self.builder_config.root, split)


class Regdb(ReidBuilder, skip_registration=True):
  """RegDB (method.md 6.2), one trial's train and test split, both modalities."""
  name = "regdb"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Extract RegDB so that <root>/Visible, <root>/Thermal and <root>/idx/*.txt exist.")

  def _read_records(self, split):
    from dakd_jax.data import regdb  # pylint: disable=g-import-not-at-top
    config = self.builder_config
    return regdb.read_regdb_split(config.root, config.trial, split)


def create_builder(dataset: str, root: str, data_dir: str, height: int, width: int,
                   trial: int | None = None, *, records_fn: RecordsFn | None = None,
                   progress: bool = True) -> ReidBuilder:
  """The builder for one variant, without preparing it (see `make_config` for the errors)."""
  config = make_config(dataset, root, height, width, trial)
  builder_cls = SysuMm01 if dataset == "sysu_mm01" else Regdb
  return builder_cls(config=config, records_fn=records_fn, progress=progress,
                     data_dir=data_dir, file_format="array_record")


def prepare(dataset: str, root: str, data_dir: str, height: int, width: int,
            trial: int | None = None, progress: bool = True, *,
            records_fn: RecordsFn | None = None) -> ReidBuilder:
  """Prepares `dataset` (if not yet prepared for this size/trial/root) and returns its builder.

  Args:
    dataset: "sysu_mm01" or "regdb". root: the extracted dataset (TFDS manual_dir).
    data_dir: where prepared datasets live (`<data_dir>/<dataset>/<config>/1.0.0`).
    height, width: stored image size. trial: RegDB trial 1..10, None for SYSU-MM01.
    progress: show a progress bar over the images while preparing.
    records_fn: split -> records; default is the dataset's reader over `root`. Tests and the
      synthetic dataset pass their own.
  Raises:
    DatasetError: root missing when preparing is needed, a split without images, an image that
      cannot be decoded. ValueError: see `make_config`.
  """
  builder = create_builder(dataset, root, data_dir, height, width, trial,
                           records_fn=records_fn, progress=progress)
  if not builder.is_prepared():
    if not os.path.isdir(root):
      raise DatasetError(f"dataset root {root!r} is not a directory; point data.root at the "
                         f"extracted {dataset} folder")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root))
  return builder


def load_sources(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """split name -> random-access source; `source[i]` is a dict of numpy values for example i."""
  return {split: builder.as_data_source(split) for split in builder.info.splits}


def split_metadata(source) -> dict[str, np.ndarray]:
  """Per-example metadata of a prepared split, read from its sidecar, no image decoded.

  Returns a dict of arrays aligned with the source's indices: label int32 [N] (training label
  0..C-1 in "train", -1 in "test"), identity int32 [N], camera int32 [N], modality int32 [N]
  (0 visible, 1 infrared), path str [N] (relative to the dataset root, '/'-separated).
  Raises DatasetError if the sidecar is missing or does not match the source (e.g. a sliced
  split such as "train[:10%]").
  """
  data_dir = os.fspath(source.dataset_info.data_dir)
  path = os.path.join(data_dir, f"{source.split}_metadata.npz")
  if not os.path.isfile(path):
    raise DatasetError(f"metadata sidecar {path} not found; pass a whole split ('train' or "
                       f"'test') of a dataset prepared by dakd_jax, or delete {data_dir} and "
                       "prepare again")
  with np.load(path, allow_pickle=False) as stored:
    metadata = {name: stored[name] for name in _METADATA_FIELDS}
  if len(metadata["label"]) != len(source):
    raise DatasetError(f"{path} has {len(metadata['label'])} rows but the source has "
                       f"{len(source)}; delete {data_dir} and prepare again")
  return metadata
