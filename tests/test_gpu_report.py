"""benchmarks/gpu_report.py at its tiny size on the CPU: the table it prints and the
BENCHMARKS.md it writes hold the measured fields, consistent with each other and with the
batch sizes worked out here from the tiny settings (2 ids x 2 images = 4 pairs)."""

import pytest

from tests.benchmark_scripts import load_benchmark

PEAK_TFLOPS = 0.05  # a made-up peak, so that MFU is computed on the CPU


def load_report():
  return load_benchmark("gpu_report")


def table_rows(text, columns):
  """{(what, dtype): {column: cell}} from the printed " | " lines or the Markdown table."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == len(columns) and cells[0] in ("teacher step", "student grouped",
                                                   "student two_calls", "extraction"):
      rows[(cells[0], cells[1])] = dict(zip(columns, cells))
  return rows


@pytest.mark.slow
def test_tiny_report_prints_and_writes_consistent_measurements(tmp_path, capsys):
  report = load_report()
  output = tmp_path / "BENCHMARKS.md"
  # bfloat16, the dtype the report is for (each row compiles its program: one dtype here, and
  # the test below measures the same teacher row again, from the compilation cache).
  report.main(["--tiny", "--dtypes", "bfloat16", "--multipliers", "1", "--steps", "2",
               "--peak-tflops", str(PEAK_TFLOPS), "--output", str(output)])
  printed = table_rows(capsys.readouterr().out, report.COLUMNS)
  written_text = output.read_text()
  written = table_rows(written_text, report.COLUMNS)
  pairs = 2 * 2
  expected_batch = {"teacher step": 3 * pairs, "student grouped": 2 * pairs,
                    "student two_calls": 2 * pairs, "extraction": 8}
  assert set(printed) == {(what, "bfloat16") for what in expected_batch}
  assert written == printed
  for (what, dtype), row in printed.items():
    numbers = {c: float(row[c]) for c in report.COLUMNS[2:] if row[c] != "n/a"}
    assert numbers["batch"] == expected_batch[what]
    step_s = numbers["step ms"] / 1e3
    # Three significant digits are printed: the derived columns agree to that rounding.
    assert numbers["img/s"] == pytest.approx(numbers["batch"] / step_s, rel=0.02)
    assert numbers["MFU %"] == pytest.approx(
        100 * numbers["GFLOP/step"] * 1e9 / step_s / (PEAK_TFLOPS * 1e12), rel=0.02)
    assert numbers["compile s"] > 0 and numbers["XLA GiB"] > 0
    assert row["device peak GiB"] == "n/a"  # The CPU reports no allocator statistics.
  # XLA's FLOPs count the real work: a training step (forward + backward, about 3 forwards)
  # costs 2-4x the inference of as many images; both student forwards do the same work.
  for dtype in ("bfloat16",):
    assert float(printed[("student grouped", dtype)]["GFLOP/step"]) == pytest.approx(
        float(printed[("student two_calls", dtype)]["GFLOP/step"]), rel=0.05)
    per_image = float(printed[("extraction", dtype)]["GFLOP/step"]) / 8
    teacher = float(printed[("teacher step", dtype)]["GFLOP/step"])
    assert 2 * 3 * pairs * per_image < teacher < 4 * 3 * pairs * per_image
  assert "- device: cpu x1 (cpu)" in written_text
  assert "ResNet-18 width 4, 48x48, 2 ids x 2 images" in written_text
  assert written_text.count("non-local blocks off") == 1  # --tiny's network says so
  assert "- peak FLOP/s for bfloat16: --peak-tflops" in written_text
  assert "Skipped" not in written_text


@pytest.mark.slow
def test_rows_beyond_the_time_budget_are_skipped_and_listed(tmp_path, capsys):
  report = load_report()
  output = tmp_path / "BENCHMARKS.md"
  report.main(["--tiny", "--dtypes", "bfloat16", "--multipliers", "1", "--steps", "1",
               "--budget-s", "0", "--output", str(output)])
  written = output.read_text()
  assert list(table_rows(written, report.COLUMNS)) == [("teacher step", "bfloat16")]
  assert ("Skipped: student two_calls bfloat16 x1; extraction bfloat16 x1; student grouped "
          "bfloat16 x1." in written)
  assert "no peak known for 'cpu'" in written  # MFU needs a known peak: n/a here.
  assert "(0 skipped)" not in capsys.readouterr().out


def test_refuses_the_full_size_on_a_cpu(tmp_path):
  report = load_report()
  with pytest.raises(SystemExit, match="no accelerator found"):
    report.main(["--output", str(tmp_path / "BENCHMARKS.md")])
  assert not (tmp_path / "BENCHMARKS.md").exists()


def test_peak_table_matches_device_kinds():
  report = load_report()
  assert report.peak_tflops("NVIDIA H200", "bfloat16", 0)[0] == 989.4
  assert report.peak_tflops("NVIDIA H100 80GB HBM3", "float32", 0)[0] == 494.7
  assert report.peak_tflops("NVIDIA H100 PCIe", "bfloat16", 0)[0] == 756.0
  assert report.peak_tflops("TPU v5 lite", "bfloat16", 0)[0] == 197.0
  assert report.peak_tflops("cpu", "float32", 0)[0] == 0.0
  assert report.peak_tflops("cpu", "float32", 2.5) == (2.5, "--peak-tflops")
