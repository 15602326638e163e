"""``opt.numerics``: the error after every pass and of every layer, as a table.

    numerics: max relative error against eager on the example inputs (tolerance 1e-04)
       0  capture                              0
       1  freeze_params                        0
       8  fold_conv_bn                   3.6e-07
      ...
      13  program (dnnl)                 8.9e-07
    worst layers of the dnnl program, against the captured values they compute (52 compared):
      2.9e-07  %conv2d_19 pyrys::conv2d_add_relu = %relu_16 (+ %batch_norm_19, %add_7)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from pyrys.numerics import checked_tolerance
from pyrys.numerics.layers import LayerError


@dataclass
class NumericsReport:
    """Errors against eager (``passes``: ``(step, error)`` in pipeline order, ``"capture"`` first, a row per
    entry of ``opt.history``; then the backend program's, which includes legalization into the backend's
    fused forms), and per-layer errors of the program against the captured graph, worst first.  Rows are
    numbered from 0 (a pass that runs twice has two rows)."""

    tolerance: float
    passes: list[tuple[str, float]]
    backend: str
    backend_error: float
    layers: list[LayerError] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # op nodes pyrys made: no captured value to compare
    problems: list[str] = field(default_factory=list)  # a step that could not run or be compared, and why

    @property
    def rows(self) -> list[tuple[str, float]]:
        """Every measured stage: the passes, then ``"program (<backend>)"``."""
        return [*self.passes, (f"program ({self.backend})", self.backend_error)]

    def first_over(self, tolerance: float | None = None) -> tuple[int, str, float] | None:
        """``(row index, stage, error)`` of the first stage over ``tolerance`` (default: the report's), or None."""
        limit = self.tolerance if tolerance is None else checked_tolerance(tolerance, "NumericsReport.first_over")
        return next(((i, name, error) for i, (name, error) in enumerate(self.rows) if not error <= limit), None)

    def layer(self, name: str) -> LayerError:
        """The layer that is node ``name`` of the program, or that computes captured node ``name``.

        A captured node folded or fused into another raises ``KeyError`` saying which node took it over.  ``name``
        may be written as the report prints it (``%conv2d``)."""
        name = name.removeprefix("%") if isinstance(name, str) else name
        for layer in self.layers:
            if name in (layer.node, layer.computes):
                return layer
        owner = next((layer for layer in self.layers if name in layer.absorbed), None)
        if owner is not None:
            raise KeyError(f"%{name} has no value of its own in the optimized program: it was folded or fused into "
                           f"%{owner.node} ({owner.op}), which computes %{owner.computes}")
        if name in self.unmatched:
            raise KeyError(f"%{name} was made by pyrys's passes and has no eager counterpart to compare with")
        raise KeyError(f"no op %{name} in the program or the captured graph (compared: "
                       f"{', '.join('%' + layer.node for layer in self.layers[:5])}{', ...' if len(self.layers) > 5 else ''})")

    def render(self, layers: int = 10) -> str:
        """The stages' errors and the ``layers`` worst layers (a count, 0 or more), as text."""
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 0:
            raise ValueError(f"NumericsReport.render: layers is how many of the worst layers to list, a whole number "
                             f"0 or more, got {layers!r}")
        lines = ["numerics: max relative error against eager on the example inputs "
                 f"(tolerance {format_tolerance(self.tolerance)})"]
        width = max(len(name) for name, _ in self.rows)
        for index, (name, error) in enumerate(self.rows):
            over = "  <- over the tolerance" if not error <= self.tolerance else ""
            lines.append(f"  {index:>2}  {name:<{width}}  {format_error(error):>9}{over}")
        lines += [f"  ! {problem}" for problem in self.problems]
        if self.layers:
            made = f"; {len(self.unmatched)} made by pyrys, not compared" if self.unmatched else ""
            lines.append(f"worst layers of the {self.backend} program, against the captured values they compute "
                         f"({len(self.layers)} compared{made}):")
            for layer in self.layers[:int(layers)]:
                why = f"  ({layer.reason})" if layer.reason else ""
                lines.append(f"  {format_error(layer.error):>9}  {layer.describe()}{why}")
        return "\n".join(lines)


def format_tolerance(tolerance: float) -> str:
    """The shortest ``1e-04``, ``4.6e-03`` that reads back as ``tolerance`` (one digit hid 4.6e-03 as 5e-03, under
    which rows marked over it read), at most six digits."""
    for digits in range(6):
        text = f"{tolerance:.{digits}e}"
        if float(text) == tolerance:
            return text
    return f"{tolerance:.5e}"


def format_error(error: float) -> str:
    """``1.2e-07``; ``0``, ``inf`` and ``nan`` as themselves."""
    if error == 0:
        return "0"
    return "inf" if math.isinf(error) else ("nan" if math.isnan(error) else f"{error:.1e}")
