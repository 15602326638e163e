"""The benchmark chart (``bench.png``): pyrys against the fastest other system and against eager.

One column of panels per batch size.  Top row: for every model, the fastest system other
than pyrys and eager (fp32 only: a bf16 peer computes something less precise) divided
by pyrys; bottom row: eager divided by pyrys.  A bar is a speed-up on a log axis centred on
1: right of the centre pyrys is faster, left of it slower; the grey band is the run-to-run
noise of a shared machine (within it, call it a tie).

Regenerate a chart from a CSV that ``pyrys bench`` wrote, without timing anything again:
``python -m pyrys.bench.chart benchmarks/bench.csv benchmarks/bench.png --caption "machine ..."``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

SUBJECT = "pyrys-dnnl"
EAGER = "eager"
NOISE = 1.05  # ratios within 5% of 1 are ties (benchmarks/RESULTS.md: repeated runs move that much)
FASTER, SLOWER, EAGER_COLOR = "#2a7f3f", "#b8412c", "#4a6fa5"
TICKS = (  # (widest axis limit, ticks), the first that fits
    (1.6, (0.8, 0.9, 1, 1.1, 1.25)),
    (3.0, (0.5, 0.67, 1, 1.5, 2)),
    (math.inf, (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16)),
)


@dataclass(frozen=True)
class Comparison:
    """One model at one batch size: the speed-ups of ``subject`` (other's latency / subject's)."""

    model: str
    batch: int
    peer: str | None  # the fastest fp32 system other than pyrys and eager
    vs_peer: float | None
    vs_eager: float | None


def subject_of(rows: list[dict]) -> str | None:
    """``pyrys-dnnl`` where it ran, else the first pyrys system that did, else None."""
    ran = [r["system"] for r in rows if r["system"].startswith("pyrys") and r["median_ms"]]
    return SUBJECT if SUBJECT in ran else (ran[0] if ran else None)


def is_peer(system: str) -> bool:
    """A system pyrys competes with at fp32: not pyrys, not eager, not a bf16 variant."""
    return not system.startswith("pyrys") and system != EAGER and not system.endswith("-bf16")


def compare(rows: list[dict], subject: str) -> list[Comparison]:
    """A :class:`Comparison` per model and batch size at which ``subject`` ran, in the rows' order."""
    groups: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if row["median_ms"]:
            groups.setdefault((row["model"], int(row["batch"])), {})[row["system"]] = row["median_ms"]
    result = []
    for (model, batch), medians in groups.items():
        mine = medians.get(subject)
        if mine is None:
            continue
        peers = {system: ms for system, ms in medians.items() if is_peer(system)}
        peer = min(peers, key=peers.get) if peers else None
        eager = medians.get(EAGER)
        result.append(Comparison(model, batch, peer, peers[peer] / mine if peer else None,
                                 eager / mine if eager else None))
    return result


