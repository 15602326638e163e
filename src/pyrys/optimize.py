"""The front door: checks what the user gives, picks the way in (`capture/frontend.py`) and returns an
:class:`OptimizedModule`, whose signatures `compiled.py` takes through capture -> passes -> backend."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.export import ExportedProgram
from torch.utils._pytree import tree_flatten

from pyrys.capture.model_copy import SCRIPT_ADVICE, WriteCheck, private_copy, state_of
from pyrys.capture.exported_program import exported_example_inputs, exported_inputs
from pyrys.capture.script_module import is_torchscript, script_class_name, script_tensors
from pyrys.errors import DeviceError
from pyrys.machine import collect_freed_modules
from pyrys.mode_warnings import in_training, warn_if_exported_training, warn_if_training, warn_of_writes
from pyrys.numerics import TOLERANCES
from pyrys.numerics.budget import AUTO
from pyrys.numerics.eager import eager_outputs
from pyrys.numerics.trace import NumericsTrace
from pyrys.passes.freeze import ALL
from pyrys.shape_cache import DEFAULT_MAX_SHAPES
from pyrys.signature import InputError, check_runnable
from pyrys.capture.frontend import exported_program_frontend, module_frontend, torchscript_frontend
from pyrys.config import OptimizeConfig, check_calibration_options, make_config, with_calibration
from pyrys.optimized_module import OptimizedModule
from pyrys.precision_notes import effective_precision


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise ValueError("pyrys.optimize needs example_inputs: the tuple of inputs the model is called with, "
                         "e.g. example_inputs=(torch.rand(1, 3, 224, 224),)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        keywords = (" (keyword inputs, a tokenizer's output, go in example_kwargs: "
                    "pyrys.optimize(model, None, inputs) or example_kwargs=inputs)"
                    if isinstance(example_inputs, Mapping) else "")
        raise TypeError("pyrys.optimize expects example_inputs to be a non-empty tuple of inputs "
                        f"(e.g. (torch.rand(1, 3, 224, 224),)), got {type(example_inputs).__name__}{keywords}")
    return tuple(example_inputs)


def optimize(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    example_kwargs: dict | None = None,
    *,
    backend: str = "auto",
    freeze_params: Iterable[str] | None = ALL,
    freeze_flags: Iterable[str] | None = ALL,
    disable: Iterable[str] = (),
    print_after_each: bool = False,
    dump_dir: str | Path | None = None,
    verify: bool = False,
    threads: int | None = None,
    layout: str = "auto",
    max_shapes: int = DEFAULT_MAX_SHAPES,
    dynamic: bool | None = None,
    numerics: bool = False,
    precision: str = "fp32",
    calibration: Iterable | None = None,
    accuracy_budget: float | str | None = AUTO,
    output_dtype: torch.dtype | None = None,
) -> OptimizedModule:
    """Optimize ``model`` for inference on inputs like ``example_inputs``.

    ``model`` is an eval-mode ``nn.Module``, a TorchScript ``ScriptModule`` or scripted
    function (imported without tracing), or a ``torch.export.ExportedProgram`` (used as it
    is; ``example_inputs`` default to the program's own).
    ``freeze_params``: attribute names to freeze (``"weight"``, ``"running_var"`` ...); None (default): all.
    ``freeze_flags``: boolean module attributes to freeze to their captured value; None (default): every
    flag the captured graph reads. From an ``nn.Module`` that is each module's ``training`` (``torch.export``
    bakes every other attribute into the graph); from TorchScript every bool attribute its code reads.
    ``disable``: pass names to skip (see ``pyrys.passes.pipeline.PASS_NAMES``).
    ``backend``: ``"auto"`` (dnnl where it loads, else reference), ``"dnnl"`` or ``"reference"``.
    ``threads``: threads per call (default: ``torch.get_num_threads()`` at call time).
    ``layout``: the dnnl backend's activation layout: ``"auto"`` (each candidate measured at compile
    time, the fastest kept), ``"nhwc"``, ``"blocked8"`` or ``"blocked16"``.
    ``max_shapes``: how many input signatures (shapes) keep their compiled program; past that the least
    recently called one is dropped (the first is kept) and compiles again if it comes back.
    ``dynamic``: capture with symbolic sizes (the batch, and every dim of inputs of rank <= 3: sequence
    lengths; where ``torch.export`` can keep them symbolic), run the passes once, and give each new shape a program specialized
    from that graph (ResNet-18: about 0.2 s, 10-15% of a compile; the weights shared). ``None`` (default): the example's shape
    is captured as it is (the fastest first compile) and the symbolic capture happens at the first call
    with another shape; ``True``: at ``optimize`` (a slower first compile, every new shape fast);
    ``False``: never (each new shape is captured and optimized again). A shape the symbolic graph does
    not hold for (a branch on a size, a dim the model pins) is captured again, with a note in ``notes``.
    ``numerics``: run the model eagerly on the example inputs (its state cloned: nothing of it is written),
    then measure the graph after every pass (on the reference backend) and the backend's program, and the
    program's every layer against the captured graph's value it computes: ``opt.numerics``
    (:class:`pyrys.numerics.report.NumericsReport`), also in ``opt.report()``.  It costs compile time (a
    reference run per pass, a second build of the program) and, while it runs, memory: a copy of the
    model, every intermediate activation of the example, and a clone of the weights per measuring run.
    A program saved and loaded keeps each step's error in ``history``, not ``numerics``.
    ``precision``: ``"fp32"`` (default) or ``"bf16"``: convolutions, linears, matmuls and the pooling,
    elementwise and data-movement ops between them run in bfloat16 with float32 accumulation, the rest
    in float32, with a conversion node at each edge (:mod:`pyrys.passes.precision`); outputs stay float32
    (see ``output_dtype``).  Where the CPU has no native bf16 it runs in fp32, with a note in ``notes``.  ``"int8"``: convolutions
    and linears read 8-bit activations (per tensor, scales from ``calibration``) and weights (per output
    channel) and accumulate in int32 (:mod:`pyrys.passes.quantize`); ``notes`` says which kernels this CPU gets.
    ``calibration`` (int8: required; bf16: optional, what the accuracy guard measures on): an iterable of
    samples, each one call's inputs (a tensor or a tuple of them, a ``DataLoader`` over the inputs) with the
    example's shapes and dtypes; the first 300 are read.  ``accuracy_budget`` (bf16, int8): the largest
    relative error against float32 of the outputs on the calibration data (bf16 without it: the inputs
    compiled for); the fewest ops whose own rounding costs the most go back to float32 so that it holds,
    each a miss saying why, and ``notes`` gives the error measured (:mod:`pyrys.numerics.budget`).
    ``"auto"`` (default): 3e-2 for bf16, 5e-2 for int8 (``TOLERANCES``); None: nothing measured.
    ``output_dtype``: ``None`` (default): each output in the dtype eager gives (float32 under every
    ``precision``); ``torch.bfloat16``: every floating-point output in bfloat16 (with ``precision="bf16"``
    a bfloat16 result comes back as it is, no conversion); ``torch.float32``: in float32.
    The user's model is never modified: pyrys works on a private copy (its modules copied, the weights
    it freezes read, not copied: :mod:`pyrys.capture.model_copy`); a new shape after the user wrote to
    those weights raises :class:`pyrys.ModelChangedError`.
    A model pyrys cannot take raises :class:`pyrys.CaptureError` (``forward`` needs tensor data in
    Python), :class:`pyrys.DeviceError` (weights not on the CPU) or :class:`pyrys.ModelCopyError`;
    example inputs off the CPU raise :class:`pyrys.InputError`.
    """
    config = make_config(backend=backend, freeze_params=freeze_params, freeze_flags=freeze_flags, disable=disable,
                         print_after_each=print_after_each, dump_dir=dump_dir, verify=verify, threads=threads,
                         layout=layout, max_shapes=max_shapes, dynamic=dynamic, numerics=numerics,
                         precision=precision, output_dtype=output_dtype)
    check_calibration_options(precision, calibration, accuracy_budget)
    collect_freed_modules()
    if isinstance(model, ExportedProgram):
        if example_inputs is None:
            example_inputs, example_kwargs = exported_example_inputs(model)
        args, kwargs = exported_inputs(model, *_example_inputs(example_inputs, example_kwargs))
        config = with_calibration(config, calibration, accuracy_budget, args, kwargs,
                                  other_sizes=bool(model.range_constraints))  # (its Dims: symbolic sizes)
        _check_on_cpu("the ExportedProgram", model.state_dict.items())
        optimized = OptimizedModule(exported_program_frontend(model), args, kwargs, config, _trace(config, model, args, kwargs))
        warn_if_exported_training(optimized)
        warn_of_writes(optimized, caller_keeps_writes=False)
        return optimized
    if is_torchscript(model):
        return optimize_torchscript(model, example_inputs, example_kwargs, config, calibration=calibration,
                                    accuracy_budget=accuracy_budget)
    if isinstance(model, OptimizedModule):
        raise TypeError("pyrys.optimize: this model is already optimized by pyrys (an OptimizedModule); pass the "
                        "model it was optimized from")
    if not isinstance(model, torch.nn.Module):
        raise TypeError("pyrys.optimize expects a torch.nn.Module, a TorchScript module or function, or a "
                        f"torch.export.ExportedProgram, got {type(model).__name__}")
    inner = next((name for name, module in model.named_modules() if isinstance(module, OptimizedModule)), None)
    if inner is not None:
        raise TypeError(f"pyrys.optimize: this model holds a module optimized by pyrys (at {inner!r}), which "
                        "cannot be captured again (it runs compiled programs, not torch ops); put the model it was "
                        "optimized from in its place and optimize the whole")
    args, kwargs = _example_inputs(example_inputs, example_kwargs)
    config = with_calibration(config, calibration, accuracy_budget, args, kwargs)
    _check_on_cpu(type(model).__name__, state_of(model))
    caller_keeps_writes = getattr(model, "caller_keeps_writes", False)
    frozen = () if "freeze_params" in config.disable else config.freeze_params
    model, writes = private_copy(model, frozen)
    trace = _trace(config, model, args, kwargs)
    optimized = OptimizedModule(module_frontend(model, writes), args, kwargs, config, trace)
    optimized.training = optimized.compiled_training = bool(model.training)
    writes.wait()
    warn_if_training(optimized, model)
    warn_of_writes(optimized, caller_keeps_writes, model=model)
    return optimized


def _trace(config: OptimizeConfig, model: Any, args: tuple, kwargs: dict) -> NumericsTrace | None:
    """What measures the compile when ``numerics=True``: the model's own outputs on the example inputs,
    and the tolerance of the precision it runs in."""
    if not config.numerics:
        return None
    tolerance = TOLERANCES[effective_precision(config.precision)[0]]
    return NumericsTrace(lambda: eager_outputs(model, args, kwargs), tolerance, config.output_dtype)


def _example_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """The example inputs as (args, kwargs), every tensor among them on the CPU."""
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError("pyrys.optimize expects example_kwargs to be a dict of keyword inputs, got "
                        f"{type(example_kwargs).__name__}; a model with several positional inputs takes them as "
                        "one tuple: pyrys.optimize(model, (x, y))")
    kwargs = dict(example_kwargs or {})
    keywords_only = kwargs and (example_inputs is None or (isinstance(example_inputs, (tuple, list)) and not example_inputs))
    args = () if keywords_only else _as_args(example_inputs)  # model(**inputs), as HF models are called
    for i, value in enumerate(tree_flatten((args, kwargs))[0]):
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise InputError(f"pyrys: example input {i} must be on the CPU (pyrys compiles for the CPU), got a tensor "
                             f"on {value.device}; pass CPU tensors with real values, e.g. x.to(\"cpu\")")
        if isinstance(value, torch.Tensor):
            check_runnable(f"example input {i}", value)  # (a nested one: torch's "Internal error" at its sizes)
    return args, kwargs


def _check_on_cpu(owner: str, state: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`DeviceError` unless every parameter and buffer is a CPU tensor with values."""
    for name, tensor in state:
        if tensor.device.type == "meta":
            raise DeviceError(
                f"pyrys: {name} of {owner} is on the meta device (a shape without values), and pyrys compiles CPU "
                "models with real weights. Materialize the model on the CPU with model.to_empty(device=\"cpu\"), "
                "then load its weights with model.load_state_dict(state_dict)")
        if tensor.device.type != "cpu":
            raise DeviceError(f"pyrys: {name} of {owner} is on {tensor.device}, and pyrys compiles CPU models; "
                              "move the model to the CPU first: model.to(\"cpu\")")


