"""Which inner-product kernel a float32 linear gets where oneDNN's own pick is not always the fastest.

On CPUs without AVX-512 oneDNN gives every float32 linear its brgemm kernel (weights packed ``AB8b24a``);
its gemm kernel (weights plain) is faster on some shapes and slower on others (Zen 3, 2 threads, ms,
brgemm / gemm: 197x3072->768 6.7 / 5.7, 197x768->3072 6.8 / 5.5, 128x768->3072 3.5 / 3.9; RESULTS.md).
There both are timed once per shape (without post-ops, on a buffer of constant bytes) and the faster
one's weight layout is offered first; the decision is kept in the tuning cache (``pyrys.tuning_cache``,
kind ``linear_kernel``) under the shape, the thread count and the CPU.  A linear whose weights are packed
already (another input shape) keeps that layout.
"""
from __future__ import annotations

import os
import time

import torch

from pyrys import tuning_cache
from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.constants import ARG_BIAS, ARG_DST, ARG_SRC, ARG_WEIGHTS
from pyrys.backends.dnnl.descriptors import inner_product_pd
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Primitive, PrimitiveAttr, Stream
from pyrys.backends.threads import current_threads
from pyrys.machine import cpu_flags

MIN_ROWS = 16  # fewer rows (a decoder step, a classifier head): not worth a measurement
FASTER = 0.95  # the gemm kernel is chosen when it takes at most this fraction of the brgemm kernel's time
RUNS = 5


def weight_layouts(engine: Engine, x_md: MemoryDesc, weight: torch.Tensor, dst_md: MemoryDesc,
                   bias_md: MemoryDesc | None, offered: list[MemoryDesc]) -> list[MemoryDesc]:
    """``offered`` (oneDNN's choice last), with the plain layout first where it is measured faster here."""
    rows = x_md.dims[0]
    if (rows < MIN_ROWS or weight.dtype != torch.float32 or len(offered) != 1 or "avx512f" in cpu_flags()
            or not {"avx2", "fma"} <= cpu_flags()):
        return offered
    plain = plain_md(weight.shape, weight.dtype)
    key = {"rows": rows, "weight": list(weight.shape), "bias": bias_md is not None, "threads": current_threads(),
           "isa": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}),
           "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA")),
           "onednn": binding.version()}
    cached = tuning_cache.lookup("linear_kernel", key)
    if cached is None:
        try:
            brgemm, gemm = (_seconds(engine, x_md, md, dst_md, bias_md) for md in (offered[0], plain))
        except DnnlError:
            return offered
        cached = {"layout": "plain" if gemm <= FASTER * brgemm else "any",
                  "measured": f"oneDNN's choice {brgemm * 1e3:.2f} ms, plain weights {gemm * 1e3:.2f} ms"}
        tuning_cache.store("linear_kernel", key, cached)
    return [plain, *offered] if cached.get("layout") == "plain" else offered


def _seconds(engine: Engine, x_md: MemoryDesc, w_md: MemoryDesc, dst_md: MemoryDesc,
             bias_md: MemoryDesc | None) -> float:
    """The best of :data:`RUNS` calls of the inner product with weights in ``w_md``, after one warm-up."""
    pd = inner_product_pd(engine, x_md, w_md, dst_md, bias_md, attr=PrimitiveAttr())
    args = {ARG_SRC: _filled(engine, pd.src_md()), ARG_WEIGHTS: _filled(engine, pd.weights_md()),
            ARG_DST: _filled(engine, pd.dst_md())}
    if bias_md is not None:
        args[ARG_BIAS] = _filled(engine, pd.weights_md(1))
    stream = Stream(engine)  # held here: the bound call keeps only its handle
    call = Primitive(pd).bind(stream, args)
    call.run()
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        call.run()
        best = min(best, time.perf_counter() - start)
    return best


def _filled(engine: Engine, md: MemoryDesc) -> Memory:
    """A memory of ``md`` over bytes 0x3c (0.0115 as float32: no NaN, no denormal slowing a kernel down)."""
    data = torch.full((md.size(),), 0x3C, dtype=torch.uint8)
    return Memory(engine, md, data.data_ptr(), keepalive=data)
