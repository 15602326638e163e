"""Which inner-product kernel a float32 linear gets where oneDNN's own pick is not always the fastest.

On CPUs without AVX-512 oneDNN gives every float32 linear its brgemm kernel (weights packed ``AB8b24a``);
its gemm kernel (weights plain) is faster on some shapes and slower on others (Zen 3, 2 threads, ms,
brgemm / gemm: 197x3072->768 6.7 / 5.7, 197x768->3072 6.9 / 6.5, 128x768->3072 3.6 / 3.8; RESULTS.md).
There both are timed once per shape (without post-ops, on a buffer of constant bytes) and the faster
one's weight layout is offered first; the decision is kept in the tuning cache (``pyrys.tuning_cache``,
kind ``linear_kernel``) under the shape, the thread count and the CPU.  A weight packed already (for
another input shape or thread count) keeps its layout: it is packed once.
"""
from __future__ import annotations

import torch

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.descriptors import inner_product_pd
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.measured import decide, inner_product_seconds, machine_key
from pyrys.backends.dnnl.primitives import Engine, MemoryDesc, PrimitiveAttr
from pyrys.machine import kernel_flags

MIN_ROWS = 16  # fewer rows (a decoder step, a classifier head): not worth a measurement
MAX_WEIGHT = 1 << 23  # larger weights (a vocabulary projection) are not measured: a copy of it per kernel timed
FASTER = 0.95  # the gemm kernel is chosen when it takes at most this fraction of the brgemm kernel's time
RUNS = 7  # calls of each kernel, interleaved (fewer where they are long: ``measured.best_seconds``); the best counts
FIELDS = {"layout": str, "measured": str}  # what a choice holds (:func:`measured.decide`)


def weight_layouts(engine: Engine, x_md: MemoryDesc, weight: torch.Tensor, dst_md: MemoryDesc,
                   bias_md: MemoryDesc | None, offered: list[MemoryDesc], held: list[MemoryDesc],
                   choices: dict | None = None) -> list[MemoryDesc]:
    """``offered`` (oneDNN's choice last), with the plain layout first where it is measured faster here (the
    choice noted in ``choices``, by its memo: saved with the program);
    ``held``: the layouts the weight is packed in already (another shape, another thread count), offered
    first and nothing measured, so that a weight is packed once."""
    if weight.dtype != torch.float32 or "avx512f" in kernel_flags() or not {"avx2", "fma"} <= kernel_flags():
        return offered
    if held:
        return [*held, *(md for md in offered if md not in held)]
    rows = x_md.dims[0]
    if rows < MIN_ROWS or weight.numel() > MAX_WEIGHT or len(offered) != 1:
        return offered
    plain = plain_md(weight.shape, weight.dtype)
    key = {"rows": rows, "weight": list(weight.shape), "bias": bias_md is not None, "runs": RUNS, "faster": FASTER,
           **machine_key(torch.get_num_threads())}  # the thread count the program runs with (set for the build)

    def measure() -> dict | None:
        try:
            brgemm, gemm = _seconds(engine, x_md, (offered[0], plain), dst_md, bias_md)
        except DnnlError:
            return None
        return {"layout": "plain" if gemm <= FASTER * brgemm else "any",
                "measured": f"oneDNN's choice {brgemm * 1e3:.3f} ms, plain weights {gemm * 1e3:.3f} ms"}

    memo, choice = decide("linear_kernel", key, measure, FIELDS)
    if choice is not None and choices is not None:
        choices[memo] = choice
    return [plain, *offered] if choice is not None and choice.get("layout") == "plain" else offered


def _seconds(engine: Engine, x_md: MemoryDesc, w_mds: tuple[MemoryDesc, ...], dst_md: MemoryDesc,
             bias_md: MemoryDesc | None) -> list[float]:
    """For each weight layout of ``w_mds``, the best of up to :data:`RUNS` calls of the inner product
    (:func:`measured.inner_product_seconds`)."""
    return inner_product_seconds(engine, [(inner_product_pd(engine, x_md, w_md, dst_md, bias_md, attr=PrimitiveAttr()),
                                           bias_md is not None, {}) for w_md in w_mds], RUNS)
