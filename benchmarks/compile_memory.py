"""Where a compile's memory goes: resident memory (RSS) sampled every 20 ms during ``optimize`` + first call
of a bench model (a small model compiled first: loading the libraries is not counted), with the pyrys frames
the main thread was in, printed where it moved by more than ``--step`` MiB; the peak first.

    python benchmarks/compile_memory.py efficientnet_b0 --precision int8 --batch 16
    python benchmarks/compile_memory.py hf_bert --precision int8 --step 100

int8 calibrates on ``pyrys.bench.peers.calibration_data`` of the example (what ``pyrys bench`` gives every
int8 system), with the default accuracy guard.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback

import torch

import pyrys
from pyrys.bench.measure import current_rss_bytes
from pyrys.bench.models import build_model, example_inputs, tiny_convnet
from pyrys.bench.peers import calibration_data

MIB = 1 << 20


def pyrys_frames(thread_id: int, depth: int = 3) -> str:
    """The innermost ``depth`` pyrys frames a thread is in, outermost first."""
    frame = sys._current_frames().get(thread_id)
    stack = traceback.extract_stack(frame) if frame is not None else []
    names = [f"{entry.filename.split('pyrys/')[-1]}:{entry.name}" for entry in stack if "/pyrys/" in entry.filename]
    return " > ".join(names[-depth:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--step", type=float, default=50.0, help="print where RSS moved by this many MiB")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = tiny_convnet().eval()  # the libraries loaded (and their first allocations made) before measuring
    pyrys.optimize(tiny, tiny.example_inputs(1))(*tiny.example_inputs(1))
    model = build_model(args.model).eval()
    inputs = example_inputs(args.model, args.batch, model)
    options = {"precision": args.precision}
    if args.precision == "int8":
        options["calibration"] = calibration_data(inputs)
    main_thread, samples, done = threading.main_thread().ident, [], threading.Event()
    before = current_rss_bytes()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), current_rss_bytes() - before, pyrys_frames(main_thread)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    pyrys.optimize(model, inputs, **options)(*inputs)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / MIB
    at, peak, where = max(samples, key=lambda s: s[1])
    print(f"{args.model} {args.precision} batch {args.batch}: compile {seconds:.1f} s, weights {weights:.0f} MiB, "
          f"peak RSS growth {peak / MIB:.0f} MiB at {at - start:.1f} s in {where}, after {samples[-1][1] / MIB:.0f}")
    shown = 0.0
    for at, grown, where in samples:
        if abs(grown - shown) >= args.step * MIB:
            print(f"{at - start:7.1f} s {grown / MIB:8.0f} MiB  {where}")
            shown = grown


if __name__ == "__main__":
    main()
