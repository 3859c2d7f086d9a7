"""Tests for dakd_jax.writers: JSON lines, TensorBoard event files, process-0-only writing and
the progress line."""
import glob
import io
import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dakd_jax import writers


def _crc32c(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: str) -> list:
  """Reads a TFRecord file: [uint64 length][masked crc of length][data][masked crc of data]."""
  events = []
  with open(path, "rb") as handle:
    content = handle.read()
  offset = 0
  while offset < len(content):
    header = content[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", content[offset + 8:offset + 12])
    assert length_crc == _masked_crc(header)
    data = content[offset + 12:offset + 12 + length]
    (data_crc,) = struct.unpack("<I", content[offset + 12 + length:offset + 16 + length])
    assert data_crc == _masked_crc(data)
    events.append(event_pb2.Event.FromString(data))
    offset += 16 + length
  return events


def _write_sample(workdir) -> None:
  device_loss = jnp.asarray(0.75)
  with writers.MetricWriter(workdir, stage="teacher", enabled=True) as writer, \
      jax.transfer_guard("disallow"):  # device values are fetched explicitly
    writer.write_scalars(10, {"loss": 1.5, "lr": np.float32(0.25), "images": 64})
    writer.write_scalars(20, {"loss": device_loss, "nan_term": float("nan")})
    writer.write_scalars(30, {"mAP": 0.5}, stage="eval")
    writer.write_text(30, "report", "mAP 50.0")


def test_jsonl_records(tmp_path):
  _write_sample(tmp_path)
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
    records = [json.loads(line) for line in handle]
  assert all(isinstance(r.pop("wall_time"), float) for r in records)
  assert records == [
      {"step": 10, "stage": "teacher", "loss": 1.5, "lr": 0.25, "images": 64},
      {"step": 20, "stage": "teacher", "loss": 0.75, "nan_term": "NaN"},
      {"step": 30, "stage": "eval", "mAP": 0.5},
      {"step": 30, "stage": "teacher", "text": {"report": "mAP 50.0"}},
  ]
  # Appends on reopen (a resumed run continues the same file).
  with writers.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(40, {"loss": 0.5})
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
    assert len(handle.readlines()) == 5


def test_tensorboard_events(tmp_path):
  _write_sample(tmp_path)
  files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert len(files) == 1
  scalars, texts = {}, {}
  for event in _read_events(files[0]):
    for value in event.summary.value:
      if value.HasField("tensor"):
        texts[(value.tag, event.step)] = value.tensor.string_val[0].decode()
      else:
        scalars[(value.tag, event.step)] = value.simple_value
  assert set(scalars) == {("teacher/loss", 10), ("teacher/lr", 10), ("teacher/images", 10),
                          ("teacher/loss", 20), ("teacher/nan_term", 20), ("eval/mAP", 30)}
  assert scalars[("teacher/loss", 10)] == 1.5 and scalars[("teacher/lr", 10)] == 0.25
  assert scalars[("teacher/images", 10)] == 64 and scalars[("teacher/loss", 20)] == 0.75
  assert math.isnan(scalars[("teacher/nan_term", 20)]) and scalars[("eval/mAP", 30)] == 0.5
  assert list(texts.values()) == ["mAP 50.0"]
  assert list(texts)[0][1] == 30 and list(texts)[0][0].startswith("teacher/report")


def test_bad_scalars(tmp_path):
  with writers.MetricWriter(tmp_path, enabled=True) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write_scalars(1, {"step": 3})
    with pytest.raises(ValueError, match=r"'loss' has shape \(2,\)"):
      writer.write_scalars(1, {"loss": np.zeros(2)})


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(writers.jax, "process_index", lambda: 1)
  writer = writers.MetricWriter(tmp_path / "run")
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_text(1, "note", "x")
  writer.flush()
  writer.close()
  assert not writer.enabled and not (tmp_path / "run").exists()
  monkeypatch.setattr(writers.jax, "process_index", lambda: 0)
  with writers.MetricWriter(tmp_path / "run") as writer:
    writer.write_scalars(1, {"loss": 1.0})
  assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_format_duration_and_memory_text():
  assert writers.format_duration(0) == "0:00:00"
  assert writers.format_duration(3 * 3600 + 4 * 60 + 5.4) == "3:04:05"
  assert writers.format_duration(float("inf")) == "?"

  class FakeDevice:
    def __init__(self, stats):
      self.stats = stats

    def memory_stats(self):
      return self.stats

  gib = 1024 ** 3
  busy = FakeDevice({"bytes_in_use": 1.5 * gib, "peak_bytes_in_use": 3 * gib})
  assert writers.device_memory_text(busy) == "mem 1.50 GiB (peak 3.00)"
  assert writers.device_memory_text(FakeDevice(None)) == ""


def test_progress_line_plain_text_is_throttled():
  clock = [100.0]
  stream = io.StringIO()
  line = writers.ProgressLine(40, stage="teacher", steps_per_epoch=10, stream=stream,
                              min_interval_s=5.0, show_memory=False, clock=lambda: clock[0])
  for step in range(1, 41):
    clock[0] += 0.5  # 0.5 s per step, 32 images per step, 0.1 s waiting for data
    line.update(step, {"loss": jnp.asarray(2.0 / step), "kl": 0.125}, images=32,
                data_time=0.1)
  line.close()
  lines = stream.getvalue().splitlines()
  # First update, then every 10 steps (5 s), and the last step.
  assert [l.split(" | ")[2] for l in lines] == [
      "step 1/40", "step 11/40", "step 21/40", "step 31/40", "step 40/40"]
  assert lines[1].split(" | ") == [
      "teacher", "ep 2/4", "step 11/40", "loss 0.1818", "kl 0.125", "64.0 img/s",
      "step 0.500s data 0.100s", "ETA 0:00:14"]
  # The last line covers steps 32..40: 9 steps in 4.5 s.
  assert lines[-1].split(" | ")[1] == "ep 4/4" and "64.0 img/s" in lines[-1]
  assert lines[-1].endswith("ETA 0:00:00")


def test_progress_line_shows_device_memory_once_per_line(monkeypatch):
  gib = 1024 ** 3
  peaks = iter([2.0, 2.5, 3.0])

  class FakeAccelerator:
    def memory_stats(self):  # The peak rises between lines, as on a GPU.
      return {"bytes_in_use": 1.0 * gib, "peak_bytes_in_use": next(peaks) * gib}

  monkeypatch.setattr(writers.jax, "local_devices", lambda: [FakeAccelerator()])
  clock = [0.0]
  stream = io.StringIO()
  line = writers.ProgressLine(3, stage="teacher", stream=stream, min_interval_s=0.0,
                              clock=lambda: clock[0])
  for step in range(1, 4):
    clock[0] += 1.0
    line.update(step, {"loss": 1.0}, images=8)
  line.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 3
  for text, peak in zip(lines, ("2.00", "2.50", "3.00")):
    assert text.count("mem ") == 1 and text.count("GiB") == 1
    assert text.endswith(f"mem 1.00 GiB (peak {peak})")


def test_progress_line_terminal_bar():
  stream = io.StringIO()
  clock = [0.0]
  line = writers.ProgressLine(5, stage="student", stream=stream, use_tty=True,
                              show_memory=False, clock=lambda: clock[0])
  for step in range(1, 6):
    clock[0] += 1.0
    line.update(step, {"loss": 1.0}, images=8)
  line.close()
  frames = [frame for frame in stream.getvalue().split("\r") if frame.strip()]
  assert "student | step 5/5 | loss 1 | 8.0 img/s" in frames[-1]
  assert len(frames) >= 5  # one redraw per update (interval 0.5 s, 1 s per step)
