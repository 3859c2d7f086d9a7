"""Benchmark of `rank_metrics` (CMC, mAP, mINP) against a per-query reference loop.

Two measurements in one run:
1. Speed on a SYSU-MM01-sized multi-shot problem (3,803 infrared queries from cameras 3 and 6,
   3,840 gallery images: 96 identities x cameras 1, 2, 4, 5 x 10 images): `rank_metrics`
   versus `reference_loop`, a re-statement of the AGW baseline's `eval_sysu` / `eval_regdb`
   loop (with a stable argsort, the tie rule `rank_metrics` uses). Both results are compared.
2. Memory on a 50,000 x 50,000 float32 distance matrix stored in a NumPy memmap in a temporary
   file (10 GB on disk, so the input need not be in RAM): the peak of NumPy allocations
   (tracemalloc) and of the anonymous resident memory (sampled), beyond the input.

Usage: python benchmarks/eval_metrics.py [--large_size 50000] [--skip_large]
Wall times on a shared machine are noisy; CPU times (process_time) are printed beside them.
"""
import argparse
import os
import sys
import tempfile
import threading
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dakd_jax.evaluation import rank_metrics  # pylint: disable=wrong-import-position


def reference_loop(distmat, query_ids, gallery_ids, query_cams, gallery_cams, protocol,
                   max_rank=20):
  """The baseline's per-query loop (eval_sysu / eval_regdb), ties by gallery index."""
  indices = np.argsort(distmat, axis=1, kind="stable")
  labels = gallery_ids[indices]
  matches = (labels == query_ids[:, None]).astype(np.int32)
  all_cmc, all_ap, all_inp = [], [], []
  for q in range(distmat.shape[0]):
    if protocol == "sysu":
      keep = ~((query_cams[q] == 3) & (gallery_cams[indices[q]] == 2))
    else:
      keep = np.ones(distmat.shape[1], bool)
    raw = matches[q][keep]
    if not raw.any():
      continue
    if protocol == "sysu":
      kept_labels = labels[q][keep]
      distinct = kept_labels[np.sort(np.unique(kept_labels, return_index=True)[1])]
      all_cmc.append((distinct == query_ids[q]).astype(np.int32).cumsum()[:max_rank])
    cum = raw.cumsum()
    last = np.max(np.where(raw == 1))
    all_inp.append(cum[last] / (last + 1.0))
    if protocol == "regdb":
      all_cmc.append(np.minimum(cum, 1)[:max_rank])
    precision = np.asarray([x / (i + 1.0) for i, x in enumerate(cum)]) * raw
    all_ap.append(precision.sum() / raw.sum())
  cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_ap)
  return {"cmc": cmc, "mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)),
          "num_valid_queries": len(all_ap)}


def sysu_sized_problem(seed=0):
  """Unit-feature cosine distances with identity structure, SYSU multi-shot sizes."""
  rng = np.random.default_rng(seed)
  num_identities, num_query = 96, 3803
  gallery_ids = np.repeat(np.arange(num_identities), 40)
  gallery_cams = np.tile(np.repeat([1, 2, 4, 5], 10), num_identities)
  query_ids = np.sort(rng.integers(0, num_identities, num_query))
  query_cams = rng.choice([3, 6], num_query)
  centres = rng.normal(size=(num_identities, 128))
  # Noise chosen for SYSU-like difficulty (Rank-1 around 0.6).
  query = centres[query_ids] + 2.2 * rng.normal(size=(num_query, 128))
  gallery = centres[gallery_ids] + 2.2 * rng.normal(size=(gallery_ids.size, 128))
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  distmat = -(query @ gallery.T).astype(np.float32)
  return distmat, query_ids, gallery_ids, query_cams, gallery_cams


def timed(function, repeats):
  """(best wall seconds, best CPU seconds, result) over `repeats` calls."""
  wall, cpu = [], []
  for _ in range(repeats):
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    result = function()
    wall.append(time.perf_counter() - start_wall)
    cpu.append(time.process_time() - start_cpu)
  return min(wall), min(cpu), result


