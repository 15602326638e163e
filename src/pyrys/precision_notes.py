"""The precision a compile runs in, what its accuracy guard measures on, and the notes saying so."""
from __future__ import annotations


import torch
import torch.fx as fx

from pyrys.numerics.budget import accuracy_note
from pyrys.machine import isa_limit_note, native_bf16
from pyrys.passes.precision_guard import Bf16Guard
from pyrys.quantization import int8_note
from pyrys.quantization.calibration import Calibration
from pyrys.config import OptimizeConfig
from pyrys.size_one import fitted_samples


def effective_precision(precision: str) -> tuple[str, str]:
    """The precision the passes use, and a note where it is not the one asked for (no native bf16 here)
    or says what it runs on (int8)."""
    if precision == "bf16" and not native_bf16():
        return "fp32", ("precision='bf16' runs in fp32: no native bfloat16 here (neither avx512_bf16 "
                        f"nor amx_bf16){isa_limit_note()}, and emulated bf16 is slower than fp32")
    if precision == "int8":
        return precision, int8_note()
    return precision, ""


def int8_layers(run) -> int:
    """How many convs and linears a pipeline run put in int8."""
    return sum(step.fired.get("int8", 0) for step in run.history)


def int8_coverage_note(precision: str, run, gm: fx.GraphModule) -> str:
    """With ``precision="int8"``, a note when no op could run in int8 (the misses say why), or saying how many
    ops run in bf16 beside the int8 ones (where the CPU has native bf16: ``passes/quantize.py``); with
    ``"bf16"``, a note when no op could run in bf16 (none for a bfloat16 model: it runs so already).  What
    runs instead is named from ``gm``, the optimized graph: a float64 model stays float64."""
    own = runs_in(gm)
    see = "see misses" if run.misses else ""
    if precision == "bf16" and not any(step.fired.get("bf16") for step in run.history):
        if own.startswith("bfloat16"):
            return ""
        return (f"precision='bf16': no op could run in bf16 here, so the model runs in {own} ("
                + f"{see}; " * bool(see) + "an op pyrys runs through torch, such as torch's fused "
                "TransformerEncoderLayer fast path, keeps its dtype)")
    if precision != "int8":
        return ""
    bf16 = sum(step.fired.get("bf16", 0) for step in run.history)
    if not any(step.fired.get("int8") for step in run.history):
        kept_in = f"bf16 where the accuracy guard kept it, else {own}" if bf16 else own
        return (f"precision='int8': no convolution or linear could run in int8 here, so the model runs in {kept_in}"
                + f" ({see})" * bool(see))
    if bf16:
        return (f"precision='int8': {bf16} op{'s' * (bf16 > 1)} run{'s' * (bf16 == 1)} in bf16, not float32 (the CPU "
                "compiled for has native bf16): attention (no int8 kernel), the layers the accuracy guard keeps out "
                "of int8, and the views between")
    return ""


def runs_in(gm: fx.GraphModule) -> str:
    """The floating-point dtypes ``gm``'s ops compute in, the most common first ("float32" where none)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        value = node.meta.get("val") if node.op == "call_function" else None
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            name = str(value.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
    return " and ".join(sorted(counts, key=counts.get, reverse=True)) or "float32"


def bf16_guard(calibration: Calibration | None, flat: list, gm: fx.GraphModule) -> Bf16Guard | None:
    """What the bf16 accuracy guard of this compile measures on: the samples of ``calibration=`` where given
    and the graph ``gm`` takes them (its ranges and guards, or its fixed shapes; a capture for a batch of one
    or a step of one token takes them cut to its size-1 dims: :func:`~pyrys.size_one.fitted_samples`), else
    the inputs it compiles for (``flat``); None where ``accuracy_budget=None`` (nothing measured)."""
    if calibration is None or calibration.accuracy_budget is None:
        return None
    samples = calibration.samples or []  # kept (GUARD_SAMPLES of them): every capture measures on them
    fitted, how = fitted_samples(gm, samples, len(samples), calibration.example_shapes)
    own = ([flat], "the inputs compiled for")
    if not fitted:  # (said where there were samples: the read's note promises a word on those left out)
        held = f", its graph holding for none of the {len(samples)} calibration samples" if samples else ""
        return Bf16Guard(own[0], calibration.accuracy_budget, own[1] + held)
    if how:  # cut to a size of 1, they may not run: an input holding positions in the dim cut
        return Bf16Guard(fitted, calibration.accuracy_budget, f"{len(fitted)} samples {how}",
                         fallback=own)
    return Bf16Guard(fitted, calibration.accuracy_budget, f"{len(fitted)} calibration sample{'s' * (len(fitted) > 1)}")


def guard_accuracy_note(precision: str, calibration: Calibration | None, guard: Bf16Guard | None,
                        error: float | None = None) -> str:
    """How far the outputs are from float32's, as the accuracy guard measured (bf16: this compile's; int8: that
    of the plan this compile uses, the first compile's or, calibrated on its own, this one's); ``error``: the
    compiled program's, measured on the same data (the guard measured torch's ops)."""
    if guard is not None:
        return guard.note(error)
    plan = calibration.plan if calibration is not None and precision == "int8" else None
    if plan is None or plan.error is None:
        return ""
    return accuracy_note("int8", plan.error if error is None else error, calibration.accuracy_budget, len(plan.kept),
                         plan.measured_on, plan.floating)


def disabled_precision_note(precision: str, config: OptimizeConfig) -> str:
    """What ``disable=("lower_precision",)`` leaves undone (bf16, ``output_dtype``), or ``disable=("quantize",)``
    (int8), said rather than silent (and rather than a note blaming the model: "no op could run in ...")."""
    said = ["the pass quantize is disabled: precision='int8' not applied"] * (
        precision == "int8" and "quantize" in config.disable)
    if "lower_precision" in config.disable:
        undone = [f"precision={precision!r}"] * (precision == "bf16")
        undone += [f"output_dtype={config.output_dtype}"] * (config.output_dtype is not None)
        said += [f"the pass lower_precision is disabled: {' and '.join(undone)} not applied"] * bool(undone)
    return "; ".join(said)


BF16_ROUNDING = 2.0 ** -8  # the largest relative rounding error of a float32 rounded to bfloat16 (8 bits)


def rounded_outputs_note(precision: str, config: OptimizeConfig, measured: str) -> str:
    """With ``output_dtype=torch.bfloat16``, that the error an accuracy note states (``measured``) is the
    outputs' before they are rounded to bfloat16 for the caller, which adds up to :data:`BF16_ROUNDING`."""
    if config.output_dtype != torch.bfloat16 or precision not in ("bf16", "int8") or not measured:
        return ""
    return (f"output_dtype=torch.bfloat16: the error stated is the outputs' before their rounding to bfloat16, which "
            f"adds up to {BF16_ROUNDING:.1e} of each (relative); an accuracy_budget below that may not hold for "
            "what the caller receives")
