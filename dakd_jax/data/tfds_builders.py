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
- A config per (size, RegDB trial, content): `h288_w144_trial1_<12 hex digits>`, the digits a
  hash of every record's split, path, identity, camera, modality, file size and modification
  time. A new size prepares a new directory; a repaired or replaced source file, or another
  root with other files, prepares again; the same files are reused.
- A dataset whose trials split one set of images (RegDB: each trial's train and test halves
  are the same 412 identities) is prepared once for all trials (`prepare_shared`: one "images"
  split, config `h288_w144_images_<digest>`); each trial's splits are `SplitView`s, row lists
  into it with the trial's own labels, built in memory from the reader's records. Ten trials
  take one trial's disk and one preparation.
- One builder class per dataset, named by its spec; the records come from the spec's reader.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import os
import pathlib
import shutil
import sys
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from dakd_jax import progress
from dakd_jax.data import dataset_files
from dakd_jax.data import prepared_files
from dakd_jax.data import records as records_lib
from dakd_jax.data import specs
from dakd_jax.data.records import DatasetError, ImageRecord

# split name -> the records of that split (both modalities), in the reader's order.
SplitRecords = Mapping[str, list[ImageRecord]]
SPLITS = ("train", "test")  # always there; a held-out "val" split is added when asked for
IMAGES_SPLIT = "images"  # the one split of a shared copy (`prepare_shared`)
DATASET_VERSION = "1.0.0"
# Examples per ArrayRecord shard; ShardWriter keeps one shard's examples in memory while writing
# (1024 x 384x128x3 bytes ~ 150 MB).
_SHARD_SIZE = 1024
_METADATA_FIELDS = ("label", "identity", "camera", "modality", "path")


@dataclasses.dataclass(eq=False)
class ReidConfig(tfds.core.BuilderConfig):
  """One prepared variant: image size, RegDB trial (0 without trials), root, content digest;
  shared: one "images" split for all trials, without labels (`prepare_shared`)."""
  height: int = 0
  width: int = 0
  trial: int = 0
  root: str = ""
  digest: str = ""
  shared: bool = False


def fingerprint(split_records: SplitRecords, root: str, split_files) -> str:
  """16 hex digits identifying a dataset: its records (`content_digest`) and the bytes of the
  files that define its splits. Stored with checkpoints and results, so evaluation can say
  when the data changed since a model was trained."""
  digest = hashlib.sha256(content_digest(split_records, root).encode())
  for path in split_files:
    digest.update(os.path.relpath(path, root).encode())
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()[:16]


