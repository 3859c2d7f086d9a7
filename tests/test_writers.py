"""Tests for dakd_jax.writers: JSON lines, TensorBoard event files, process-0-only writing and
the progress line."""
import errno
import glob
import io
import json
import math
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dakd_jax import errors
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


def test_jsonl_records(tmp_path):
  _write_sample(tmp_path)
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
    records = [json.loads(line) for line in handle]
  assert all(isinstance(r.pop("wall_time"), float) for r in records)
  assert records == [
      {"step": 10, "stage": "teacher", "loss": 1.5, "lr": 0.25, "images": 64},
      {"step": 20, "stage": "teacher", "loss": 0.75, "nan_term": "NaN"},
      {"step": 30, "stage": "eval", "mAP": 0.5},
  ]
  # Appends on reopen (a resumed run continues the same file).
  with writers.MetricWriter(tmp_path, enabled=True) as writer:
    writer.write_scalars(40, {"loss": 0.5})
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as handle:
    assert len(handle.readlines()) == 4


def test_tensorboard_events(tmp_path):
  _write_sample(tmp_path)
  files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for event in _read_events(files[0]):
    for value in event.summary.value:
      scalars[(value.tag, event.step)] = value.simple_value
  assert set(scalars) == {("teacher/loss", 10), ("teacher/lr", 10), ("teacher/images", 10),
                          ("teacher/loss", 20), ("teacher/nan_term", 20), ("eval/mAP", 30)}
  assert scalars[("teacher/loss", 10)] == 1.5 and scalars[("teacher/lr", 10)] == 0.25
  assert scalars[("teacher/images", 10)] == 64 and scalars[("teacher/loss", 20)] == 0.75
  assert math.isnan(scalars[("teacher/nan_term", 20)]) and scalars[("eval/mAP", 30)] == 0.5


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
  assert writers.device_memory_text(busy) == "mem 1.5/3.0 GiB"
  assert writers.device_memory_text(FakeDevice(None)) == ""
  # Without a peak statistic the bytes in use are the peak so far.
  assert writers.device_memory_bytes(FakeDevice({"bytes_in_use": 7})) == (7, 7)
  assert writers.device_memory_bytes(FakeDevice({})) is None


def terminal_screen(text):
  """The lines a terminal shows after `text`: '\r' returns to the line's start, characters
  overwrite, '\n' starts a new line; trailing blanks are not visible."""
  lines, column = [[]], 0
  for char in text:
    if char == "\r":
      column = 0
    elif char == "\n":
      lines.append([])
      column = 0
    else:
      line = lines[-1]
      line.extend(" " * (column + 1 - len(line)))
      line[column] = char
      column += 1
  return ["".join(line).rstrip() for line in lines]


def test_progress_line_plain_text_is_throttled():
  clock = [100.0]
  stream = io.StringIO()
  line = writers.ProgressLine(40, stage="teacher", steps_per_epoch=10, stream=stream,
                              min_interval_s=5.0, show_memory=False, clock=lambda: clock[0],
                              width=200)
  for step in range(1, 41):
    clock[0] += 0.5  # 0.5 s per step, 32 images per step, 0.1 s waiting for data
    line.update(step, {"loss": jnp.asarray(2.0 / step), "kl": 0.125}, images=32,
                data_time=0.1)
    if step == 15:
      line.clear()  # Before an evaluation table: a file keeps its lines, nothing extra.
  line.close()  # A file already holds the last line: close adds nothing.
  lines = stream.getvalue().splitlines()
  # First update, then every 10 steps (5 s), and the last step.
  assert [l.split(" | ")[0] for l in lines] == [
      "teacher step 1/40", "teacher step 11/40", "teacher step 21/40", "teacher step 31/40",
      "teacher step 40/40"]
  # Step, loss, images/s and ETA lead; 29 steps left at 0.5 s = 14.5 s (rounded to even).
  assert lines[1].split(" | ") == [
      "teacher step 11/40", "loss 0.1818", "64.0 img/s", "ETA 0:00:14", "kl 0.125", "ep 2/4",
      "step 0.500s data 0.100s"]
  # The last line covers steps 32..40: 9 steps in 4.5 s.
  assert lines[-1].split(" | ")[1:4] == ["loss 0.05", "64.0 img/s", "ETA 0:00:00"]
  assert "ep 4/4" in lines[-1]


STUDENT_TERMS = {"class": 1.073, "class_strong": 1.548, "class_weak": 0.5983, "grad_norm": 5.832,
                 "instance": 1.765, "instance_strong": 2.402, "instance_weak": 1.129,
                 "loss": 2.838, "mask_fraction_class": 0.5, "mask_fraction_instance": 0.5,
                 "plain_kd": 0.9319}


@pytest.mark.parametrize("width, columns_env", [(80, None), (None, None), (None, "120")])
def test_progress_line_fits_the_terminal_width(monkeypatch, width, columns_env):
  """At 80 columns (given, or unknown: not a terminal) and at a terminal's 120: step, loss,
  img/s and ETA first, then the other terms in order, as many as fit."""
  if columns_env is None:
    monkeypatch.delenv("COLUMNS", raising=False)
  else:
    monkeypatch.setenv("COLUMNS", columns_env)
  limit = int(columns_env or 80) - 1  # The last column stays free: a terminal would wrap.
  clock = [0.0]
  stream = io.StringIO()
  line = writers.ProgressLine(60, stage="student", steps_per_epoch=20, stream=stream,
                              use_tty=False, min_interval_s=0.0, show_memory=False,
                              clock=lambda: clock[0], width=width)
  for step in (10, 20, 60):
    clock[0] += 2.5
    line.update(step, STUDENT_TERMS, images=320)
  rendered = stream.getvalue().splitlines()
  assert len(rendered) == 3
  for text in rendered:
    parts = text.split(" | ")
    assert len(text) <= limit
    assert parts[0].startswith("student step ") and parts[1] == "loss 2.838"
    assert parts[2].endswith(" img/s") and parts[3].startswith("ETA ")
    others = [f"{name} {value:.4g}" for name, value in STUDENT_TERMS.items() if name != "loss"]
    shown = parts[4:]
    assert shown == others[:len(shown)]
    next_part = others[len(shown)]  # Every line here is cut: there are more terms than room.
    assert len(text) + len(" | ") + len(next_part) > limit
  assert rendered[0].split(" | ")[:4] == ["student step 10/60", "loss 2.838", "128.0 img/s",
                                          "ETA 0:00:12"]  # 50 steps at 0.25 s


