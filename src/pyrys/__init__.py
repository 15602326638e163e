"""pyrys: a graph-level inference compiler for PyTorch on CPU.

    opt = pyrys.optimize(model, example_inputs=(x,))
    y = opt(x)
    print(opt.graph)
    for step in opt.history: print(step.name, step.graph)
"""
from pyrys.backends import available_backends
from pyrys.numerics import FP32_TOLERANCE, relative_error
from pyrys.optimize import OptimizedModule, optimize
from pyrys.passes.pipeline import PASS_NAMES
from pyrys.signature import InputError

__version__ = "0.1.0"

__all__ = ["optimize", "OptimizedModule", "available_backends", "relative_error", "FP32_TOLERANCE",
           "PASS_NAMES", "InputError", "__version__"]