def write_chart(rows: list[dict], caption: str, path: Path) -> None:
    """Draw the chart for ``rows`` (as ``pyrys bench`` makes them) into ``path``; ``caption``: the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subject = subject_of(rows)
    name = subject or "pyrys"
    comparisons = compare(rows, subject) if subject else []
    batches = list(dict.fromkeys(c.batch for c in comparisons))
    models = list(dict.fromkeys(c.model for c in comparisons))
    fig = plt.figure(figsize=(min(14.0, 3.5 + 5.2 * max(1, len(batches))), 3.2 + 0.85 * max(1, len(models))),
                     layout="constrained")
    top, bottom = fig.subfigures(2, 1, hspace=0.04)
    if comparisons:
        _row(top, f"{name} against the fastest other fp32 system: its latency / {name}'s", name, batches, models,
             {(c.model, c.batch): (c.vs_peer, c.peer) for c in comparisons})
        _row(bottom, f"{name} against PyTorch eager: eager's latency / {name}'s", name, batches, models,
             {(c.model, c.batch): (c.vs_eager, None) for c in comparisons})
    else:
        top.text(0.5, 0.5, f"no {name} results to compare", ha="center", fontsize=16)
    peers = ", ".join(dict.fromkeys(r["system"] for r in rows if is_peer(r["system"]) and r["median_ms"]))
    note = (f"A bar is a speed-up: right of 1x {name} is faster, left of it slower. "
            f"Grey: within {NOISE - 1:.0%} of 1x, run-to-run noise (a tie).\n"
            f"The fastest other system is the fastest of: {peers or 'none ran'} "
            "(bf16 systems left out: they are less precise than fp32).")
    fig.get_layout_engine().set(h_pad=0.15)
    bottom.text(0.01, 0.0, f"{note}\n{caption}", fontsize=10.5, va="top", wrap=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.2)
    plt.close(fig)


def _row(subfig, title: str, name: str, batches: list[int], models: list[str],
         bars: dict[tuple[str, int], tuple[float | None, str | None]]) -> None:
    """A titled row of panels, one per batch size; ``bars``: (speed-up, peer) by (model, batch)."""
    subfig.suptitle(title, fontsize=16, fontweight="bold", x=0.01, ha="left")
    axes = subfig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    for ax, batch in zip(axes, batches):
        _panel(ax, models, [bars.get((model, batch), (None, None)) for model in models], f"batch {batch}")
    _symmetric_axes(axes, name, [ratio for ratio, _ in bars.values() if ratio])


def _panel(ax, models: list[str], bars: list[tuple[float | None, str | None]], title: str) -> None:
    """A bar per model from 1 to its speed-up on a log axis, labelled with the value (and the peer)."""
    ax.set_xscale("log")
    ax.axvspan(1 / NOISE, NOISE, color="#dddddd", zorder=0)
    ax.axvline(1.0, color="black", linewidth=1.0, zorder=2)
    for y, (ratio, peer) in enumerate(bars):
        if ratio is None:
            _label(ax, 1.0, y, "no result", 5, fontsize=13, color="#666666")
            continue
        faster = ratio >= 1
        color = EAGER_COLOR if peer is None else (FASTER if faster else SLOWER)
        ax.barh(y, ratio - 1.0, left=1.0, height=0.62, color=color, zorder=3)
        outward = 5 if faster else -5  # points: the value beyond the bar's end, the peer across the centre line
        _label(ax, ratio, y, f"{ratio:.2f}x", outward, fontsize=13)
        if peer is not None:
            _label(ax, 1.0, y, peer, -outward, fontsize=12, color="#444444")
    ax.set_yticks(range(len(models)), models, fontsize=14)
    ax.set_ylim(len(models) - 0.4, -0.6)
    ax.set_title(title, fontsize=15)
    ax.grid(axis="x", color="#bbbbbb", linewidth=0.6, zorder=1)


def _label(ax, x: float, y: float, text: str, offset: float, **style) -> None:
    """``text`` beside the point (x, y), ``offset`` points to its right (or, negative, to its left)."""
    ax.annotate(text, (x, y), xytext=(offset, 0), textcoords="offset points", va="center",
                ha="left" if offset > 0 else "right", zorder=4, **style)


def _symmetric_axes(axes, name: str, ratios: list[float]) -> None:
    """One log axis for a row of panels, centred on 1x, wide enough for its largest bar and label."""
    from matplotlib.ticker import FixedLocator, NullLocator

    extreme = max([1.3, *(max(r, 1 / r) for r in ratios)])
    limit = extreme ** 1.3  # 30% more on the log scale: room for the label beyond the longest bar
    ticks = [t for t in next(ticks for widest, ticks in TICKS if limit <= widest) if 1 / limit <= t <= limit]
    for ax in axes:
        ax.set_xlim(1 / limit, limit)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:.3g}x" for t in ticks], fontsize=13)
        ax.set_xlabel(f"< {name} slower  |  {name} faster >", fontsize=13)


def main(argv: list[str] | None = None) -> int:
    """``python -m pyrys.bench.chart CSV PNG --caption TEXT``: redraw a chart from a ``bench.csv``."""
    from pyrys.bench.report import read_csv

    parser = argparse.ArgumentParser(prog="python -m pyrys.bench.chart", description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--caption", default="", help="the machine the rows were measured on")
    args = parser.parse_args(argv)
    write_chart(read_csv(args.csv), args.caption, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
