"""Tests for dakd_jax.data.pipeline on a tiny prepared dataset.

Every stored image is a constant colour equal to its dataset index, so a batch can be decoded
back into the rows it was read from and checked against the sampler and the metadata.
"""
import os

import numpy as np
import pytest
from PIL import Image

from dakd_jax.data import pipeline
from dakd_jax.data import sampler
from dakd_jax.data import tfds_builders
from dakd_jax.data.records import ImageRecord

HEIGHT, WIDTH = 48, 24
B, K = 2, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("raw"))
  split_records = {"train": [], "test": []}
  for split, identities in (("train", range(6)), ("test", range(10, 12))):
    for identity in identities:
      for modality, camera, count in (("visible", 1, 3), ("infrared", 2, 2)):
        for j in range(count):
          index = len(split_records[split])
          path = os.path.join(root, modality, str(identity), f"{j}.png")
          os.makedirs(os.path.dirname(path), exist_ok=True)
          # Stored at the prepared size, PNG: the value survives exactly.
          Image.fromarray(np.full((HEIGHT, WIDTH, 3), index, np.uint8)).save(path)
          split_records[split].append(ImageRecord(path, identity, camera, modality))
  builder = tfds_builders.prepare("regdb", root, str(tmp_path_factory.mktemp("prepared")),
                                  HEIGHT, WIDTH, trial=1, progress=False,
                                  split_records=split_records)
  sources = tfds_builders.load_sources(builder)
  return dict(sources=sources, metadata=tfds_builders.split_metadata(sources["train"]))


def rows_of(images):
  """Dataset index encoded in each image (and check the image is constant)."""
  assert images.dtype == np.uint8 and images.shape[1:] == (HEIGHT, WIDTH, 3)
  assert (images == images[:, :1, :1, :1]).all()
  return images[:, 0, 0, 0].astype(np.int64)


def train_iterator(dataset, **kwargs):
  options = dict(seed=3, ids_per_batch=B, images_per_id=K, start_step=0, num_steps=12)
  options.update(kwargs)
  return pipeline.make_train_iterator(dataset["sources"]["train"], dataset["metadata"],
                                      **options)


def as_arrays(batch):
  """Plain numpy copies (worker outputs live in shared memory)."""
  return {name: np.array(value) for name, value in batch.items()}


def test_batches_follow_sampler_and_metadata(dataset):
  metadata = dataset["metadata"]
  visible_by_label, infrared_by_label = sampler.make_modality_indices(
      metadata["label"], metadata["modality"])
  batches = list(train_iterator(dataset, start_step=2, num_steps=7))
  assert [int(b["step"]) for b in batches] == [2, 3, 4, 5, 6]
  for batch in batches:
    visible, infrared, labels = sampler.batch_indices(
        int(batch["step"]), seed=3, visible_by_label=visible_by_label,
        infrared_by_label=infrared_by_label, ids_per_batch=B, images_per_id=K)
    np.testing.assert_array_equal(rows_of(batch["visible"]), visible)
    np.testing.assert_array_equal(rows_of(batch["infrared"]), infrared)
    assert batch["labels"].dtype == np.int32 and batch["step"].dtype == np.int64
    np.testing.assert_array_equal(batch["labels"], labels)
    np.testing.assert_array_equal(metadata["label"][rows_of(batch["infrared"])], labels)
    assert (metadata["modality"][rows_of(batch["visible"])] == 0).all()
    assert (metadata["modality"][rows_of(batch["infrared"])] == 1).all()


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_the_step_is_the_data_position(dataset, num_workers):
  """A run resumed at step 4 (what a checkpoint restores) sees the batches an uninterrupted
  run sees there, whatever the worker count of either run."""
  uninterrupted = train_iterator(dataset, num_workers=num_workers, num_steps=9)
  expected = [as_arrays(batch) for batch in uninterrupted][4:]
  if num_workers:
    uninterrupted.close()
  restarted = list(train_iterator(dataset, start_step=4, num_steps=9, num_workers=0))
  assert [int(b["step"]) for b in restarted] == [4, 5, 6, 7, 8]
  for a, b in zip(expected, restarted):
    for name in ("visible", "infrared", "labels"):
      np.testing.assert_array_equal(a[name], np.asarray(b[name]))


def test_two_processes_split_the_global_batch(dataset):
  whole = list(train_iterator(dataset, num_steps=4))
  parts = [list(train_iterator(dataset, num_steps=4, process_index=p, process_count=2))
           for p in range(2)]
  for step, batch in enumerate(whole):
    slices = [part[step] for part in parts]
    assert all(s["visible"].shape[0] == B * K // 2 for s in slices)
    for name in ("visible", "infrared", "labels"):
      np.testing.assert_array_equal(np.concatenate([s[name] for s in slices]), batch[name])
  with pytest.raises(ValueError, match="does not divide"):
    train_iterator(dataset, process_index=0, process_count=4)


def test_image_reader_fast_path_equals_tfds_decoding(dataset):
  source = dataset["sources"]["test"]
  indices = np.array([3, 0, 3, 9, 5])
  expected = np.stack([source[int(i)]["image"] for i in indices])
  np.testing.assert_array_equal(pipeline.ImageReader(source).read(indices), expected)
  as_list = [{"image": source[i]["image"]} for i in range(len(source))]
  np.testing.assert_array_equal(pipeline.ImageReader(as_list).read(indices), expected)


def test_rejects_test_split_metadata(dataset):
  test_metadata = tfds_builders.split_metadata(dataset["sources"]["test"])
  with pytest.raises(ValueError, match="labels >= 0"):
    pipeline.make_train_iterator(dataset["sources"]["test"], test_metadata, seed=0,
                                 ids_per_batch=B, images_per_id=K, start_step=0, num_steps=2)


def test_eval_batches_pad_and_mask_in_order(dataset):
  source = dataset["sources"]["test"]
  indices = np.array([7, 0, 9, 2, 5, 4, 1])
  batches = list(pipeline.make_eval_batches(source, indices, batch_size=3))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]),
                                [True] * 7 + [False] * 2)
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                [0, 1, 2, 3, 4, 5, 6, -1, -1])
  images = np.concatenate([b["images"] for b in batches])
  np.testing.assert_array_equal(rows_of(images[:7]), indices)
  assert (images[7:] == 0).all()


def test_eval_batches_split_across_processes(dataset):
  source = dataset["sources"]["test"]
  indices = np.arange(len(source))[::-1]  # 10 images, batch 4: 3 batches, last has 2
  whole = list(pipeline.make_eval_batches(source, indices, batch_size=4))
  parts = [list(pipeline.make_eval_batches(source, indices, 4, process_index=p,
                                           process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole) == 3
  for number, batch in enumerate(whole):
    for name in ("images", "mask", "index"):
      np.testing.assert_array_equal(
          np.concatenate([part[number][name] for part in parts]), batch[name])
  assert not parts[1][2]["mask"].any()  # process 1 holds only padding in the last batch
  assert list(pipeline.make_eval_batches(source, [], batch_size=4)) == []
