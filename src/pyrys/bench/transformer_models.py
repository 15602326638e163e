"""HuggingFace transformers to benchmark and check: BERT, DistilBERT, ViT, GPT-2, Whisper's encoder.

Each is built from its config (random weights, seeded: there is no download), wrapped so that it
takes tensors by position and returns one tensor, and carries ``example_inputs(batch)``:

    pyrys bench --models pyrys.bench.transformer_models:bert pyrys.bench.transformer_models:gpt2
    pyrys zoo hf_bert hf_gpt2

``transformers`` is an optional extra (``pip install pyrys[transformers]``); without it, building a
model raises an ImportError that says so.  ``small=True`` gives the same architecture at a width and
depth a test can afford.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

EXTRA = "pip install 'pyrys[transformers]' (or pip install transformers)"


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"this model needs HuggingFace transformers: {EXTRA}") from error
    return transformers


class Wrapped(nn.Module):
    """A transformers model called with tensors by position, giving one tensor (``output`` of its result)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], output: str,
                 inputs: Callable[[int], tuple[torch.Tensor, ...]]):
        super().__init__()
        self.model, self.names, self.output, self._inputs = model, names, output, inputs
        self.eval()

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.names, inputs))), self.output)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return self._inputs(batch_size)


def _tokens(vocabulary: int, length: int, with_mask: bool = True) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def inputs(batch: int) -> tuple[torch.Tensor, ...]:
        ids = torch.randint(0, vocabulary, (batch, length), generator=torch.Generator().manual_seed(length))
        return (ids, torch.ones(batch, length, dtype=torch.long)) if with_mask else (ids,)
    return inputs


def _images(size: int, channels: int = 3) -> Callable[[int], tuple[torch.Tensor]]:
    return lambda batch: (torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1)),)


def _config(name: str, small_size: dict, small: bool, **always):
    """``(transformers, config)``: the named config, at ``small_size`` when small; torch seeded for the weights."""
    t = _transformers()
    torch.manual_seed(0)
    return t, getattr(t, name)(**(small_size if small else {}), **always)


def _text_encoder(config_name: str, model_name: str, small_size: dict, small: bool) -> nn.Module:
    """An encoder over token ids and their mask (128 tokens; 16 when small) -> last hidden state."""
    t, config = _config(config_name, small_size, small)
    return Wrapped(getattr(t, model_name)(config), ("input_ids", "attention_mask"), "last_hidden_state",
                   _tokens(config.vocab_size, 16 if small else 128))


def bert(small: bool = False) -> nn.Module:
    """BertModel, BERT-base (12 layers, 768 wide), ids and mask of 128 tokens -> last hidden state."""
    return _text_encoder("BertConfig", "BertModel", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=128), small)


def distilbert(small: bool = False) -> nn.Module:
    """DistilBertModel (6 layers, 768 wide), ids and mask of 128 tokens -> last hidden state."""
    return _text_encoder("DistilBertConfig", "DistilBertModel", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                         small)


def vit(small: bool = False) -> nn.Module:
    """ViTModel, ViT-base/16 (12 layers, 768 wide) on a 224 x 224 image -> last hidden state."""
    t, config = _config("ViTConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, image_size=32, patch_size=8), small)
    return Wrapped(t.ViTModel(config), ("pixel_values",), "last_hidden_state", _images(config.image_size))


def gpt2(small: bool = False) -> nn.Module:
    """GPT2LMHeadModel, GPT-2 small (12 layers, 768 wide, causal), 64 token ids -> logits."""
    t, config = _config("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, bos_token_id=0,
                                           eos_token_id=0), small, use_cache=False)
    return Wrapped(t.GPT2LMHeadModel(config), ("input_ids",), "logits",
                   _tokens(config.vocab_size, 16 if small else 64, with_mask=False))


def whisper_encoder(small: bool = False) -> nn.Module:
    """Whisper's encoder (the default config: 4 layers, 256 wide) on 80 x 3000 log-mel features -> states."""
    _, config = _config("WhisperConfig", dict(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                                              encoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32), small)
    frames = 2 * config.max_source_positions
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    encoder = WhisperEncoder(config)

    def inputs(batch: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch, config.num_mel_bins, frames, generator=torch.Generator().manual_seed(1)),)

    return Wrapped(encoder, ("input_features",), "last_hidden_state", inputs)


def llama(small: bool = False) -> nn.Module:
    """LlamaModel, 12 layers 768 wide (12 query heads sharing 4 key-value heads; RoPE, RMSNorm, SwiGLU), ids
    and mask of 128 tokens -> last hidden state."""
    full = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=2048, vocab_size=32000)
    small_size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=1000)
    t, config = _config("LlamaConfig", small_size, small, use_cache=False, **({} if small else full))
    return Wrapped(t.LlamaModel(config), ("input_ids", "attention_mask"), "last_hidden_state",
                   _tokens(config.vocab_size, 16 if small else 128))


def t5_encoder(small: bool = False) -> nn.Module:
    """T5EncoderModel, T5-small's encoder (6 layers, 512 wide; relative position bias, RMSNorm), ids and mask of
    128 tokens -> last hidden state."""
    return _text_encoder("T5Config", "T5EncoderModel", dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                                            vocab_size=1000), small)


# zoo name -> factory
MODELS: dict[str, Callable[..., nn.Module]] = {
    "hf_bert": bert, "hf_distilbert": distilbert, "hf_vit": vit, "hf_gpt2": gpt2, "hf_whisper_encoder": whisper_encoder,
    "hf_llama": llama, "hf_t5_encoder": t5_encoder,
}
