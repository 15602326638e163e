"""``pyrys explain MODEL``: what each pass did to a model, and why folds and fusions were missed."""
from __future__ import annotations

import argparse
import sys

import torch

from pyrys import zoo
from pyrys.backends import BACKEND_NAMES
from pyrys.errors import ModelCopyError
from pyrys.model_specs import ModelSpecError, describe_inputs
from pyrys.model_specs import load_model as load_named_model
from pyrys.numerics import BF16_TOLERANCE, FP32_TOLERANCE, INT8_TOLERANCE
from pyrys.numerics.budget import AUTO
from pyrys.passes.precision import PRECISIONS
from pyrys.quantization.calibration import samples_like
from pyrys.signature import InputError


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = (-1,)
    if any(size < 0 for size in shape):
        raise argparse.ArgumentTypeError(f"expected a shape like 1x3x224x224 (sizes 0 or more), got {text!r}")
    return shape


def tolerance(text: str) -> float:
    """A tolerance: a finite number, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 like 1e-4, got {text!r}")
    return value


def pass_name(text: str) -> str:
    """One of the pipeline's pass names."""
    from pyrys.passes.pipeline import PASS_NAMES

    if text not in PASS_NAMES:
        raise argparse.ArgumentTypeError(f"unknown pass {text!r}; the passes are {', '.join(PASS_NAMES)}")
    return text


def load_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names (:mod:`pyrys.model_specs`: a zoo name or ``module:attr``), in eval mode; a spec
    that names none exits with why."""
    try:
        model = load_named_model(spec)
    except ModelSpecError as error:
        raise SystemExit(f"pyrys explain: {error}") from None
    if model.training:  # (pyrys.optimize would capture it so, with a warning: the CLI explains inference)
        print(f"pyrys explain: {spec} is in training mode; explained in eval mode (model.eval())", file=sys.stderr)
    return model.eval()


def accuracy_budget(text: str) -> float | str | None:
    """An accuracy budget: a finite number > 0, ``auto`` (the precision's default) or ``none`` (no guard)."""
    if text in (AUTO, "none"):
        return None if text == "none" else AUTO
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0 like 1e-2, 'auto' or 'none', got {text!r}")
    return value


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a zoo model name (e.g. resnet50, hf_bert) or module:attr")
    parser.add_argument("--input-shape", type=parse_shape, default=None,
                        help="input shape, e.g. 1x3x224x224 (default: the model's usual size; 299 for inception_v3; "
                             "a module:attr model's own example_inputs(1) where it has one)")
    parser.add_argument("--dump-dir", default=None, help="write the graph after every pass to DIR/NNN_<pass>.txt")
    parser.add_argument("--backend", default="reference", choices=BACKEND_NAMES, help="backend to compile for (default: reference)")
    parser.add_argument("--disable", action="append", default=[], type=pass_name, help="a pass to skip (repeatable)")
    parser.add_argument("--numerics", action="store_true",
                        help="also the error against eager after every pass and of every layer, and the first "
                             "stage over the tolerance")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the precision to compile for (bf16, int8: see README; int8 calibrates on the example "
                             "and inputs drawn like it)")
    parser.add_argument("--accuracy-budget", type=accuracy_budget, default=AUTO,
                        help="with --precision bf16 or int8: the error against float32 the accuracy guard holds, "
                             "keeping the ops that move the outputs most in floating point, each listed with why "
                             "(default: auto, the precision's own; none: no guard)")
    parser.add_argument("--tolerance", type=tolerance, default=None,
                        help=f"the relative error --numerics flags (default: that of the precision run, "
                             f"{FP32_TOLERANCE:g} for fp32, {BF16_TOLERANCE:g} for bf16 or a half-precision model, "
                             f"{INT8_TOLERANCE:g} for int8)")


def run_explain(args: argparse.Namespace) -> int:
    from pyrys.explain import explain

    if args.tolerance is not None and not args.numerics:
        raise SystemExit("pyrys explain: --tolerance is the error --numerics flags; give --numerics too")
    model = load_model(args.model)
    try:
        inputs = zoo.example_inputs(args.model, model, args.input_shape)
    except ValueError as error:  # (ModelSpecError too: the model's own example_inputs)
        raise SystemExit(f"pyrys explain: {error}") from None
    title = f"{args.model} ({describe_inputs(inputs)}) on the {{backend}} backend"  # the one auto picks, once optimized
    calibration = None
    if args.precision == "int8":
        calibration = samples_like(inputs)
        title += (f", int8 calibrated on the example and {len(calibration) - 1} inputs drawn like it (random: pass "
                  "real data to pyrys.optimize(..., calibration=...))")
    try:
        result = explain(model, inputs, backend=args.backend, dump_dir=args.dump_dir, disable=tuple(args.disable),
                         title=title, numerics=args.numerics, precision=args.precision, calibration=calibration,
                         tolerance=args.tolerance, accuracy_budget=args.accuracy_budget)
    except (ValueError, InputError, ModelCopyError) as error:  # pyrys's errors (CaptureError ...), bad options
        raise SystemExit(f"pyrys explain: {type(error).__name__}: {error}") from None
    print(result.render())
    if args.dump_dir:
        print(f"graphs after every pass written to {args.dump_dir}/")
    return 0
