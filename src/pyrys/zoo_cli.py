"""``pyrys zoo``: optimize the torchvision zoo on every backend and compare with eager (rich output)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from pyrys import zoo
from pyrys.backends import BACKEND_NAMES
from pyrys.output_paths import unwritable_file


def add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", help=f"model names (default: all {len(zoo.MODELS)})")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(zoo.QUICK)}")
    parser.add_argument("--backend", action="append", default=None, choices=BACKEND_NAMES[1:],
                        help="a backend to check (repeatable; default: every available backend)")
    parser.add_argument("--markdown", default=None, help="also write the table as markdown to this file")


def _format_error(row: zoo.ZooRow) -> str:
    """The error against eager, and eager's own against float64 where that was measured (the bound then)."""
    if row.failure:
        return "-"
    return f"{row.error:.1e}" + (f" (eager's own: {row.eager_error:.1e})" if row.eager_error is not None else "")


def _table(rows: list[zoo.ZooRow]):
    from rich.table import Table

    table = Table(title="pyrys zoo: optimized vs eager")
    for column in ("model", "backend", "ops before", "ops after", "folds", "fusions", "misses", "max error",
                   "result", "s"):
        table.add_column(column, justify="left" if column in ("model", "backend", "result") else "right",
                         overflow="fold")  # (a narrow terminal wraps a cell: "0.0e+…" told nothing)
    for row in rows:
        result = "[green]pass[/green]" if row.passed else f"[red]FAIL[/red] {row.failure}"
        table.add_row(row.model, row.backend, str(row.nodes_before), str(row.nodes_after), str(row.folds),
                      str(row.fusions), str(row.misses), _format_error(row), result, f"{row.seconds:.0f}")
    return table


def markdown(rows: list[zoo.ZooRow]) -> str:
    lines = ["| model | backend | ops before | ops after | folds | fusions | misses | max error | result | s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in rows:
        result = "pass" if row.passed else f"FAIL {row.failure}"
        lines.append(f"| {row.model} | {row.backend} | {row.nodes_before} | {row.nodes_after} | {row.folds} | "
                     f"{row.fusions} | {row.misses} | {_format_error(row)} | {result} | {row.seconds:.0f} |")
    return "\n".join(lines)


def run_zoo_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import pyrys

    names = list(dict.fromkeys(args.models)) or list(zoo.QUICK if args.quick else zoo.MODELS)  # each once
    unknown = [n for n in names if n not in zoo.MODELS]
    if unknown:
        print(f"pyrys zoo: unknown model(s) {unknown}; known: {', '.join(zoo.MODELS)}", file=sys.stderr)
        return 2
    if args.markdown is not None and (problem := unwritable_file(args.markdown)):  # found before the run, not after it
        print(f"pyrys zoo: cannot write --markdown {args.markdown}: {problem}", file=sys.stderr)
        return 2
    backends = list(dict.fromkeys(args.backend)) if args.backend else pyrys.available_backends()
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ  # a file gets the whole table's width
    console = Console(width=170) if wide else Console()
    start = time.time()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("zoo", total=len(names) * len(backends))
        done: list[zoo.ZooRow] = []

        def on_row(row: zoo.ZooRow) -> None:
            status = "pass" if row.passed else f"FAIL {row.failure}"
            progress.console.print(escape(f"{row.model} [{row.backend}]: error {_format_error(row)} {status}"))
            progress.update(task, advance=1, description=row.model)
            done.append(row)
            if args.markdown:  # kept current, so a long run that is stopped still leaves its rows
                with open(args.markdown, "w") as f:
                    f.write(markdown(done) + f"\n\n(in progress: {len(done)} of {len(names) * len(backends)} rows)\n")

        rows = zoo.run_zoo(names, backends, on_row)
    console.print(_table(rows))
    passed = sum(row.passed for row in rows)
    summary = (f"{passed}/{len(rows)} passed (tolerance {pyrys.FP32_TOLERANCE:g}, or past it {zoo.EAGER_MARGIN:g}x "
               f"eager's own error against float64) in {time.time() - start:.0f} s; "
               f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads")
    console.print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n\n" + summary + "\n")
    return 0 if passed == len(rows) else 1
