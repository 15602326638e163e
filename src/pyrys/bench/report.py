"""Benchmark output: rows, a rich table, CSV and JSON; the chart is ``chart.py``, the Markdown ``markdown.py``."""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch
from rich.table import Table
from rich.text import Text

from pyrys.bench.chart import write_chart
from pyrys.bench.markdown import write_markdown
from pyrys.bench.measure import SystemResult
from pyrys.machine import cpu_info

COLUMNS = ["model", "batch", "system", "status", "median_ms", "p10_ms", "p90_ms", "vs_eager",
           "gflop_per_run", "gflop_s", "pct_fp32_peak", "compile_s", "peak_rss_mib",
           "max_rel_error", "iterations", "note"]
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnx", "openvino", "pyrys")


def package_version(name: str) -> str:
    """The installed version of ``name``, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(threads: int, peaks: dict[str, float]) -> dict:
    """CPU, cores, threads, package versions, date and measured peaks."""
    cpu, flags = cpu_info()
    return {"cpu": cpu, "isa": flags, "cores": os.cpu_count(), "threads": threads,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": {name: package_version(name) for name in PACKAGES},
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "peak_gflop_s": {key: round(value, 1) for key, value in peaks.items()}}


def machine_line(machine: dict) -> str:
    """One line describing the machine, for table captions and charts."""
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v != "not installed")
    return (f"{machine['cpu']} ({'/'.join(machine['isa']) or 'no AVX2'}), {machine['cores']} cores, "
            f"{machine['threads']} threads; {versions}; {machine['date']}")


def make_rows(model: str, batch: int, results: list[SystemResult], flops: int) -> list[dict]:
    """One row per system for one model and batch size."""
    eager = next((r.percentile_ms(50) for r in results if r.system == "eager"), None)
    return [_row(model, batch, result, eager, flops) for result in results]


def _row(model: str, batch: int, result: SystemResult, eager_ms: float | None, flops: int) -> dict:
    median = result.percentile_ms(50)
    return {"model": model, "batch": batch, "system": result.system, "status": result.status,
            "median_ms": median, "p10_ms": result.percentile_ms(10), "p90_ms": result.percentile_ms(90),
            "vs_eager": median / eager_ms if median and eager_ms else None,
            "gflop_per_run": flops / 1e9, "gflop_s": flops / median / 1e6 if median else None,
            "pct_fp32_peak": None, "compile_s": result.compile_s, "peak_rss_mib": result.peak_rss_mib,
            "max_rel_error": result.max_rel_error, "iterations": len(result.samples_s), "note": result.note}


def add_peak_share(rows: list[dict], fp32_peak: float | None) -> None:
    """Fill ``pct_fp32_peak``: achieved GFLOP/s as a percentage of the fp32 peak."""
    for row in rows:
        if row["gflop_s"] and fp32_peak:
            row["pct_fp32_peak"] = 100 * row["gflop_s"] / fp32_peak


def _cell(value: object, spec: str = ".2f") -> str:
    """A table cell: floats formatted by ``spec``, missing values as '-'."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def build_table(rows: list[dict], machine: dict) -> Table:
    """A rich table with one row per system per model and batch size."""
    table = Table(title="pyrys bench (latency in ms; x eager < 1 is faster)", caption=machine_line(machine))
    for header in ("model", "batch", "system", "median", "p10-p90", "x eager", "GFLOP/s", "% peak",
                   "compile s", "dRSS MiB", "relative_error"):
        table.add_column(header, no_wrap=True)
    table.add_column("note", overflow="fold", max_width=60)
    for row in rows:
        spread = f"{_cell(row['p10_ms'], '.3g')}-{_cell(row['p90_ms'], '.3g')}" if row["p10_ms"] else "-"
        error = f"{row['max_rel_error']:.1e}" if row["max_rel_error"] is not None else "-"
        table.add_row(row["model"], str(row["batch"]), row["system"], _cell(row["median_ms"], ".3g"), spread,
                      _cell(row["vs_eager"]), _cell(row["gflop_s"], ".1f"), _cell(row["pct_fp32_peak"], ".0f"),
                      _cell(row["compile_s"], ".1f"), _cell(row["peak_rss_mib"], ".0f"), error,
                      Text(row["note"]))  # (as written: a peer's error may hold brackets, which markup would eat)
    return table


def write_csv(rows: list[dict], path: Path) -> None:
    """All rows as CSV, one column per field in ``COLUMNS``."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV :func:`write_csv` wrote, numbers as numbers and empty cells as None."""
    with open(path, newline="") as handle:
        return [{key: _parsed(key, value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _parsed(column: str, text: str) -> object:
    if column in ("model", "system", "status", "note"):
        return text
    if text == "":
        return None
    return int(text) if column in ("batch", "iterations") else float(text)


def write_json(rows: list[dict], machine: dict, path: Path) -> None:
    """Machine description and rows as JSON."""
    path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


def write_all(rows: list[dict], machine: dict, out_dir: Path, command: str) -> dict[str, Path]:
    """Write CSV, JSON, Markdown (headed by ``command``, the command line) and PNG into ``out_dir``; return
    their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"bench.{kind}" for kind in ("csv", "json", "md", "png")}
    write_csv(rows, paths["csv"])
    write_json(rows, machine, paths["json"])
    write_markdown(rows, machine, command, paths["md"])
    write_chart(rows, machine_line(machine), paths["png"])
    return paths
