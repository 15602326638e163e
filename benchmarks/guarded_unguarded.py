"""pyrys bf16 or int8 with the default accuracy guard and with ``accuracy_budget=None`` against OpenVINO's,
interleaved blocks in one process, with each one's error against float32 eager.

    python benchmarks/guarded_unguarded.py MODEL PRECISION BUDGETS [BATCH] [ROUNDS]
    python benchmarks/guarded_unguarded.py regnet_y_800mf bf16 auto,None 1 5

``BUDGETS``: comma-separated, ``auto`` (the default) or a Python value for ``accuracy_budget`` (``None``,
``1e-2``).  The models are the bench's (``pyrys.bench.models``), OpenVINO's systems the bench's peers.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

import pyrys
import pyrys.bench.peers as peers
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import calibration_data


def block(runner, inputs, calls: int = 60) -> float:
    """The median ms of ``calls`` calls after 3 warm ones."""
    for _ in range(3):
        runner(*inputs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner(*inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def error(runner, inputs, reference) -> float:
    y = runner(*inputs)
    y = torch.as_tensor(y[0] if isinstance(y, (list, tuple)) else y)
    return pyrys.relative_error(y.float(), reference)


def main() -> None:
    torch.set_num_threads(2)
    name, precision, budgets = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    rounds = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    model = build_model(name).eval()
    inputs = example_inputs(name, batch, model)
    reference = model(*inputs)
    openvino = {p.name: p for p in peers.default_peers(2)}[f"openvino-{precision}"].prepare(model, inputs)
    calibration = calibration_data(inputs) if precision == "int8" else None
    runners = {}
    for budget in budgets:
        chosen = {} if budget == "auto" else {"accuracy_budget": eval(budget)}  # noqa: S307 (a number or None)
        start = time.perf_counter()
        runners[budget] = pyrys.optimize(model, example_inputs=inputs, precision=precision,
                                         calibration=calibration, **chosen)
        runners[budget](*inputs)
        print(f"budget {budget}: compile {time.perf_counter() - start:.1f} s", flush=True)
    runners["ov"] = openvino
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, runner in runners.items():
            times[key].append(block(runner, inputs))
    ov = statistics.median(times["ov"])
    for key, runner in runners.items():
        median = statistics.median(times[key])
        print(f"{name} {precision} b{batch} {key:8s} {median:8.3f} ms  x OV {median / ov:.2f}  "
              f"err {error(runner, inputs, reference):.1e}  rounds {[round(v, 2) for v in times[key]]}")


if __name__ == "__main__":
    main()
