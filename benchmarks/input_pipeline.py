"""Images per second delivered to the host by the training input pipeline alone.

Prepares a synthetic dataset of random 288x144 images (RegDB size) in a temporary directory with
the real TFDS builder, then iterates `pipeline.make_train_iterator` with 0 and 2 worker processes
and prints images/s (visible + infrared images of this process's batches; nothing else runs).
The first batch (worker start-up) is excluded from the timed part and reported separately.

  python benchmarks/input_pipeline.py [--identities 40] [--steps 150] [--workers 0,2]
      [--read-threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dakd_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from dakd_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from dakd_jax.data.records import ImageRecord  # pylint: disable=g-import-not-at-top,wrong-import-position

HEIGHT, WIDTH = 288, 144


def write_images(root: str, identities: int, per_modality: int) -> list[ImageRecord]:
  """Random JPEGs, `per_modality` visible and infrared images per identity."""
  rng = np.random.default_rng(0)
  records = []
  for identity in range(identities):
    for modality, camera in (("visible", 1), ("infrared", 2)):
      folder = os.path.join(root, modality, str(identity))
      os.makedirs(folder, exist_ok=True)
      for j in range(per_modality):
        path = os.path.join(folder, f"{j}.jpg")
        Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(path, identity, camera, modality))
  return records


def time_iterator(source, metadata, num_workers: int, read_threads: int, steps: int,
                  ids_per_batch: int, images_per_id: int) -> tuple[float, float]:
  """(seconds to the first batch, images/s over the remaining steps)."""
  start = time.perf_counter()
  iterator = pipeline.make_train_iterator(
      source, metadata, seed=0, ids_per_batch=ids_per_batch, images_per_id=images_per_id,
      start_step=0, num_steps=steps + 1, num_workers=num_workers, read_threads=read_threads)
  next(iterator)
  first = time.perf_counter() - start
  start = time.perf_counter()
  images = 0
  for batch in iterator:
    images += batch["visible"].shape[0] + batch["infrared"].shape[0]
  rate = images / (time.perf_counter() - start)
  if num_workers:
    iterator.close()
  return first, rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--identities", type=int, default=40)
  parser.add_argument("--per-modality", type=int, default=5)
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--ids-per-batch", type=int, default=8)
  parser.add_argument("--images-per-id", type=int, default=5)
  parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  parser.add_argument("--read-threads", type=int, default=2, help="threads per reading process")
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # Grain reads absl flags; this script parses its own.

  with tempfile.TemporaryDirectory() as tmp:
    root, data_dir = os.path.join(tmp, "raw"), os.path.join(tmp, "prepared")
    records = write_images(root, args.identities, args.per_modality)
    start = time.perf_counter()
    builder = tfds_builders.prepare(
        "regdb", root, data_dir, HEIGHT, WIDTH, trial=1, progress=False,
        split_records={"train": records, "test": records[:2]})
    print(f"prepared {len(records)} images at {HEIGHT}x{WIDTH} in "
          f"{time.perf_counter() - start:.1f} s")
    source = tfds_builders.load_sources(builder)["train"]
    metadata = tfds_builders.split_metadata(source)
    print(f"cpu cores: {os.cpu_count()}; batch: {args.ids_per_batch} ids x "
          f"{args.images_per_id} images x 2 modalities; {args.steps} timed steps")
    for num_workers in (int(w) for w in args.workers.split(",")):
      first, rate = time_iterator(source, metadata, num_workers, args.read_threads, args.steps,
                                  args.ids_per_batch, args.images_per_id)
      print(f"num_workers={num_workers} read_threads={args.read_threads}: first batch "
            f"{first:.2f} s, {rate:,.0f} images/s")
  # The second half of the story: augmentations on the device vs per image on the host.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import augment_speed  # benchmarks/augment_speed.py
  augment_speed.main(["--batch", str(2 * args.ids_per_batch * args.images_per_id),
                      "--height", str(HEIGHT), "--width", str(WIDTH), "--repeats", "10"])


if __name__ == "__main__":
  main()