def compare_speed():
  problem = sysu_sized_problem()
  print(f"SYSU-sized problem: {problem[0].shape[0]} queries x {problem[0].shape[1]} gallery, "
        f"{len(np.unique(problem[2]))} identities, float32")
  # The RegDB rule is checked against a loop in tests/test_metrics.py; one 15 s loop here.
  for protocol in ("sysu",):
    fast_wall, fast_cpu, fast = timed(lambda: rank_metrics(*problem, protocol=protocol), 3)
    slow_wall, slow_cpu, slow = timed(lambda: reference_loop(*problem, protocol), 1)
    cmc_gap = float(np.abs(fast["cmc"] - slow["cmc"]).max())
    same = (fast["num_valid_queries"] == slow["num_valid_queries"] and cmc_gap < 1e-6
            and abs(fast["mAP"] - slow["mAP"]) < 1e-12
            and abs(fast["mINP"] - slow["mINP"]) < 1e-12)
    print(f"  protocol={protocol}: rank_metrics {fast_wall:.3f} s wall / {fast_cpu:.3f} s CPU; "
          f"reference loop {slow_wall:.2f} s wall / {slow_cpu:.2f} s CPU; speed-up "
          f"{slow_wall / fast_wall:.1f}x wall, {slow_cpu / fast_cpu:.1f}x CPU (target >= 20x)")
    print(f"    R1 {fast['cmc'][0]:.4f} mAP {fast['mAP']:.4f} mINP {fast['mINP']:.4f}; "
          f"identical to the loop: {same} (max CMC gap {cmc_gap:.1e}: float32 sum in the "
          f"loop; mAP gap {abs(fast['mAP'] - slow['mAP']):.1e})")
    if not same:
      raise SystemExit("rank_metrics disagrees with the reference loop")


def anonymous_rss_bytes():
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith("RssAnon:"):
        return int(line.split()[1]) * 1024
  return 0


def write_large_problem(path, size, seed=1):
  """A [size, size] float32 file: 500 identities x gallery cameras 1, 2, 4, 5, grouped by
  identity as the protocols build galleries; queries from cameras 3 and 6."""
  rng = np.random.default_rng(seed)
  num_identities = 500
  gallery_ids = np.arange(size) * num_identities // size
  gallery_cams = np.array([1, 2, 4, 5])[np.arange(size) % 4]
  query_ids = rng.integers(0, num_identities, size)
  query_cams = rng.choice([3, 6], size)
  with open(path, "wb") as stream:  # sequential writes: faster than filling a memmap
    for start in range(0, size, 1000):
      rows = rng.random((min(1000, size - start), size), dtype=np.float32)
      rows -= 0.3 * (query_ids[start:start + 1000, None] == gallery_ids[None, :])
      rows.tofile(stream)
  return query_ids, gallery_ids, query_cams, gallery_cams


def measure_large(size):
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "distmat.f32")
    start = time.perf_counter()
    labels = write_large_problem(path, size)
    print(f"Large problem: {size} x {size} float32 memmap ({size * size * 4 / 2**30:.1f} GiB "
          f"on disk), written in {time.perf_counter() - start:.0f} s")
    distmat = np.memmap(path, np.float32, "r", shape=(size, size))
    peak_anonymous, baseline = [0], anonymous_rss_bytes()
    done = threading.Event()

    def sample():
      while not done.is_set():
        peak_anonymous[0] = max(peak_anonymous[0], anonymous_rss_bytes() - baseline)
        time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    tracemalloc.start()
    wall, cpu, result = timed(lambda: rank_metrics(distmat, *labels, protocol="sysu"), 1)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done.set()
    sampler.join()
    del distmat
  print(f"  rank_metrics: {wall:.0f} s wall / {cpu:.0f} s CPU; R1 {result['cmc'][0]:.4f} "
        f"mAP {result['mAP']:.4f} mINP {result['mINP']:.4f} "
        f"({result['num_valid_queries']} valid queries)")
  print(f"  memory beyond the input: NumPy peak (tracemalloc) {traced_peak / 2**20:.0f} MiB; "
        f"anonymous RSS peak (sampled every 20 ms) {peak_anonymous[0] / 2**20:.0f} MiB "
        f"(input {size * size * 4 / 2**20:.0f} MiB, default budget 256 MiB)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--large_size", type=int, default=50_000)
  parser.add_argument("--skip_large", action="store_true")
  args = parser.parse_args()
  compare_speed()
  if not args.skip_large:
    measure_large(args.large_size)


if __name__ == "__main__":
  main()
