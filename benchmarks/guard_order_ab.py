"""The accuracy guard's order, A/B in one process: by each op's first-order effect on the outputs (now) against by
its own error (before; `Sensitivity.order` patched back).  Usage: `python benchmarks/guard_order_ab.py googlenet int8 0.008 160`
(model, precision, accuracy_budget, image size): ops kept, compile seconds, median latency, error on 8 held-out images."""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import pyrys
from pyrys.numerics import sensitivity as S
from pyrys.testing import torchvision_model

warnings.simplefilter("ignore")
torch.manual_seed(0)
torch.set_num_threads(2)
name, precision, budget, size = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
m = torchvision_model(name)
g = torch.Generator().manual_seed(1)
x = torch.randn(1, 3, size, size, generator=g)
cal = [(torch.randn(1, 3, size, size, generator=g),) for _ in range(8)]
held = [torch.randn(1, 3, size, size, generator=g) for _ in range(8)]
kw = dict(calibration=cal) if precision == "int8" else {}
new_order = S.Sensitivity.order


def own_order(self):
    return sorted(self.own, key=self.own.__getitem__, reverse=True)


opts, compile_s = {}, {}
for label, order in (("effect", new_order), ("own", own_order)):
    S.Sensitivity.order = order
    t = time.perf_counter()
    opts[label] = pyrys.optimize(m, x, precision=precision, accuracy_budget=budget, **kw)
    opts[label](x)
    compile_s[label] = time.perf_counter() - t
S.Sensitivity.order = new_order
times = {k: [] for k in opts}
with torch.no_grad():
    for r in range(7):
        for k, opt in opts.items():
            for _ in range(3): opt(x)
            t = time.perf_counter()
            for _ in range(20): opt(x)
            times[k].append((time.perf_counter() - t) / 20 * 1e3)
    for k, opt in opts.items():
        kept = sum("accuracy guard" in mi.reason for mi in opt.misses)
        err = max(pyrys.relative_error(opt(h), m(h)) for h in held)
        note = [n for n in opt.notes if "within" in n][0]
        print(f"{name} {precision} budget={budget} order={k}: kept {kept}, compile {compile_s[k]:.1f} s, "
              f"median {statistics.median(times[k]):.2f} ms, held-out max error {err:.1e}; note: {note[:90]}")
print(f"latency effect/own: {statistics.median(times['effect']) / statistics.median(times['own']):.2f}")
