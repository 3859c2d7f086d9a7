"""Each dataset described once: one frozen `DatasetSpec` per dataset, looked up by name.

Everything that differs between datasets - cameras per modality, the default image size, the
reader, whether the splits depend on a trial, the protocol factory and the metric's camera rule,
the augmentation recipe, the synthetic generator - is a field here. The TFDS builders, the data
preparation, the evaluation, the augmentations and the config validation ask the spec; none of
them branch on a dataset name. Adding a dataset is one spec, one reader module and its tests.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from dakd_jax.data import llcm
from dakd_jax.data import regdb
from dakd_jax.data import sysu
from dakd_jax.data.records import INFRARED, VISIBLE, CameraRule, ImageRecord, Protocol
from dakd_jax.data.records import EvalOption, ProtocolOptions
from dakd_jax.data.records import held_out_identities
from dakd_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class AugmentRecipe:
  """The released augmentation differences between datasets (method.md 5.2).

  grey_pad_flip_first: flip, then pad with grey 127 and crop (RegDB) instead of zero pad, crop,
    flip; the channel-augmented view always uses the zero-pad order.
  cutswap_on_visible: CutSwap on the visible view (config `augment.use_cutswap` can turn it off).
  adaptive_gray_on_infrared: adaptive gray on the infrared view.
  """
  grey_pad_flip_first: bool = False
  cutswap_on_visible: bool = True
  adaptive_gray_on_infrared: bool = True


@dataclasses.dataclass(frozen=True)
class SyntheticSizes:
  """Sizes of a generated tree (config `synthetic.*`); each dataset maps them to its writer."""
  num_train_ids: int
  num_val_ids: int
  num_test_ids: int
  images_per_camera: int
  height: int
  width: int
  seed: int


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the code needs to know about one dataset.

  name: the config value (`data.dataset`) and the TFDS builder name.
  title: the name people write.
  visible_cameras, infrared_cameras: camera numbers per modality.
  image_size: default (height, width) of the method's recipe.
  trials: the training trials when the splits depend on one (RegDB 1..10), else ().
  directions: the query directions of its protocol (() when it has none).
  eval_options: its own evaluation settings (config `eval.<name>`), validated at start-up by
    `eval_option_problem` and handed to make_protocols in ProtocolOptions.values.
  camera_rule: which gallery images a query ignores and how CMC counts (declared by the
    dataset's module, read by `rank_metrics`).
  augment: the augmentation recipe.
  synthetic_kind: `synthetic.ensure_synthetic` kind of the generated stand-in tree.
  synthetic_params: SyntheticSizes -> keyword arguments of that writer.
  read_split: (root, split "train"/"test", trial or None) -> records of both modalities.
  make_protocols: (ProtocolOptions, during_training=bool) -> protocols, headline first.
  check_protocol: raises ValueError for a protocol this dataset cannot evaluate.
  query_gallery: (protocol, root) -> (query records, gallery records).
  split_files: (root, trial) -> the files that define the splits (for the fingerprint).
  layout: one line saying what the extracted folder holds (errors, TFDS instructions).
  validation_ids: the identities held out when checkpoints are selected on a validation split.
  listed_identities: (root, split, trial) -> the identities the split files name, where an
    identity can be listed yet have no image (SYSU-MM01: empty folders); None where the reader
    refuses that case itself (RegDB and LLCM list images, not identities, for training, and
    LLCM refuses empty test folders).
  """
  name: str
  title: str
  visible_cameras: tuple[int, ...]
  infrared_cameras: tuple[int, ...]
  image_size: tuple[int, int]
  trials: tuple[int, ...]
  directions: tuple[str, ...]
  camera_rule: CameraRule
  eval_options: tuple[EvalOption, ...]
  augment: AugmentRecipe
  synthetic_kind: str
  synthetic_params: Callable[[SyntheticSizes], dict]
  read_split: Callable[[str, str, int | None], list[ImageRecord]]
  make_protocols: Callable[..., list[Protocol]]
  check_protocol: Callable[[Protocol], None]
  query_gallery: Callable[[Protocol, str], tuple[list[ImageRecord], list[ImageRecord]]]
  split_files: Callable[[str, int | None], list[str]]
  layout: str
  # (root, trial, train records, fraction, seed) -> identities held out for checkpoint
  # selection; default: a seeded share of the training identities.
  validation_ids: Callable[..., list[int]] = None
  listed_identities: Callable[[str, str, int | None], list[int]] | None = None

  def eval_option_problem(self, values) -> str | None:
    """The first of `values` (config.eval, or any mapping by option name) that this dataset's
    options refuse, as a message naming the field and the fix; None when all are accepted."""
    for option in self.eval_options:
      problem = option.problem(values[option.name])
      if problem:
        return problem
    return None

  def protocol_options(self, values, *, num_trials: int, trial: int) -> ProtocolOptions:
    """ProtocolOptions holding this dataset's option values taken from `values` (config.eval)."""
    return ProtocolOptions(num_trials=num_trials, trial=trial, values={
        option.name: (tuple(values[option.name]) if isinstance(option.default, tuple)
                      else values[option.name]) for option in self.eval_options})

  def split_trial(self, trial: int) -> int | None:
    """The trial the splits are read with: `trial` where they depend on it, else None."""
    return trial if self.trials else None

  def held_out(self, root: str, trial: int | None, train_records, fraction: float,
               seed: int) -> tuple[list[int], str]:
    """(validation identities, how they were chosen) for checkpoint selection."""
    if self.validation_ids is not None:
      return (self.validation_ids(root, trial, train_records, fraction, seed),
              f"the validation identities {self.title} ships")
    identities = held_out_identities([r.identity for r in train_records], fraction, seed)
    return identities, f"a seeded {fraction:.0%} of the training identities (seed {seed})"


