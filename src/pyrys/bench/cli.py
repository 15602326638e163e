"""``pyrys bench``: time pyrys against eager, TorchScript, torch.compile, ORT, OpenVINO."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pyrys.cli_arguments import at_least_one, finite_non_negative
from pyrys.bench.measure import TimingPlan, benchmark_model, error_text, pin_threads
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import Peer, default_peers, select_peers
from pyrys.bench.markdown import command_line
from pyrys.bench.report import add_peak_share, build_table, describe_machine, make_rows, write_all
from pyrys.bench.roofline import best_of, count_flops, fp32_peak, measure_peaks
from pyrys.output_paths import unwritable_folder
from pyrys.model_specs import ModelSpecError, resolve

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                  "densenet121", "convnext_tiny", "regnet_y_800mf", "shufflenet_v2_x1_0"]
QUICK_MODEL = "pyrys.bench.models:tiny_convnet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``pyrys bench`` options to ``parser``."""
    parser.add_argument("--models", nargs="+",
                        help=f"torchvision names, zoo transformers (hf_bert, hf_gpt2, ...) or module:factory "
                             f"(default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--batch-sizes", nargs="+", type=at_least_one, help="default: 1 16 (1 with --quick)")
    parser.add_argument("--systems", nargs="+", default=[],
                        help="systems to run (eager is always included; default: every one but the -unguarded ones, "
                             "'all': every one)")
    parser.add_argument("--threads", type=at_least_one, default=2, help="threads for torch, ORT and OpenVINO")
    parser.add_argument("--rounds", type=at_least_one, help="interleaved rounds (default 5, 2 with --quick)")
    parser.add_argument("--block-seconds", type=finite_non_negative, default=1.0, help="target time of one timed block")
    parser.add_argument("--warmup-seconds", type=finite_non_negative, default=0.25, help="warm-up before every block")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for CSV/JSON/PNG")
    parser.add_argument("--quick", action="store_true", help="tiny model, few iterations (for tests)")
    parser.add_argument("--list-systems", action="store_true", help="list systems and whether they can run")


def timing_plan(args: argparse.Namespace) -> TimingPlan:
    """The timing plan from the options; ``--quick`` shrinks the timed blocks.

    Its warm-up stays at 0.1 s: with 0.02 s, ORT's still-spinning threads made the
    tiny model's eager blocks 400x slower.
    """
    if args.quick:
        return TimingPlan(rounds=args.rounds or 2, warmup_s=0.1, block_s=0.02, min_iters=2)
    return TimingPlan(rounds=args.rounds or 5, warmup_s=args.warmup_seconds, block_s=args.block_seconds)


def model_names(args: argparse.Namespace) -> list[str]:
    """``--models``, or the tiny model with ``--quick``, or the default zoo."""
    return args.models or ([QUICK_MODEL] if args.quick else DEFAULT_MODELS)


def unnamed_models(names: list[str]) -> list[str]:
    """Why each of ``names`` names no model (:func:`pyrys.model_specs.resolve`: unknown, not importable, no such
    attribute, not a model or a factory of one)."""
    unknown = []
    for name in names:
        try:
            resolve(name)
        except ModelSpecError as error:
            unknown.append(str(error))
    return unknown


def batch_sizes(args: argparse.Namespace) -> list[int]:
    """``--batch-sizes``, or 1 with ``--quick``, or 1 and 16."""
    return args.batch_sizes or ([1] if args.quick else [1, 16])


def short_name(model_name: str) -> str:
    """``pkg.mod:factory`` -> ``factory``; torchvision names unchanged."""
    return model_name.rsplit(":", 1)[-1]


def list_systems(peers: list[Peer], console: Console) -> int:
    """Print every system and whether it can run here (and which run only when named)."""
    width = max(len(peer.name) for peer in peers)
    for peer in peers:
        ok, reason = peer.available()
        named = "" if peer.by_default else " (run when named)"
        console.print(f"{peer.name:{width}} {'available' if ok else 'skipped: ' + reason}{named}", markup=False)
    return 0


def bench_one(name: str, batch: int, peers: list[Peer], plan: TimingPlan, progress: Progress,
              task: int) -> list[dict]:
    """Rows for one model at one batch size."""
    model = build_model(name)
    inputs = example_inputs(name, batch, model)
    flops = count_flops(model, inputs)
    label = f"{short_name(name)} b{batch}"

    def advance(system: str) -> None:
        progress.update(task, advance=1, description=f"{label}: {system}")

    results = benchmark_model(peers, model, inputs, plan, advance)
    torch._dynamo.reset()
    gc.collect()
    return make_rows(short_name(name), batch, results, flops)


def bench_all(args: argparse.Namespace, peers: list[Peer], plan: TimingPlan,
              console: Console) -> tuple[list[dict], int]:
    """Rows for every model and batch size, with a progress bar; also the failures count."""
    jobs = [(name, batch) for name in model_names(args) for batch in batch_sizes(args)]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    rows, failures = [], 0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("bench", total=len(jobs) * len(peers) * (plan.rounds + 1))
        for name, batch in jobs:
            try:
                rows += bench_one(name, batch, peers, plan, progress, task)
            except Exception as error:  # a model that cannot be built or counted
                console.print(f"{name} batch {batch}: {error_text(error)}", style="red", markup=False)
                failures += 1
    return rows, failures


def run_pinned(args: argparse.Namespace, command: str) -> int:
    """The benchmark with threads pinned to ``--threads``; ``command`` is the report's command line."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    threads = pin_threads(args.threads)
    try:
        peers = select_peers(default_peers(threads), args.systems)
    except ValueError as error:
        console.print(str(error), style="red", markup=False)
        return 2
    if args.list_systems:
        return list_systems(peers if args.systems else default_peers(threads), console)
    if unknown := unnamed_models(model_names(args)):  # found before the run (a model's build fails in its row)
        console.print(f"pyrys bench: {'; '.join(unknown)}", style="red", markup=False)
        return 2
    if problem := unwritable_folder(args.out):  # found before the run, not after it
        console.print(f"pyrys bench: cannot write --out {args.out}: {problem}", style="red", markup=False)
        return 2
    console.print(f"threads: torch {threads}, onnxruntime intra-op {threads}, openvino {threads}")
    first_peaks = measure_machine_peaks(args.quick, console)
    rows, failures = bench_all(args, peers, timing_plan(args), console)
    peaks = best_of(first_peaks, measure_machine_peaks(args.quick, console))
    add_peak_share(rows, fp32_peak(peaks))
    report(rows, describe_machine(threads, peaks), args.out, console, command)
    return 1 if failures else 0


def measure_machine_peaks(quick: bool, console: Console) -> dict[str, float]:
    """Peak GFLOP/s of large kernels, with a spinner (measured before and after the run)."""
    with console.status("measuring this machine's peak GFLOP/s"):
        return measure_peaks(quick=quick)


def report(rows: list[dict], machine: dict, out: Path, console: Console, command: str) -> None:
    """Print the table and write CSV, JSON, Markdown (headed by ``command``) and PNG."""
    console.print(build_table(rows, machine))
    for kind, path in write_all(rows, machine, out, command).items():
        console.print(f"{kind}: {path}", markup=False)


def run(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark described by ``args`` (parsed from ``argv``, the arguments after ``pyrys bench``;
    None: this process's command line); print a table and write CSV/JSON/PNG."""
    threads_before = torch.get_num_threads()
    try:
        return run_pinned(args, command_line(argv))
    finally:
        torch.set_num_threads(threads_before)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m pyrys.bench.cli``."""
    parser = argparse.ArgumentParser(prog="pyrys bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
