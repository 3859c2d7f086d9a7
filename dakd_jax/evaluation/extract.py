"""Feature extraction: the embedding function, and a list of images embedded over all devices.

`make_embed_fn` is what an embedding is (method.md 5.3, 7.1): inference mode, ImageNet
normalisation, unit BNNeck features. `extract_embeddings` runs it over prepared images; it is used
by evaluation (query and gallery embeddings), by the teacher's memory rebuild and by the
student's teacher centres. Batches come padded to a fixed size from the Grain eval pipeline, so
the embedding function compiles once; the padding rows are dropped on the host.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dakd_jax import augment
from dakd_jax import progress
from dakd_jax import sharding as sharding_lib
from dakd_jax.data import pipeline
from dakd_jax.losses.memory import unit_rows


def make_embed_fn(model, *, use_flip: bool = False,
                  channel_exchange: bool = False) -> Callable:
  """Returns embed(variables, images_uint8 [n,H,W,3], modality [n], key) -> [n, D] float32.

  Inference mode (BN running statistics), ImageNet normalisation, unit embeddings (method.md
  5.3 and 7.1). `use_flip` averages the embeddings of the image and its mirror (then
  re-normalises); `channel_exchange` replicates a random colour channel per image first, as the
  teacher's channel memory is built (method.md 3.2).
  """

  def embed(variables, images, modality, key):
    x = augment.normalize(images)
    if channel_exchange:
      x = augment.channel_exchange_batch(key, x)
    features = model.apply(variables, x, modality, train=False)["embedding"]
    if use_flip:
      flipped = model.apply(variables, x[:, :, ::-1, :], modality, train=False)["embedding"]
      features = unit_rows(features + flipped)
    return features.astype(jnp.float32)

  return embed


@functools.lru_cache(maxsize=None)
def embed_function(model, *, use_flip: bool = False, channel_exchange: bool = False):
  """One embed function per (model, options), so its jit compiles once per run."""
  return make_embed_fn(model, use_flip=use_flip, channel_exchange=channel_exchange)


@functools.lru_cache(maxsize=None)
def jit_embed(embed_fn: Callable, mesh) -> Callable:
  """embed_fn jitted once per (function, mesh): batch on 'data', variables replicated."""
  data = sharding_lib.data_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(embed_fn, in_shardings=(replicated, data, data, replicated),
                 out_shardings=replicated)


def extract_embeddings(embed_fn: Callable, variables, source, indices: Sequence[int],
                       modality_codes: np.ndarray, *, batch_size: int, mesh,
                       key: jax.Array | None = None, description: str = "extract",
                       show_progress: bool = True) -> np.ndarray:
  """Embeds `source[indices]` in order.

  Args:
    embed_fn: embed(variables, images uint8 [b,H,W,3], modality int32 [b], key) -> [b, D].
    variables: model variables, replicated on `mesh`.
    source: a random-access data source of the prepared split (records with 'image').
    indices: which records, in the order the result rows should have.
    modality_codes: int array [len(source)] (0 visible, 1 infrared) for routing.
    batch_size: global batch (divisible by the device count).
    key: PRNG key for random embeddings (channel exchange); folded with the batch number.
  Returns:
    float32 [len(indices), D] embeddings.
  """
  indices = np.asarray(indices, dtype=np.int64)
  if len(indices) == 0:
    raise ValueError(f"{description}: nothing to embed (empty index list)")
  step_fn = jit_embed(embed_fn, mesh)
  key = jax.random.key(0) if key is None else key
  batches = pipeline.make_eval_batches(source, indices, batch_size,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
  rows = []
  # A bar on a terminal; plain lines at a steady pace in a log file (dakd_jax.progress).
  with progress.Progress(len(indices), description, unit="images",
                         enabled=show_progress and jax.process_index() == 0) as shown:
    for number, batch in enumerate(batches):
      # batch["index"] is a position in `indices` (-1 for padding), not a dataset index.
      dataset_index = indices[np.where(batch["mask"], batch["index"], 0)]
      local = {"images": batch["images"],
               "modality": modality_codes[dataset_index].astype(np.int32)}
      global_batch = sharding_lib.host_to_global(local, mesh)
      embeddings = step_fn(variables, global_batch["images"], global_batch["modality"],
                           jax.random.fold_in(key, number))
      # Padding sits at the end of the global batch, so the first `valid` rows are real.
      valid = min(batch_size, len(indices) - number * batch_size)
      rows.append(sharding_lib.to_host(embeddings)[:valid])
      shown.update(valid)
  return np.concatenate(rows).astype(np.float32)
