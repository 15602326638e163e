"""RSS growth of ``pyrys.optimize`` + first call, against the model's weight bytes, and ``opt.memory()``.

Each model and layout runs in fresh processes (RSS only grows within one), with the tuning cache off:

* *cold*: the first optimized model of a process pays for the libraries pyrys loads (torch.export,
  oneDNN), the capture and the program;
* *warm*: a small model is optimized first, so the growth is what one more model costs a server;
* *left after del*: what stays in the process once the module is dropped (caches and allocator
  pages the capture grew, not held by the module).

    python benchmarks/memory.py --models resnet50 pyrys.bench.models:bert_base --layouts auto
"""
from __future__ import annotations

import argparse

from pyrys.bench.measure import in_fresh_process

CHILD = """
import gc, json, sys, torch, pyrys
from pyrys.bench.measure import current_rss_bytes as rss
from pyrys.bench.models import build_model, example_inputs, tiny_convnet
from pyrys.machine import give_back_freed_memory
name, layout, warm = sys.argv[1], sys.argv[2], sys.argv[3] == "warm"
def settled():
    gc.collect()
    give_back_freed_memory()
    return rss()
if warm:
    tiny = tiny_convnet().eval()
    with torch.no_grad():
        pyrys.optimize(tiny, tiny.example_inputs(1), layout=layout)(*tiny.example_inputs(1))
    del tiny
model = build_model(name)
inputs = example_inputs(name, 1, model)
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
before = settled()
with torch.no_grad():
    opt = pyrys.optimize(model, inputs, layout=layout)
    opt(*inputs)
growth, memory = settled() - before, opt.memory()
del opt
print(json.dumps({"weights": weights, "growth": growth, "left": settled() - before, "memory": memory}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "pyrys.bench.models:bert_base"])
    parser.add_argument("--layouts", nargs="+", default=["auto"])
    args = parser.parse_args()
    from pyrys.machine import cpu_info

    print(f"# {cpu_info()[0]} ({'/'.join(cpu_info()[1])})")
    print("| model | layout | weights MiB | cold: growth MiB | / weights | warm: growth MiB | / weights | "
          "left after del MiB | opt.memory() MiB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in args.models:
        for layout in args.layouts:
            cold, warm = (in_fresh_process(CHILD, name, layout, mode) for mode in ("cold", "warm"))
            weights = cold["weights"]
            mib = {key: round(value / 2**20, 1) for key, value in warm["memory"].items()}
            print(f"| {name.split(':')[-1]} | {layout} | {weights / 2**20:.1f} | {cold['growth'] / 2**20:.0f} | "
                  f"{cold['growth'] / weights:.2f} | {warm['growth'] / 2**20:.0f} | {warm['growth'] / weights:.2f} | "
                  f"{warm['left'] / 2**20:.0f} | {mib} |")


if __name__ == "__main__":
    main()
