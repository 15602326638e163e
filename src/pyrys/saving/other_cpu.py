"""What a program saved on another CPU does here, in its notes: the kernels the saved decisions cannot get.

A saved program's precision decisions were taken for the CPU that compiled it: bf16 ops where it had
native bf16, 8-bit int8 weights where it had VNNI or AMX.  Loaded where oneDNN has no such kernel (an AVX2
Zen 3) those ops run through torch: right, but slower than float32 (a bf16 ResNet-18 saved on a Sapphire
Rapids ran 27x slower loaded on AVX2 than its float32 save).  The load says so (a note, and a warning
once per load), and the saved note naming the int8 kernels is replaced by this CPU's (left out where
those kernels are missing).
"""
from __future__ import annotations

import re
import warnings

from pyrys.quantization import SEVEN_BIT_WEIGHTS, int8_note

# the fallback reasons that depend on the CPU's kernels (lower_conv.py, lower_int8.py, ...)
_KERNEL_MISSING = re.compile(r"# fallback: (oneDNN has no implementation[^\n]*|weights in -\d+\.\.\d+: this CPU's "
                             r"int8 kernels take[^\n]*)")


MISSING_KERNELS = "loaded on a CPU without the kernels it was compiled for"  # how the note begins


def missing_kernels_note(program_text: str, saved_on: str) -> str:
    """A note where ops of a program saved on another CPU (``saved_on``: its ISA) run through torch here for
    want of a kernel, else ""."""
    reasons = _KERNEL_MISSING.findall(program_text)
    if not reasons:
        return ""
    return (f"{MISSING_KERNELS} (saved on one with {saved_on}): "
            f"{len(reasons)} op{'s' * (len(reasons) > 1)} run through torch here, slower than its float32 "
            f"program would (e.g. {reasons[0][:160]}); optimize the model again on this CPU")


def warn_of_missing_kernels(note: str) -> None:
    if note:
        warnings.warn(f"pyrys.load: {note}", RuntimeWarning, stacklevel=6)  # the caller of pyrys.load


def refreshed_notes(notes: list[str], missing: str) -> list[str]:
    """The saved notes on this CPU: the one naming the int8 kernels (``int8_note``) names this CPU's (and the
    7-bit weights of a save from a CPU without VNNI, which its kernels run as they are), or where
    kernels are missing (``missing``, the note saying so) is left out; ``missing`` is added."""
    fresh = [int8_note(SEVEN_BIT_WEIGHTS in note) if note.startswith("int8: ") else note for note in notes
             if not (missing and note.startswith("int8: "))]
    return fresh + [missing] * bool(missing)
