"""GPT-2 with and without simplify's ``activation_from_formula`` rule (its ``gelu_new`` spelled out, or
fused into the linear before it as ``gelu_tanh``), interleaved in one process.

Needs ``transformers``. The model is built from its config (random weights); the rule is taken out of
``SIMPLIFY_RULES`` for the second compile only.  Reported: the median of ``--rounds`` blocks of 5 calls each.

    python benchmarks/activation_formulas_ab.py --head body --rounds 31
    python benchmarks/activation_formulas_ab.py --head lm --rounds 15
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pyrys
import pyrys.passes.simplify as simplify


class Logits(torch.nn.Module):
    def __init__(self, model, head: str):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, ids):
        out = self.model(input_ids=ids, use_cache=False)
        return out.logits if self.head == "lm" else out.last_hidden_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", choices=["body", "lm"], default="body")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_positions=max(128, args.tokens))
    model = Logits((GPT2LMHeadModel if args.head == "lm" else GPT2Model)(config).eval(), args.head).eval()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    with_rule = pyrys.optimize(model, (ids,), layout="nhwc")
    rules = simplify.SIMPLIFY_RULES
    simplify.SIMPLIFY_RULES = tuple(r for r in rules if r.name != "activation_from_formula")
    try:
        without = pyrys.optimize(model, (ids,), layout="nhwc")
    finally:
        simplify.SIMPLIFY_RULES = rules
    times: dict[str, list[float]] = {"with": [], "without": []}
    pair = [("with", with_rule), ("without", without)]
    with torch.no_grad():
        for _, module in pair:
            module(ids), module(ids)
        for round_index in range(args.rounds):
            for name, module in pair if round_index % 2 == 0 else pair[::-1]:
                start = time.perf_counter()
                for _ in range(5):
                    module(ids)
                times[name].append((time.perf_counter() - start) / 5 * 1e3)
    a, b = statistics.median(times["with"]), statistics.median(times["without"])
    print(f"GPT-2 {args.head}, {args.layers} layers x 768, 1x{args.tokens}: with the rule {a:.2f} ms, "
          f"without {b:.2f} ms, ratio {a / b:.3f} ({with_rule.graph.count('gelu_tanh')} gelu_tanh)")


if __name__ == "__main__":
    main()
