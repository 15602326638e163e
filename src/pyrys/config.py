"""What a user chooses in :func:`pyrys.optimize`, checked once: :class:`OptimizeConfig`."""
from __future__ import annotations


import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from pyrys.backends import BACKEND_NAMES
from pyrys.backends.options import LAYOUTS
from pyrys.numerics.budget import AUTO, GUARD_SAMPLES, budget_for, check_budget
from pyrys.signature import signature_of
from pyrys.output_paths import unwritable_folder
from pyrys.passes.freeze import ALL
from pyrys.passes.precision import PRECISIONS
from pyrys.quantization.calibration import Calibration, calibration_samples, copied_sample
from pyrys.passes.pipeline import check_pass_names
from pyrys.shape_cache import DEFAULT_MAX_SHAPES


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything a user can choose; see :func:`pyrys.optimize`."""

    backend: str = "auto"
    freeze_params: tuple[str, ...] | None = ALL  # None: every parameter and buffer
    freeze_flags: tuple[str, ...] | None = ALL  # None: every flag the captured graph reads
    disable: tuple[str, ...] = ()
    print_after_each: bool = False
    dump_dir: str | None = None
    verify: bool = False
    threads: int | None = None
    layout: str = "auto"
    max_shapes: int = DEFAULT_MAX_SHAPES
    dynamic: bool | None = None  # see optimize()
    numerics: bool = False  # measure every pass and layer against eager on the example inputs
    precision: str = "fp32"  # "bf16", "int8": see optimize()
    # precision="int8": the samples, then the plan; "bf16": the samples (if given) and the accuracy budget
    calibration: Calibration | None = field(default=None, compare=False, repr=False)
    output_dtype: torch.dtype | None = None  # every floating-point output in this dtype; None: eager's
    # torch's default dtype, as it was at optimize (a loaded module: as its save says); calls under another refuse
    default_dtype: torch.dtype = field(default_factory=torch.get_default_dtype)


OUTPUT_DTYPES = (None, torch.float32, torch.bfloat16)


MAX_THREADS = 1024  # libgomp's team of 100,000 threads crashes the interpreter; 1024 start and run


def threads_problem(threads: Any) -> str:
    """What is wrong with ``threads=`` (None, or an int from 1 to MAX_THREADS), or ""."""
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= MAX_THREADS):
        return ""
    return f"threads must be None or an int from 1 to {MAX_THREADS}, got {threads!r}"


def check_threads(threads: Any, who: str) -> None:
    """``ValueError`` naming ``who`` for a ``threads=`` :func:`threads_problem` refuses."""
    if problem := threads_problem(threads):
        raise ValueError(f"{who}: {problem}")


def _check_dump_dir(dump_dir: Any) -> None:
    """``dump_dir`` is None or a directory pyrys can create (``ValueError`` naming why not)."""
    if dump_dir is None:
        return
    if not isinstance(dump_dir, (str, os.PathLike)):
        raise ValueError(f"pyrys.optimize: dump_dir must be a path (str or pathlib.Path) or None, got {dump_dir!r}")
    if os.fspath(dump_dir) and (problem := unwritable_folder(dump_dir)):  # ("": no dumps, as None)
        raise ValueError(f"pyrys.optimize: cannot make dump_dir {str(dump_dir)!r}: {problem}")


def make_config(*, backend: str = "auto", freeze_params: Iterable[str] | None = ALL,
                freeze_flags: Iterable[str] | None = ALL, disable: Iterable[str] = (),
                print_after_each: bool = False, dump_dir: str | Path | None = None,
                verify: bool = False, threads: int | None = None, layout: str = "auto",
                max_shapes: int = DEFAULT_MAX_SHAPES, dynamic: bool | None = None,
                numerics: bool = False, precision: str = "fp32",
                output_dtype: torch.dtype | None = None) -> OptimizeConfig:
    """An :class:`OptimizeConfig` from :func:`optimize`'s keyword options, checked."""
    check_threads(threads, "pyrys.optimize")
    if backend not in BACKEND_NAMES:
        raise ValueError(f"pyrys.optimize: backend must be one of {BACKEND_NAMES}, got {backend!r}")
    for name, value in (("print_after_each", print_after_each), ("verify", verify)):
        if not isinstance(value, bool):
            raise ValueError(f"pyrys.optimize: {name} must be True or False, got {value!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"pyrys.optimize: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
        raise ValueError(f"pyrys.optimize: max_shapes must be a positive int, got {max_shapes!r}")
    if not any(dynamic is allowed for allowed in (None, True, False)):
        raise ValueError(f"pyrys.optimize: dynamic must be None, True or False, got {dynamic!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"pyrys.optimize: precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(numerics, bool):
        raise ValueError(f"pyrys.optimize: numerics must be True or False, got {numerics!r}")
    _check_dump_dir(dump_dir)
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"pyrys.optimize: output_dtype must be None, torch.float32 or torch.bfloat16, got "
                         f"{output_dtype!r}")
    return OptimizeConfig(
        backend=backend,
        freeze_params=_names("freeze_params", freeze_params, "['weight', 'bias']"),
        freeze_flags=_names("freeze_flags", freeze_flags, "['training']"),
        disable=check_pass_names(_names("disable", disable, "('fold_conv_bn',)")),
        print_after_each=print_after_each,
        dump_dir=None if dump_dir is None else str(dump_dir),
        verify=verify,
        threads=threads,
        layout=layout,
        max_shapes=max_shapes,
        dynamic=dynamic,
        numerics=numerics,
        precision=precision,
        output_dtype=output_dtype,
    )


def _names(option: str, names: Iterable[str] | None, like: str) -> tuple[str, ...] | None:
    """``names`` as a tuple of strings (None stays None where the option allows it: every one); a single
    string, or anything but an iterable of strings, is refused (``"weight"`` would be its letters)."""
    if names is None and option != "disable":
        return None
    if isinstance(names, (str, bytes, Mapping)) or not isinstance(names, Iterable):  # a dict: its keys, not values
        allowed = " or None" if option != "disable" else ""
        raise ValueError(f"pyrys.optimize: {option} must be a list or tuple of names, e.g. {like}{allowed}; "
                         f"got {names!r}")
    names = tuple(names)
    wrong = [name for name in names if not isinstance(name, str)]
    if wrong:
        raise ValueError(f"pyrys.optimize: {option} must hold names (strings), got {wrong[0]!r} in {names!r}")
    return names


def check_calibration_options(precision: str, calibration: Any, accuracy_budget: Any) -> None:
    """``calibration`` is given when ``precision == "int8"``, and only with a lower precision; the budget is
    ``"auto"``, None or a positive number."""
    if precision == "int8" and calibration is None:
        raise ValueError("pyrys.optimize: precision='int8' needs calibration=: samples of the model's inputs to "
                         "measure its activations on (an iterable of input tensors or tuples, e.g. a DataLoader "
                         "over the inputs; a few hundred representative samples)")
    if precision not in ("bf16", "int8") and calibration is not None:
        raise ValueError(f"pyrys.optimize: calibration= is read with precision='int8' or 'bf16' only, not {precision!r}")
    check_budget(accuracy_budget)
    if precision not in ("bf16", "int8") and accuracy_budget not in (AUTO, None):
        raise ValueError(f"pyrys.optimize: accuracy_budget= is read with precision='int8' or 'bf16' only, not "
                         f"{precision!r}")


def with_calibration(config: OptimizeConfig, calibration: Iterable | None, accuracy_budget: float | str | None,
                     args: tuple, kwargs: dict, other_sizes: bool = False) -> OptimizeConfig:
    """``config`` holding the checked calibration samples (if any) and the accuracy budget of its precision
    (int8, bf16; with bf16 and ``accuracy_budget=None``: none, nothing is measured), else as it is.  Samples
    of other sizes than the example's are read where the first capture is for every size: ``dynamic=True``,
    or ``other_sizes`` (an ExportedProgram, whose Dims say which)."""
    budget = budget_for(config.precision, accuracy_budget)
    if calibration is None and (config.precision != "bf16" or budget is None):
        return config
    limit = GUARD_SAMPLES if config.precision == "bf16" else None  # bf16 reads only what its guard measures on
    samples, note = (None, "") if calibration is None else calibration_samples(
        calibration, args, kwargs, limit, other_sizes=other_sizes or config.dynamic is True)
    if samples is not None and config.precision == "bf16":  # kept for every later compile's guard
        samples = [copied_sample(sample) for sample in samples]
    _, flat = signature_of(args, kwargs)
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat]
    return dataclasses.replace(config, calibration=Calibration(samples, budget, note, example_shapes=shapes))
