"""Which kernel an attention runs: oneDNN's three steps (``lower_attention.py``) or torch's fused one.

torch's CPU ``scaled_dot_product_attention`` is a flash-attention kernel: a block of queries against a
block of keys at a time, softmax folded into a running sum, the scores never written out.  oneDNN 3.2 has
no such primitive; its three steps write the scores and read them back, which over long sequences costs
more than it saves, while over short ones torch's per-call work and a mask it reads cost more.  The
attention steps alone, Sapphire Rapids (AMX), 2 threads, ms, oneDNN / torch (each with its copies):

    shape (batch, heads, tokens, width)   bfloat16         float32
    1, 6, 1500, 64 (Whisper's encoder)    20.5 / 6.5       21.3 / 17.1
    1, 16, 512, 64                         6.4 / 2.1        6.5 / 6.2
    8, 12, 197, 64 (ViT-base, batch 8)     8.5 / 4.1        7.1 / 7.7
    1, 12, 197, 64 (ViT-base)              0.71 / 0.40      0.68 / 0.90

yet whole models in bfloat16 ran ViT-base 43.9 ms with oneDNN's and 55.3 with torch's (as a fallback then:
its mask, and copies before and after), Whisper's encoder 71.8 and 50.3.  So, like
``linear_kernels.py``, both are timed once per signature (the shapes, dtypes, mask and layouts, the thread
count, the CPU), oneDNN's on buffers of constant bytes, torch's on random ones with the copy of its
result, and torch's runs where it takes at most :data:`FASTER` of oneDNN's time; the choice is kept
(``measured.py``: kind ``attention_kernel``) and saved with the program.  Only attention whose scores take more than
:data:`TIMED_SCORES_BYTES` is timed: below it (BERT, DistilBERT and ViT at batch 1) the timing chose
oneDNN's on every model tried, as the whole models did (bf16 ViT-base 43.2 ms against 48.2 with torch's,
DistilBERT 15.7 against 16.7), and a choice between steps of a few hundred microseconds rests on noise.
"""
from __future__ import annotations

from typing import Callable

import torch

from pyrys.backends.dnnl.measured import best_seconds, decide, filled_memory, machine_key
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Stream
from pyrys.backends.dnnl.program import Step

FASTER = 0.9  # torch's kernel runs where it takes at most this fraction of oneDNN's steps' time
TIMED_SCORES_BYTES = 8 << 20  # attention whose float32 scores take less is not timed: oneDNN's steps run
RUNS = 5  # calls of each, interleaved (fewer where they are long: ``measured.best_seconds``); the best counts
FIELDS = {"kernel": str, "measured": str}  # what a choice holds (:func:`measured.decide`)


def choose(engine: Engine, signature: dict, steps: list[Step],
           torch_call: Callable[[], object]) -> tuple[str, dict | None]:
    """``(memo, choice)`` for one attention signature, the choice ``{"kernel": "torch" | "onednn", "measured":
    text}`` and the memo it is remembered under (``measured.py``): timing ``steps`` (oneDNN's, each run alone
    on constant bytes) against ``torch_call`` where no choice is known (None: a load whose save has none)."""
    def measure() -> dict:
        onednn, by_torch = best_seconds([_steps_call(engine, steps), torch_call], RUNS)
        return {"kernel": "torch" if by_torch <= FASTER * onednn else "onednn",
                "measured": f"oneDNN's steps {onednn * 1e3:.3f} ms, torch's kernel {by_torch * 1e3:.3f} ms"}

    key = {**signature, "runs": RUNS, "faster": FASTER, **machine_key(torch.get_num_threads())}
    return decide("attention_kernel", key, measure, FIELDS)


def _steps_call(engine: Engine, steps: list[Step]) -> Callable[[], None]:
    """One call running every step's primitive in turn, each argument a buffer of constant bytes (one per
    distinct descriptor, as the steps share their buffers)."""
    stream, memories, calls = Stream(engine), [], []
    for step in steps:
        primitive, mds = step.primitive
        args = {arg: _memory(engine, md, memories) for arg, md in mds.items()}
        calls.append(primitive.bind(stream, args).run)

    def run() -> None:
        for call in calls:
            call()

    run.keepalive = (stream, memories)  # the bound calls hold handles only
    return run


def _memory(engine: Engine, md: MemoryDesc, made: list[tuple[MemoryDesc, Memory]]) -> Memory:
    """:func:`measured.filled_memory` of ``md``, made once per descriptor."""
    for known, memory in made:
        if known == md:
            return memory
    made.append((md, filled_memory(engine, md)))
    return made[-1][1]
