"""The ``pyrys`` console script: ``pyrys demo``, ``pyrys bench``."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from pyrys.demo import run_demo

    return run_demo()


def _bench(args: argparse.Namespace) -> int:
    from pyrys.bench import cli as bench_cli

    return bench_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrys", description="pyrys: a graph-level inference compiler for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the seed walkthrough and a ResNet-18").set_defaults(handler=_demo)
    bench = commands.add_parser("bench", help="benchmark pyrys against eager, TorchScript, torch.compile, ORT, OpenVINO")
    try:
        from pyrys.bench import cli as bench_cli

        bench_cli.add_arguments(bench)
    except ImportError:
        pass
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