def test_fit_parts_keeps_the_lead_and_the_order():
  assert writers.fit_parts(["abc"], ["1234567", "x"], 10) == "abc"  # never "abc | x"
  assert writers.fit_parts(["abc"], ["12", "x"], 12) == "abc | 12 | x"
  assert writers.fit_parts(["a" * 30], ["b"], 10) == "a" * 10


def test_first_eta_leaves_out_compilation():
  """The loop restarts the clock once the first step has compiled (30 s here); the first line
  then extrapolates from the 1 s steps, not from the compilation."""
  clock = [0.0]

  def start():
    return writers.ProgressLine(101, stage="teacher", stream=io.StringIO(), use_tty=False,
                                show_memory=False, clock=lambda: clock[0], width=200)

  restarted, plain = start(), start()
  clock[0] = 30.0
  restarted.restart_clock(0)
  assert restarted.update(0, {"loss": 1.0}, images=0).split(" | ")[:4] == [
      "teacher step 0/101", "loss 1", "? img/s", "ETA ?"]  # no step timed yet
  clock[0] = 31.0
  text = restarted.update(1, {"loss": 1.0}, images=16)
  assert text.split(" | ")[2:4] == ["16.0 img/s", "ETA 0:01:40"]  # 100 steps at 1 s
  compiled_in = plain.update(1, {"loss": 1.0}, images=16)
  assert compiled_in.split(" | ")[3] == "ETA 0:51:40"  # 100 steps at 31 s: what it avoids


def test_terminal_line_is_redrawn_in_place_and_left_once_at_the_end():
  stream = io.StringIO()
  clock = [0.0]
  line = writers.ProgressLine(6, stage="student", stream=stream, use_tty=True,
                              show_memory=False, clock=lambda: clock[0], width=80)
  for step in (1, 2, 3):
    clock[0] += 1.0
    line.update(step, {"loss": 1.0, "class": 0.5}, images=8)
  line.clear()  # Before an evaluation table.
  stream.write("[student step 3] evaluation\n")
  for step in (4, 5, 6):
    clock[0] += 1.0
    line.update(step, {"loss": 1.0, "class": 0.5}, images=8)
  line.clear()
  stream.write("table row\n")
  line.close()
  line.close()  # Nothing more.
  final = "student step 6/6 | loss 1 | 8.0 img/s | ETA 0:00:00 | class 0.5"
  assert terminal_screen(stream.getvalue()) == [
      "[student step 3] evaluation", "table row", final, ""]
  assert stream.getvalue().count(final) == 2  # drawn at step 6, then left for good at close
  assert stream.getvalue().count("\n") == 3  # the two tables and the final line


def test_metric_writer_storage_failures_name_the_folder(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  with writers.MetricWriter(workdir, stage="teacher", enabled=True) as writer:
    writer.write_scalars(1, {"loss": 1.0})

    class FullDisk:
      def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir,
                                                                            "metrics.jsonl"))

      def flush(self):
        pass

      def close(self):
        pass

    monkeypatch.setattr(writer, "_jsonl", FullDisk())
    with pytest.raises(errors.StorageError) as error:
      writer.write_scalars(2, {"loss": 1.0})
  assert str(error.value).startswith(
      f"cannot write the metrics in {workdir} (metrics.jsonl, TensorBoard events) "
      f"({workdir}/metrics.jsonl): No space left on device.")

  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)

  monkeypatch.setattr(os, "makedirs", read_only)
  elsewhere = str(tmp_path / "elsewhere")
  with pytest.raises(errors.StorageError, match=f"{elsewhere} \\(metrics.jsonl, TensorBoard "
                     f"events\\) \\({elsewhere}\\): Read-only file system"):
    writers.MetricWriter(elsewhere, stage="teacher", enabled=True)


def test_drop_rows_after_names_the_log_it_cannot_rewrite(tmp_path, monkeypatch):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1}\n{"step": 2}\n')

  def no_quota(*args):
    raise OSError(errno.EDQUOT, "Disk quota exceeded")

  monkeypatch.setattr(os, "replace", no_quota)
  with pytest.raises(errors.StorageError, match=f"metrics log {path}: Disk quota exceeded"):
    writers.drop_rows_after(path, 1)
  with open(path) as f:
    assert f.read() == '{"step": 1}\n{"step": 2}\n'


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
  for text, peak in zip(lines, ("2.0", "2.5", "3.0")):
    # Memory leads the optional part of the line, so it shows whenever anything does.
    assert text.count("mem ") == 1 and text.count("GiB") == 1
    assert text.split(" | ")[4] == f"mem 1.0/{peak} GiB"


def test_the_writer_does_not_import_torch_and_leaves_it_importable():
  """tensorboardX imports torch when installed (about 2 s per run); the writer avoids it, and
  torch (installed with the dev extra) still imports afterwards."""
  code = ("import sys; from dakd_jax import writers; loaded = 'torch' in sys.modules; "
          "import torch; print(loaded, torch.zeros(2).sum().item())")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["False", "0.0"]
