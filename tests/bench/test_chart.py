"""The benchmark chart: what it compares, and that it is drawn from a CSV at a readable size."""
from __future__ import annotations

import matplotlib.image
import pytest

from pyrys.bench.chart import Comparison, compare, subject_of, write_chart
from pyrys.bench.report import COLUMNS, read_csv, write_csv


def row(model: str, batch: int, system: str, median_ms: float | None) -> dict:
    values = dict.fromkeys(COLUMNS)
    values.update(model=model, batch=batch, system=system, status="ok" if median_ms else "error",
                  median_ms=median_ms, note="")
    return values


ROWS = [row("net", 1, "pyrys-dnnl", 2.0), row("net", 1, "pyrys-reference", 3.0), row("net", 1, "eager", 6.0),
        row("net", 1, "onnxruntime", 2.5), row("net", 1, "openvino", 3.0), row("net", 1, "openvino-bf16", 1.0),
        row("net", 16, "pyrys-dnnl", None), row("net", 16, "eager", 40.0)]


def test_pyrys_is_compared_with_the_fastest_fp32_peer_and_with_eager():
    assert subject_of(ROWS) == "pyrys-dnnl"
    assert compare(ROWS, "pyrys-dnnl") == [Comparison("net", 1, "onnxruntime", 1.25, 3.0)]  # not bf16, not batch 16


def test_the_chart_is_drawn_from_a_csv_at_a_readable_size(tmp_path):
    write_csv(ROWS, tmp_path / "bench.csv")
    rows = read_csv(tmp_path / "bench.csv")
    assert rows[0]["batch"] == 1 and rows[0]["median_ms"] == pytest.approx(2.0) and rows[6]["median_ms"] is None
    write_chart(rows, "a test machine", tmp_path / "bench.png")
    height, width, _ = matplotlib.image.imread(tmp_path / "bench.png").shape
    assert 600 <= width <= 1600 and height <= 1600