def content_digest(split_records: SplitRecords, root: str) -> str:
  """12 hex digits of sha256 over each record's split, relative path, identity, camera,
  modality, file size and modification time (ns): a changed source file changes it.

  Raises DatasetError naming a listed image that has disappeared.
  """
  digest = hashlib.sha256()
  for split in sorted(split_records):
    for record in split_records[split]:
      try:
        stat = os.stat(record.path)
      except OSError as error:
        raise DatasetError(f"image file not found: {record.path} ({error.strerror})") from error
      relative = os.path.relpath(record.path, root).replace(os.sep, "/")
      digest.update(f"{split}|{relative}|{record.identity}|{record.camera}|{record.modality}|"
                    f"{stat.st_size}|{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()[:12]


def make_config(dataset: str, root: str, height: int, width: int, trial: int | None,
                digest: str, *, shared: bool = False) -> ReidConfig:
  """The BuilderConfig naming one prepared variant (shared: the trial-independent copy of
  `prepare_shared`, trial None).

  Raises ConfigError for an unknown dataset; ValueError for a non-positive size, a trial given
  to a dataset without trials or to a shared copy, or a missing or unknown trial of a dataset
  with trials.
  """
  spec = specs.get_spec(dataset)
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got height={height} width={width}")
  if shared:
    if trial is not None:
      raise ValueError(f"a shared copy serves every trial, got trial={trial!r}; pass None")
    return ReidConfig(
        name=f"h{height}_w{width}_{IMAGES_SPLIT}_{digest}", version=DATASET_VERSION,
        description=f"{dataset} images at {height}x{width} from {os.path.realpath(root)}, "
        "shared by its trials", height=height, width=width, root=os.path.realpath(root),
        digest=digest, shared=True)
  if spec.trials and trial not in spec.trials:
    raise ValueError(f"{dataset} needs a trial in {spec.trials}, got {trial!r}")
  if not spec.trials and trial is not None:
    raise ValueError(f"{dataset} has no trials, got trial={trial!r}; pass trial=None")
  trial_part = f"_trial{trial}" if trial is not None else ""
  return ReidConfig(
      name=f"h{height}_w{width}{trial_part}_{digest}", version=DATASET_VERSION,
      description=f"{dataset} at {height}x{width} from {os.path.realpath(root)}",
      height=height, width=width, trial=trial or 0, root=os.path.realpath(root), digest=digest)


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
  """One progress display over all images of all splits, opened on first use: a bar on a
  terminal, plain lines at a steady pace in a log file (dakd_jax.progress)."""

  def __init__(self, total: int, desc: str, enabled: bool):
    self._total, self._desc, self._enabled, self._shown = total, desc, enabled, None

  def update(self, count: int) -> None:
    if not self._enabled:
      return
    if self._shown is None:
      self._shown = progress.Progress(self._total, self._desc, unit="images")
    self._shown.update(count)
    if self._shown.done >= self._total:
      self._shown.close()


class ReidBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Shared builder: splits "train" and "test", both modalities, images pre-resized.

  One subclass per dataset (`builder_class`) gives the TFDS name. Not registered in the TFDS
  registry (configs are made per content by `make_config`); open a prepared directory elsewhere
  with `tfds.builder_from_directory`.
  """
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Pre-resized uint8 images, raw bytes, reader order."}
  # TFDS 4.9.10 derives code_path through `importlib_resources`, which is not installed on
  # Python >= 3.9 (only needed for checksums, which manual datasets do not have).
  code_path = pathlib.Path(__file__)

  def __init__(self, *, config: ReidConfig, split_records: SplitRecords | None = None,
               progress: bool = True, **kwargs):
    """config: from `make_config`; split_records: what to write (needed only to prepare);
    kwargs go to tfds (data_dir, file_format)."""
    self._split_records = split_records
    self._progress = progress
    super().__init__(config=config, **kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and "... downloaded and
  # prepared" around a preparation; nothing is downloaded here and `prepare` says it in one line.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, disable_shuffling=True,
        features=_features(config.height, config.width))

  def _shard_iterators_per_split(self, dl_manager):
    del dl_manager  # Nothing is downloaded; the records were read by the dataset's reader.
    config = self.builder_config
    split_records = self._split_records or {}
    required = {IMAGES_SPLIT} if config.shared else set(SPLITS)
    for split in sorted(required | set(split_records)):
      if not split_records.get(split):
        raise DatasetError(f"{self.name}: split {split!r} has no images under {config.root}")
    # A shared copy has no labels: each trial's views label their own training identities.
    label_map = None if config.shared else records_lib.make_label_map(split_records["train"])
    progress = _Progress(sum(len(records) for records in split_records.values()),
                         f"preparing {self.name}", self._progress)
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


@functools.lru_cache(maxsize=None)
def builder_class(dataset: str) -> type[ReidBuilder]:
  """The builder class of a dataset: `ReidBuilder` named after its spec (one class per name)."""
  spec = specs.get_spec(dataset)
  return type(f"{spec.title.replace('-', '')}Builder", (ReidBuilder,),
              {"name": spec.name, "__module__": __name__,
               "MANUAL_DOWNLOAD_INSTRUCTIONS": f"Extract {spec.title} so that <root> holds "
               f"{spec.layout}."}, skip_registration=True)


def read_split_records(dataset: str, root: str, trial: int | None) -> dict[str, list]:
  """{"train": records, "test": records} from the dataset's reader (a folder scan, no decode).
  Raises one DatasetError holding the problems of both splits."""
  spec = specs.get_spec(dataset)
  if not os.path.isdir(root):
    raise DatasetError(f"dataset root {root!r} is not a directory; point data.root at the "
                       f"extracted {spec.title} folder ({spec.layout})")
  split_records, problems = {}, []
  for split in SPLITS:  # Both splits read before stopping: their problems in one message.
    try:
      split_records[split] = spec.read_split(root, split, trial)
    except DatasetError as error:
      if str(error) not in problems:
        problems.append(str(error))
  if problems:
    raise DatasetError(" Also: ".join(problems))
  return split_records


def remove_interrupted_preparations(builder: ReidBuilder) -> list[str]:
  """Deletes the temporary folders a killed preparation of this variant left behind.

  TFDS writes into `<config>/incomplete.<random>_<version>/` beside the final
  `<config>/<version>/` and renames on success; a run stopped half-way leaves it. Returns the
  removed paths.
  """
  parent = os.path.dirname(os.fspath(builder.data_dir))
  stale = glob.glob(os.path.join(parent, "incomplete.*"))
  for path in stale:
    shutil.rmtree(path, ignore_errors=True)
  return stale


def prepare(dataset: str, root: str, data_dir: str, height: int, width: int,
            trial: int | None = None, progress: bool = True, *,
            split_records: SplitRecords | None = None, shared: bool = False) -> ReidBuilder:
  """Prepares `dataset` (unless this size/trial/content is prepared) and returns its builder.

  Args:
    dataset: a dataset name (`specs.DATASET_NAMES`). root: the extracted dataset (TFDS
      manual_dir).
    data_dir: where prepared datasets live (`<data_dir>/<dataset>/<config>/1.0.0`).
    height, width: stored image size. trial: the training trial of a dataset with trials
      (RegDB 1..10), None otherwise.
    progress: print the one-line notice and a progress bar over the images while preparing.
    split_records: the records of "train" and "test"; default: the dataset's reader over
      `root`. Tests pass their own.
    shared: split_records is {"images": records} and the copy serves every trial
      (`prepare_shared`, trial None).
  Raises:
    DatasetError: root missing, a split without images, an image that cannot be decoded.
    ValueError: see `make_config`.
  A prepared copy whose files differ from what its preparation recorded (truncated, missing)
  is prepared again, with one warning line (`discard_damaged_copy`).
  """
  if split_records is None:
    split_records = read_split_records(dataset, root, trial)
  config = make_config(dataset, root, height, width, trial,
                       content_digest(split_records, root), shared=shared)
  def make_builder():
    return builder_class(dataset)(config=config, split_records=split_records,
                                  progress=progress, data_dir=data_dir,
                                  file_format="array_record")
  builder = make_builder()
  if builder.is_prepared() and discard_damaged_copy(os.fspath(builder.data_dir)):
    builder = make_builder()  # A fresh builder: the first one remembers the copy as prepared.
  if not builder.is_prepared():
    # Every file that cannot be opened in one message, before any image is decoded.
    dataset_files.unreadable_images(
        [record.path for records in split_records.values() for record in records],
        specs.get_spec(dataset).title)
    remove_interrupted_preparations(builder)
    # Files without dataset_info.json: an incomplete copy that TFDS would not write over.
    shutil.rmtree(os.fspath(builder.data_dir), ignore_errors=True)
    if progress:
      print(f"dakd_jax: preparing {dataset} ({sum(len(r) for r in split_records.values())} "
            f"images at {height}x{width}) into {builder.data_dir}", file=sys.stderr, flush=True)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=root))
    prepared_files.record_files(os.fspath(builder.data_dir))
  return builder


def shared_images(split_records: SplitRecords) -> list[ImageRecord]:
  """Every image of the splits once, ordered by path, identity -1: for a dataset whose trials
  split one set of images, the same list (and so the same shared copy) for every trial. (A
  RegDB identity is the label in the trial's index file, which differs between trials; the
  trial's views carry it.)"""
  by_path = {record.path: record for records in split_records.values() for record in records}
  return [dataclasses.replace(by_path[path], identity=-1) for path in sorted(by_path)]


def prepare_shared(dataset: str, root: str, data_dir: str, height: int, width: int,
                   split_records: SplitRecords, progress: bool = True) -> ReidBuilder:
  """Prepares (unless already there) one copy of every image of a trial's splits, the copy
  every trial of the same files reuses; `split_views` then gives the trial's splits."""
  return prepare(dataset, root, data_dir, height, width, None, progress,
                 split_records={IMAGES_SPLIT: shared_images(split_records)}, shared=True)


class SplitView:
  """One split as rows of a shared copy: `view[i]` is `images[rows[i]]` with the split's own
  metadata (training labels 0..C-1 of this trial in "train", -1 elsewhere).

  images: the shared copy's "images" source. rows: int64 [N]. metadata: the split's table
  (`split_metadata`'s fields, aligned with rows). Picklable like the source (loader workers).
  """

  def __init__(self, images, rows: np.ndarray, metadata: Mapping[str, np.ndarray]):
    self.images, self.rows, self.metadata = images, rows, metadata

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = dict(self.images[int(self.rows[index])])
    example.update({name: self.metadata[name][index] for name in _METADATA_FIELDS})
    return example


def split_views(builder: ReidBuilder, split_records: SplitRecords) -> dict[str, SplitView]:
  """split name -> `SplitView` of a shared copy (`prepare_shared` of these records).

  Raises DatasetError when a record is missing from the copy (it was prepared from other
  files).
  """
  images = builder.as_data_source(IMAGES_SPLIT)
  root = builder.builder_config.root
  row_of = {path: row for row, path in enumerate(split_metadata(images)["path"].tolist())}
  label_map = records_lib.make_label_map(split_records["train"])
  views = {}
  for split, records in split_records.items():
    table = _split_table(records, root, label_map if split == "train" else None)
    missing = [path for path in table["path"].tolist() if path not in row_of]
    if missing:
      raise DatasetError(f"{missing[0]} is not in the prepared copy {builder.data_dir} "
                         f"({len(missing)} images missing); delete that folder and run again "
                         "to prepare it anew")
    rows = np.array([row_of[path] for path in table["path"].tolist()], dtype=np.int64)
    views[split] = SplitView(images, rows, table)
  return views


def discard_damaged_copy(directory: str) -> bool:
  """Checks a prepared copy against what its preparation recorded (`prepared_files`); deletes
  a damaged one, saying so in one line, and returns True (it is then prepared again). A copy
  prepared before files were recorded gets its record now (where it can be written)."""
  if not prepared_files.has_record(directory):
    try:
      prepared_files.record_files(directory)
    except OSError:  # A read-only shared copy: used as it is.
      pass
    return False
  damage = prepared_files.find_damage(directory)
  if not damage:
    return False
  print(f"dakd_jax: warning: {prepared_files.describe_damage(directory, damage)}; preparing it "
        "again", file=sys.stderr, flush=True)
  shutil.rmtree(directory)
  return True


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
  if isinstance(source, SplitView):
    return dict(source.metadata)
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
