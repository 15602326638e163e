"""The ``pyrys`` console script: ``pyrys demo``, ``pyrys bench``, ``pyrys explain``, ``pyrys zoo``, ``pyrys serve``."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from pyrys.demo import run_demo

    return run_demo()


def _bench(args: argparse.Namespace) -> int:
    from pyrys.bench import cli as bench_cli

    return bench_cli.run(args)


def _explain(args: argparse.Namespace) -> int:
    from pyrys import explain_cli

    return explain_cli.run_explain(args)


def _zoo(args: argparse.Namespace) -> int:
    from pyrys import zoo_cli

    return zoo_cli.run_zoo_command(args)


def _serve(args: argparse.Namespace) -> int:
    from pyrys.ray import serve_cli

    return serve_cli.run_serve(args)


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
    from pyrys import explain_cli, zoo_cli

    explain = commands.add_parser("explain", help="what each pass did to a model, and why folds/fusions were missed")
    explain_cli.add_explain_arguments(explain)
    explain.set_defaults(handler=_explain)
    zoo = commands.add_parser("zoo", help="optimize every torchvision model and compare with eager")
    zoo_cli.add_zoo_arguments(zoo)
    zoo.set_defaults(handler=_zoo)
    from pyrys.ray import serve_cli

    serve = commands.add_parser("serve", help="serve a saved program over HTTP on Ray Serve (the ray extra)")
    serve_cli.add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
