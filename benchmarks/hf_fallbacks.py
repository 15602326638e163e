"""What of a HuggingFace transformer still runs in torch, and how close pyrys is to eager, per model family.

Small configs (hidden 64, 2 layers, 4 heads, random weights), fp32 and bf16: the relative error against eager,
the number of oneDNN matmul steps, and the torch steps left in the program by op (a fallback is where a model
family still leaves oneDNN).  Needs the ``transformers`` extra.

    python benchmarks/hf_fallbacks.py                   # every family below
    python benchmarks/hf_fallbacks.py llama t5_encoder
"""
from __future__ import annotations

import argparse
import collections
import warnings

import torch

import pyrys


def _ids(batch: int = 2, length: int = 12, vocabulary: int = 100) -> torch.Tensor:
    return torch.randint(0, vocabulary, (batch, length), generator=torch.Generator().manual_seed(0))


def _families():
    import transformers as t

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return {
        "llama": lambda: (t.LlamaModel(t.LlamaConfig(vocab_size=100, num_key_value_heads=2, **small)), (_ids(),)),
        "qwen2": lambda: (t.Qwen2Model(t.Qwen2Config(vocab_size=100, num_key_value_heads=2, **small)), (_ids(),)),
        "t5_encoder": lambda: (t.T5EncoderModel(t.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128,
                                                           num_layers=2, num_heads=4)), (_ids(),)),
        "bart": lambda: (t.BartModel(t.BartConfig(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2,
                                                  encoder_attention_heads=4, decoder_attention_heads=4,
                                                  encoder_ffn_dim=128, decoder_ffn_dim=128)), (_ids(),)),
        "roberta": lambda: (t.RobertaModel(t.RobertaConfig(vocab_size=100, **small)), (_ids(),)),
        "albert": lambda: (t.AlbertModel(t.AlbertConfig(vocab_size=100, embedding_size=32, **small)), (_ids(),)),
        "deberta_v2": lambda: (t.DebertaV2Model(t.DebertaV2Config(vocab_size=100, **small)), (_ids(),)),
        "clip_vision": lambda: (t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **small)),
                                (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)),
        "mobilebert": lambda: (t.MobileBertModel(t.MobileBertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32)), (_ids(),)),
    }


class LastHiddenState(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs).last_hidden_state


def main() -> None:
    families = _families()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"families (default: all): {', '.join(families)}")
    names = parser.parse_args().names or list(families)
    unknown = sorted(set(names) - set(families))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(families)}")
    warnings.filterwarnings("ignore")
    for name in names:
        torch.manual_seed(0)
        model, inputs = families[name]()
        wrapped = LastHiddenState(model).eval()
        with torch.no_grad():
            expected = wrapped(*inputs)
        for precision in ("fp32", "bf16"):
            opt = pyrys.optimize(wrapped, inputs, precision=precision)
            lines = opt.program_text().splitlines()
            torch_steps = collections.Counter(line.split("= torch::")[1].split("(")[0] for line in lines
                                              if "= torch::" in line)
            matmuls = sum("dnnl::matmul" in line for line in lines)
            error = pyrys.relative_error(opt(*inputs), expected)
            print(f"{name:12s} {precision}  error {error:.1e}  oneDNN matmul steps {matmuls:2d}  "
                  f"torch steps {dict(torch_steps)}", flush=True)


if __name__ == "__main__":
    main()
