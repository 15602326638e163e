"""int8 at sequence lengths other than the calibration samples'.

Two models over token ids, mean-pooled over the tokens: a 2-layer BERT (random weights, hidden 128), and an
embedding, a linear and ReLU, the mean, a head (a helper's fuzz model: the mean over few tokens is wider than
over many). Each is optimized with ``dynamic=True`` and ``precision="int8"``, calibrated on 24 samples of 32
tokens alone, or on 24 samples of 4 to 128 tokens (read as they are); then called at lengths 1 to 128, and
the error against eager float32 (max relative, over 4 inputs per length) is printed with what ``opt.notes``
says of unmeasured sizes:

    python benchmarks/int8_lengths.py
"""
from __future__ import annotations

import warnings

import torch
from transformers import BertConfig, BertModel

import pyrys

LENGTHS = (1, 4, 16, 32, 128)


class Pooled(torch.nn.Module):
    """BERT's last hidden state averaged over the tokens its mask keeps."""

    def __init__(self):
        super().__init__()
        self.bert = BertModel(BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=512, vocab_size=1000))

    def forward(self, ids, mask):
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        kept = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * kept).sum(1) / kept.sum(1)


class TokenMean(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding, self.mix, self.head = torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 64), torch.nn.Linear(64, 5)

    def forward(self, ids, mask):
        return self.head(torch.relu(self.mix(self.embedding(ids))).mean(1))


def sample(length: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 1000, (batch, length)), torch.ones(batch, length, dtype=torch.long)


def main() -> None:
    warnings.simplefilter("ignore")
    for make in (Pooled, TokenMean):
        torch.manual_seed(0)
        model = make().eval()
        example = sample(32)
        sets = {"32 tokens alone": [sample(32) for _ in range(24)],
                "4 to 128 tokens": [sample(length) for length in (4, 8, 16, 32, 64, 128) * 4]}
        for label, calibration in sets.items():
            opt = pyrys.optimize(model, example, precision="int8", calibration=calibration, dynamic=True)
            errors = []
            with torch.no_grad():
                for length in LENGTHS:
                    inputs = [sample(length) for _ in range(4)]
                    errors.append(max(pyrys.relative_error(opt(*x), model(*x)) for x in inputs))
            said = [note for note in opt.notes if "outside the calibration samples" in note]
            print(f"{make.__name__}, calibrated on {label}: "
                  + ", ".join(f"{n}: {e:.1e}" for n, e in zip(LENGTHS, errors))
                  + (f"; note: {said[0][:110]}..." if said else "; no note of unmeasured sizes"))


if __name__ == "__main__":
    main()