def _sysu_synthetic(sizes: SyntheticSizes) -> dict:
  return dict(num_train_ids=sizes.num_train_ids, num_val_ids=sizes.num_val_ids,
              num_test_ids=sizes.num_test_ids, images_per_camera=sizes.images_per_camera,
              height=sizes.height, width=sizes.width, seed=sizes.seed)


def _regdb_synthetic(sizes: SyntheticSizes) -> dict:
  # RegDB trials split the identities in two halves: twice the training ids in total.
  return dict(num_ids=2 * sizes.num_train_ids, images_per_modality=sizes.images_per_camera,
              height=sizes.height, width=sizes.width, seed=sizes.seed)


SYSU_MM01 = DatasetSpec(
    name=sysu.DATASET_NAME, title="SYSU-MM01", visible_cameras=sysu.VISIBLE_CAMERAS,
    infrared_cameras=sysu.INFRARED_CAMERAS, image_size=(384, 128), trials=(), directions=(),
    camera_rule=sysu.CAMERA_RULE, eval_options=sysu.EVAL_OPTIONS, augment=AugmentRecipe(), synthetic_kind="sysu",
    synthetic_params=_sysu_synthetic, read_split=sysu.read_split,
    make_protocols=sysu.make_protocols, check_protocol=sysu.check_protocol,
    query_gallery=sysu.query_gallery, split_files=sysu.split_files,
    validation_ids=sysu.validation_ids,
    layout="cam1..cam6/<id 4 digits>/<image> and exp/{train,val,test}_id.txt",
    listed_identities=lambda root, split, trial: sysu.read_split_ids(root, split))

REGDB = DatasetSpec(
    name=regdb.DATASET_NAME, title="RegDB", visible_cameras=(1,), infrared_cameras=(2,),
    image_size=(288, 144), trials=regdb.TRIALS, directions=regdb.DIRECTIONS,
    camera_rule=regdb.CAMERA_RULE, eval_options=regdb.EVAL_OPTIONS,
    augment=AugmentRecipe(grey_pad_flip_first=True, cutswap_on_visible=False,
                          adaptive_gray_on_infrared=False),
    synthetic_kind="regdb", synthetic_params=_regdb_synthetic, read_split=regdb.read_split,
    make_protocols=regdb.make_protocols, check_protocol=regdb.check_protocol,
    query_gallery=regdb.query_gallery, split_files=regdb.split_files,
    layout="Visible/<id>/, Thermal/<id>/ and idx/{train,test}_{visible,thermal}_{1..10}.txt")


def _llcm_synthetic(sizes: SyntheticSizes) -> dict:
  # LLCM has no validation split: the validation ids train with the training ids.
  return dict(num_train_ids=sizes.num_train_ids + sizes.num_val_ids,
              num_test_ids=sizes.num_test_ids, images_per_camera=sizes.images_per_camera,
              height=sizes.height, width=sizes.width, seed=sizes.seed)


LLCM = DatasetSpec(
    name=llcm.DATASET_NAME, title="LLCM", visible_cameras=llcm.MODALITY_CAMERAS[VISIBLE],
    infrared_cameras=llcm.MODALITY_CAMERAS[INFRARED], image_size=(384, 128), trials=(),
    directions=llcm.DIRECTIONS, camera_rule=llcm.CAMERA_RULE, augment=AugmentRecipe(),
    eval_options=llcm.EVAL_OPTIONS,
    synthetic_kind="llcm", synthetic_params=_llcm_synthetic, read_split=llcm.read_split,
    make_protocols=llcm.make_protocols, check_protocol=llcm.check_protocol,
    query_gallery=llcm.query_gallery, split_files=llcm.split_files,
    layout="idx/{train_vis,train_nir,test_id}.txt, test_vis/cam1..9/<id>/, "
           "test_nir/cam{1,2,4..9}/<id>/")

SPECS = {spec.name: spec for spec in (SYSU_MM01, REGDB, LLCM)}
DATASET_NAMES = tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
  """The spec of dataset `name`; ConfigError naming the accepted names otherwise."""
  if name not in SPECS:
    raise ConfigError(f"unknown dataset {name!r}: choose one of {DATASET_NAMES} "
                      "(--config.data.dataset=...)")
  return SPECS[name]


def camera_rule(name: str) -> CameraRule:
  """The camera rule named `name`: a rule's own name ("sysu") or its dataset's ("sysu_mm01").
  Raises ValueError naming the accepted names."""
  for spec in SPECS.values():
    if name in (spec.name, spec.camera_rule.name):
      return spec.camera_rule
  accepted = sorted({n for spec in SPECS.values() for n in (spec.name, spec.camera_rule.name)})
  raise ValueError(f"unknown camera rule {name!r}; expected one of {accepted}.")


def make_protocols(name: str, options: ProtocolOptions, *,
                   during_training: bool = False) -> list[Protocol]:
  """The protocols of dataset `name` for `options` (see `DatasetSpec.make_protocols`)."""
  return get_spec(name).make_protocols(options, during_training=during_training)
