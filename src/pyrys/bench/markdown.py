"""The benchmark as Markdown (``bench.md``; ``benchmarks/RESULTS.md`` is made from it).

Per model and batch size: every system's median latency, its spread, the ratio to eager
and to ONNX Runtime (the strongest fp32 peer), GFLOP/s against the machine's measured
peak, compile time, memory and error.  Then one line per model: pyrys-dnnl against each peer.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

REFERENCE_PEER = "onnxruntime"
PYRYS = "pyrys-dnnl"
ERROR_MEASURE = ("`pyrys.relative_error`, max|y - y_eager| / max|y_eager| over all outputs "
                 "(the measure `pyrys.FP32_TOLERANCE` = 1e-4 bounds)")


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    return groups


def _median(rows: list[dict], system: str) -> float | None:
    return next((r["median_ms"] for r in rows if r["system"] == system and r["median_ms"]), None)


def _table(rows: list[dict]) -> list[str]:
    peer = _median(rows, REFERENCE_PEER)
    lines = ["| system | median ms | p10-p90 ms | x eager | x ORT | GFLOP/s | % fp32 peak | compile s | dRSS MiB | "
             "pyrys.relative_error | note |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        spread = f"{_num(r['p10_ms'], '.3g')}-{_num(r['p90_ms'], '.3g')}" if r["p10_ms"] else "-"
        vs_peer = r["median_ms"] / peer if peer and r["median_ms"] else None
        error = f"{r['max_rel_error']:.1e}" if r["max_rel_error"] is not None else "-"
        note = (r["note"] or "").replace("|", "/")[:80]
        lines.append(f"| {r['system']} | {_num(r['median_ms'], '.3g')} | {spread} | {_num(r['vs_eager'], '.2f')} | "
                     f"{_num(vs_peer, '.2f')} | {_num(r['gflop_s'], '.0f')} | {_num(r['pct_fp32_peak'], '.0f')} | "
                     f"{_num(r['compile_s'], '.1f')} | {_num(r['peak_rss_mib'], '.0f')} | {error} | {note} |")
    return lines


def _summary(groups: dict[tuple, list[dict]]) -> list[str]:
    """One line per model: pyrys-dnnl's latency divided by each other system's (< 1: pyrys is faster)."""
    systems = list(dict.fromkeys(r["system"] for rows in groups.values() for r in rows if r["system"] != PYRYS))
    lines = ["| model | batch | " + " | ".join(f"vs {s}" for s in systems) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in systems) + " |"]
    for (model, batch), rows in groups.items():
        mine = _median(rows, PYRYS)
        ratios = [mine / other if mine and (other := _median(rows, s)) else None for s in systems]
        lines.append(f"| {model} | {batch} | " + " | ".join(_num(x, ".2f") for x in ratios) + " |")
    return lines


def render(rows: list[dict], machine: dict, command: str) -> str:
    """The whole report."""
    peaks = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in machine.get("peak_gflop_s", {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    out = [f"Command: `{command}`", "",
           f"Machine: {machine['cpu']} ({'/'.join(machine['isa'])}), {machine['cores']} cores, "
           f"{machine['threads']} threads; {versions}; {machine['date']}", "",
           f"Roofline (best measured on this machine, before and after the run): {peaks}", "",
           f"Error: {ERROR_MEASURE}.", "",
           f"## {PYRYS} latency / each system's latency (< 1: pyrys is faster)", "", *_summary(_groups(rows)), ""]
    for (model, batch), group in _groups(rows).items():
        gflop = group[0]["gflop_per_run"]
        out += [f"## {model}, batch {batch} ({gflop:.2f} GFLOP per run)", "", *_table(group), ""]
    return "\n".join(out)


def command_line(argv: list[str] | None = None) -> str:
    """The ``pyrys bench`` command line of ``argv`` (the arguments after ``pyrys bench``), or of this
    process's own arguments where None: what the user typed (for the report)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if argv is None and args[:1] == ["bench"]:
        args = args[1:]
    return shlex.join(["pyrys", "bench", *args])  # quoted where a shell would need it (a path with spaces)


def write_markdown(rows: list[dict], machine: dict, command: str, path: Path) -> None:
    path.write_text(render(rows, machine, command))