def optimize_torchscript(script: Any, example_inputs: Any, example_kwargs: dict | None, config: OptimizeConfig,
                         flag_values: dict[str, bool] | None = None, calibration: Iterable | None = None,
                         accuracy_budget: float | str | None = AUTO) -> OptimizedModule:
    """The TorchScript way in (``pyrys.jit`` passes the freezes recorded by the seed's calls)."""
    args, kwargs = _example_inputs(example_inputs, example_kwargs)
    config = with_calibration(config, calibration, accuracy_budget, args, kwargs)
    _check_on_cpu(script_class_name(script), state_of(script))
    training = bool((flag_values or {}).get("training", in_training(script)))
    trace = _trace(config, script, args, kwargs)
    writes = WriteCheck(script_class_name(script),
                        {name: t for name, t in script_tensors(script).items() if not t.is_inference()},
                        advice=SCRIPT_ADVICE)
    optimized = OptimizedModule(torchscript_frontend(script, flag_values, writes), args, kwargs, config, trace)
    optimized.training = optimized.compiled_training = training
    writes.wait()
    warn_if_training(optimized, script, stacklevel=4, frozen_training=(flag_values or {}).get("training"))
    warn_of_writes(optimized, caller_keeps_writes=False, stacklevel=4)
    return optimized


