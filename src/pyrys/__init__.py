"""pyrys: a graph-level inference compiler for PyTorch on CPU.

    opt = pyrys.optimize(model, example_inputs=(x,))   # nn.Module, TorchScript or ExportedProgram
    y = opt(x)
    print(opt.graph)
    pyrys.save(opt, "model.pyrys"); opt = pyrys.load("model.pyrys")   # no pickle, no recompile
    for step in opt.history: print(step.name, step.graph)
    print(pyrys.optimize(model, (x,), numerics=True).numerics.render())   # error after every pass, per layer
    print(pyrys.bisect(model, (x,), tolerance=1e-4).render())             # the first pass over a tolerance

    torch.compile(model, backend="pyrys")               # found by entry point; no import needed
    pyrys._jit_pass_freeze_params(m._c, 'forward', 'weight'); pyrys.jit.graph_for(m, x)   # the seed's calls
"""
from pyrys.backends import available_backends
from pyrys.errors import (CaptureError, DataDependentError, DeviceError, LoadError, ModelChangedError, ModelCopyError,
                          SaveError, TracedCallError)
from pyrys.explain import explain
from pyrys.numerics import FP32_TOLERANCE, relative_error
from pyrys.numerics.bisect import bisect
from pyrys.optimize import OptimizedModule, optimize
from pyrys.passes.pipeline import PASS_NAMES
from pyrys.saving import load, save
from pyrys.signature import InputError
from pyrys import jit
from pyrys.jit import _jit_pass_freeze_flags, _jit_pass_freeze_params
from pyrys.compile_backend import register_backend

register_backend()

__version__ = "0.1.0"

__all__ = ["optimize", "explain", "bisect", "save", "load", "OptimizedModule", "available_backends", "relative_error", "FP32_TOLERANCE",
           "PASS_NAMES", "InputError", "CaptureError", "DataDependentError", "DeviceError", "ModelCopyError",
           "ModelChangedError", "SaveError", "LoadError", "TracedCallError", "jit",
           "_jit_pass_freeze_params", "_jit_pass_freeze_flags", "__version__"]
