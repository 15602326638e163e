"""A test's check that nothing is measured (a load runs the kernels its save chose)."""
from __future__ import annotations

from pyrys.backends.dnnl import attention_kernels, int8_or_float, linear_kernels, measured


def refuse_to_measure(monkeypatch) -> None:
    """Every kernel timing of the dnnl backend raises ``AssertionError`` from now on (in this test)."""
    def refuse(*args):
        raise AssertionError("a load measured a kernel")

    for module, name in ((int8_or_float, "_seconds"), (linear_kernels, "_seconds"), (measured, "best_seconds"),
                         (attention_kernels, "best_seconds")):
        monkeypatch.setattr(module, name, refuse)
