"""HuggingFace transformers (small configs of the zoo's seven families) on the dnnl backend against eager:
attention in oneDNN, no torch fallback inside a layer.  They skip without the ``transformers`` extra."""
import importlib
import re

import pytest
import torch

import pyrys
from pyrys import zoo
from pyrys.backends.dnnl import binding
from pyrys.bench.transformer_models import EXTRA, MODELS
from pyrys.machine import native_bf16
from pyrys.passes import quantize as quantize_pass
from tests.conftest import TOLERANCE

pytest.importorskip("transformers", reason=f"needs HuggingFace transformers: {EXTRA}")
available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")

# what may still run through torch: the embeddings' gather, the mask's construction from the ids' mask (T5's
# applied to its position bias by a ``where``, once for every layer)
OUTSIDE_LAYERS = {"torch::embedding", "torch::_to_copy", "torch::index", "torch::__and__", "torch::expand",
                  "torch::where"}


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_matches_eager_with_attention_in_onednn(name):
    model = MODELS[name](small=True)
    inputs = model.example_inputs(2)
    opt = pyrys.optimize(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    assert pyrys.relative_error(opt(*inputs), expected) <= TOLERANCE
    text = opt.program_text()
    assert "dnnl::softmax" in text and "torch::scaled_dot_product_attention" not in text, text
    fallbacks = {line.split("= ", 1)[1].split("(")[0] for line in text.splitlines() if "# fallback" in line}
    assert fallbacks <= OUTSIDE_LAYERS, text


def test_new_sequence_lengths_and_batches_reuse_the_capture():
    model = MODELS["hf_bert"](small=True)
    ids, mask = model.example_inputs(1)
    opt = pyrys.optimize(model, (ids, mask))
    shorter = (ids[:, :9], mask[:, :9].clone())
    shorter[1][:, 6:] = 0  # padding: queries still see the first six keys
    with torch.no_grad():
        expected = model(*shorter)
    assert pyrys.relative_error(opt(*shorter), expected) <= TOLERANCE
    two = model.example_inputs(2)
    with torch.no_grad():
        expected = model(*two)
    assert pyrys.relative_error(opt(*two), expected) <= TOLERANCE
    assert not any("again" in note for note in opt.notes), opt.notes  # one symbolic capture serves both


def test_the_zoo_lists_and_builds_the_transformers():
    assert set(MODELS) <= set(zoo.MODELS)
    row = zoo.run_model("hf_distilbert", "dnnl", MODELS["hf_distilbert"](small=True))
    assert row.passed, row


class _Encoder(torch.nn.Module):
    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model.eval(), names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).last_hidden_state


def _t5_encoder():
    import transformers as t
    torch.manual_seed(0)
    config = t.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    return _Encoder(t.T5EncoderModel(config), ("input_ids", "attention_mask")), (ids, mask)


def _swin():
    import transformers as t
    torch.manual_seed(0)
    config = t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
    return _Encoder(t.SwinModel(config), ("pixel_values",)), (torch.randn(1, 3, 32, 32),)


def _segformer():
    """Its first stage has one head, and its keys and values are one projection's two halves."""
    import transformers as t
    torch.manual_seed(0)
    config = t.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                               num_attention_heads=[1, 2], decoder_hidden_size=32, patch_sizes=[7, 3], strides=[4, 2])
    return _Encoder(t.SegformerModel(config), ("pixel_values",)), (torch.randn(1, 3, 32, 32),)


@pytest.mark.parametrize("make", [_t5_encoder, _swin, _segformer], ids=["t5_encoder", "swin", "segformer"])
@pytest.mark.parametrize("backend", ["reference", "dnnl"])
def test_more_families_match_eager(make, backend):
    """T5's and Swin's exported graphs view attention's output where its strides came from torch's flash
    kernel (a view the math kernel's strides refuse); SegFormer's one-head attention at batch 1 read its
    keys from the wrong columns."""
    model, inputs = make()
    opt = pyrys.optimize(model, inputs, backend=backend)
    with torch.no_grad():
        expected = model(*inputs)
    assert pyrys.relative_error(opt(*inputs), expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["hf_bert", "hf_gpt2", "hf_vit"])
def test_traced_transformers_through_torchscript(name):
    """``torch.jit.trace`` of an HF model: sizes made tensors (``prim::NumToTensor``), ``.contiguous()`` with
    its memory format as a number."""
    import warnings

    model = MODELS[name](small=True)
    inputs = model.example_inputs(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, inputs, strict=False)
    opt = pyrys.optimize(traced, inputs)
    with torch.no_grad():
        expected = model(*inputs)
    assert pyrys.relative_error(opt(*inputs), expected) <= TOLERANCE


def _int8_layers(opt) -> list[int]:
    return [sum(step.fired.get("int8", 0) for step in c.run.history) for c in opt._programs.values()]


def test_int8_captures_that_compute_values_otherwise_are_calibrated_on_their_own():
    """BERT's static capture folds its position embeddings into a constant, the symbolic one computes them:
    the first plan's scales do not name the symbolic graph's values, so that graph is calibrated on its own
    (on the samples kept), and says so; where no sample is kept its layers fall back, with a note."""
    model = MODELS["hf_bert"](small=True)
    calibration = [model.example_inputs(2) for _ in range(3)]
    opt = pyrys.optimize(model, model.example_inputs(2), precision="int8", calibration=calibration)
    inputs = model.example_inputs(1)
    with torch.no_grad():
        expected = model(*inputs)
    assert pyrys.relative_error(opt(*inputs), expected) <= 5e-2  # within int8's tolerance
    assert any("so it is calibrated on its own, on 3 of the calibration samples" in note
               for note in opt.notes), opt.notes  # the symbolic graph takes them as they are
    assert _int8_layers(opt) == [8, 8], _int8_layers(opt)
    opt = pyrys.optimize(model, model.example_inputs(2), precision="int8", calibration=calibration)
    opt._config.calibration.kept = []  # nothing to calibrate another graph on
    opt(*model.example_inputs(1))
    assert any("int8 layers in int8, the rest in floating point (their inputs are computed otherwise" in note
               for note in opt.notes), opt.notes


def test_int8_dynamic_true_keeps_every_shape_in_int8_batch_and_length_one_too():
    """``dynamic=True`` calibrates the symbolic graph itself; GPT-2's excludes a batch of 1 and a length of 1
    (a decode step), whose captures fold constants and are calibrated on the samples cut to their size-1 dims:
    every shape runs all its linears in int8."""
    model = MODELS["hf_gpt2"](small=True)
    calibration = [model.example_inputs(2) for _ in range(3)]
    opt = pyrys.optimize(model, model.example_inputs(2), precision="int8", calibration=calibration, dynamic=True)
    for batch, length in ((1, None), (3, None), (2, 1), (1, 1)):
        inputs = tuple(t[:, :length].contiguous() for t in model.example_inputs(batch))
        with torch.no_grad():
            expected = model(*inputs)
        assert pyrys.relative_error(opt(*inputs), expected) <= 5e-2  # within int8's tolerance
    assert not any("the rest in floating point" in note for note in opt.notes), opt.notes
    layers = _int8_layers(opt)
    assert len(layers) == 5 and len(set(layers)) == 1 and layers[0] > 0, layers  # every shape's program alike


@pytest.mark.parametrize("backend", ["reference", "dnnl"])
def test_int8_runs_attention_in_bf16_where_the_cpu_has_it(backend, monkeypatch):
    """With native bf16 (forced on the reference backend, which runs bf16 anywhere) the int8 model's attention
    runs in bf16: the merged QKV projection's result is converted once, where it is made (the int8 kernel
    writes bf16 itself on the dnnl backend), its heads' views are bf16, and the outputs stay within int8's
    tolerance."""
    if backend == "dnnl" and not native_bf16():
        pytest.skip("this CPU has no native bf16: int8 models keep attention in float32")
    monkeypatch.setattr(quantize_pass, "keeps_in_bf16", lambda: True)
    model = MODELS["hf_bert"](small=True)
    inputs = model.example_inputs(2)
    calibration = [model.example_inputs(2) for _ in range(3)]
    opt = pyrys.optimize(model, inputs, precision="int8", calibration=calibration, backend=backend)
    with torch.no_grad():
        expected = model(*inputs)
    assert pyrys.relative_error(opt(*inputs), expected) <= 5e-2
    (quantized,) = [step.fired for step in opt.history if step.name == "quantize"]
    assert quantized["int8"] == 8 and quantized["bf16"] > 2  # every linear in int8; the attention and its views
    graph = opt.graph
    assert re.search(r"%merged_linear_bf16 : BFloat16\(2, 16, 192\) = aten::to\(%merged_linear, torch.bfloat16\)", graph)
    assert re.search(r"%scaled_dot_product_attention : BFloat16\(2, 4, 16, 16\) = aten::scaled_dot_product_attention\("
                     r"%\w+, %\w+, %\w+", graph)
    assert any("ops run in bf16, not float32" in note for note in opt.notes), opt.notes
    if backend == "dnnl":
        text = opt.program_text()
        assert re.search(r"%merged_linear : .*int8=\[src=s8, weights=s8, dst=bf16\]", text), text
        assert "merged_linear_bf16" not in text  # the conversion is the kernel's own
        # the attention's bf16 result is quantized for the output projection as it is, not converted first
        quantized = re.findall(r"%\w+_q : Char\(.*= dnnl::binary_mul\[.*\]\(%(\w+)\)", text)
        assert quantized and not any(source.endswith("_f32") for source in quantized), text


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16: precision='bf16' runs float32, no guard")
def test_the_bf16_guard_measures_a_symbolic_graph_without_pinning_its_sizes():
    """The accuracy guard lowers trial copies of the graph; their shape propagation adds no guard to the
    symbolic graph's sizes (it did: ``Ne(s0, 1)`` from a reshape, and batch 1 was captured again)."""
    model = MODELS["hf_bert"](small=True)
    opt = pyrys.optimize(model, model.example_inputs(2), precision="bf16", dynamic=True)
    for batch in (1, 3):
        inputs = model.example_inputs(batch)
        with torch.no_grad():
            expected = model(*inputs)
        assert pyrys.relative_error(opt(*inputs), expected) <= 1e-2
    assert not any("captured and optimized again" in note for note in opt.notes), opt.notes


def test_a_saved_transformer_takes_new_shapes_after_load(tmp_path):
    """BERT's symbolic sizes include torch's ``Min`` (its position ids sliced to the length): saved and read
    back, so the loaded module specializes new batch sizes and lengths without ``torch.export``."""
    import warnings

    model = MODELS["hf_bert"](small=True)
    opt = pyrys.optimize(model, model.example_inputs(2), dynamic=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a save that leaves the symbolic graph out warns
        pyrys.save(opt, tmp_path / "bert")
    loaded = pyrys.load(tmp_path / "bert")
    ids, mask = model.example_inputs(3)
    shorter = (ids[:, :9], mask[:, :9])
    with torch.no_grad():
        expected = model(*shorter)
    assert pyrys.relative_error(loaded(*shorter), expected) <= TOLERANCE


def test_a_model_returning_a_model_output_is_saved_and_gives_it_back(tmp_path):
    """HuggingFace models return a ``ModelOutput`` (registered with torch's pytree): saved, it comes back."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                 vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 7))
    opt = pyrys.optimize(model, (), {"input_ids": ids})
    pyrys.save(opt, tmp_path / "bert")
    got, expected = pyrys.load(tmp_path / "bert")(input_ids=ids), opt(input_ids=ids)
    assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)


def test_a_decoder_with_rotary_heads_gives_eagers_logits_at_one_token():
    """Qwen2 optimized at (2, 7), then called at one token: its rotary ``q * cos`` reads one query head as a
    view of the merged projection, whose dim of 1 kept the row's stride, and ``rotate_half(q) * sin`` reads a
    dense copy of the same shape.  oneDNN 3.2 compared the two descriptors equal, its primitive cache gave
    the second the first's primitive, and the logits came out NaN in most builds (``canonical_strides``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, max_position_embeddings=256, vocab_size=100,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    one = torch.tensor([[60]])
    with torch.no_grad():
        expected = model(input_ids=one, use_cache=False).logits
    for _ in range(3):  # the garbage depended on what the buffers held: most builds, not every one
        opt = pyrys.optimize(model, (), {"input_ids": torch.randint(0, 100, (2, 7)), "use_cache": False})
        with torch.no_grad():
            assert pyrys.relative_error(opt(input_ids=one, use_cache=False).logits, expected) <= TOLERANCE


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_bert"])
def test_a_first_new_shape_of_length_one_still_gives_a_graph_for_every_shape(name):
    """``dynamic=None``, a prompt then a one-token step: the symbolic capture was made at length 1, which
    torch.export refuses (HF's ``is_causal=q_len > 1``, a symbolic bool), and every later length was then a
    capture of its own.  It is made at length 2 now, and later lengths are specialized from it."""
    model = MODELS[name](small=True)
    prompt = model.example_inputs(1)
    opt = pyrys.optimize(model, prompt)
    for length in (1, 17, 18, 19):
        inputs = tuple(torch.cat([t, t], 1)[:, :length].contiguous() for t in prompt)
        with torch.no_grad():
            assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE
    assert any(note.startswith("input shapes vary: captured once more with symbolic sizes") for note in opt.notes), \
        opt.notes
    assert not any(f"{length})" in note and "captured and optimized again" in note
                   for note in opt.notes for length in (18, 19)), opt.notes


def test_an_output_a_torch_step_views_is_copied_before_its_bytes_are_reused():
    """SigLIP in int8: ``pooler_output`` (``torch::select`` of the head's (2, 1, 32) activation, a view of its
    buffer) came back 0.2-0.9 off while ``image_embeds``, computed from it, was right: the memory plan let later
    steps reuse the bytes an output viewed (a helper's find). They live to the end now."""
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    generator = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(3, 100, (2, 8), generator=generator),
                "pixel_values": torch.randn(2, 3, 32, 32, generator=generator)} for _ in range(4)]
    opt = pyrys.optimize(model, (), samples[0], precision="int8", calibration=samples)
    for sample in samples:
        with torch.no_grad():
            want = model(**sample).vision_model_output.pooler_output
        assert pyrys.relative_error(opt(**sample).vision_model_output.pooler_output, want) <= 5e-2


def test_the_bf16_guard_keeps_bert_s_pooler_not_the_layers_whose_residual_stays_float32(monkeypatch):
    """Lowering a fused ``linear + residual`` leaves the float32 residual and the sum unrounded, and rounds a
    lone op's result: the guard's measure of each op now rounds what lowering rounds (``rounded_alone``).  It
    charged the residual stream's rounding to the encoder's ``linear_add`` ops, ranked the pooler (whose
    bfloat16 result is an output) last and kept 5 ops where the pooler alone holds the budget (a helper's find)."""
    from transformers import BertConfig, BertModel

    monkeypatch.setattr(importlib.import_module("pyrys.precision_notes"), "native_bf16", lambda: True)
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000)
    model = BertModel(config).eval()
    samples = [(torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(100 + i)),
                torch.ones(2, 16, dtype=torch.long)) for i in range(4)]
    opt = pyrys.optimize(model, samples[0], precision="bf16", calibration=samples, accuracy_budget=5e-3,
                         backend="reference")
    (miss,) = opt.misses
    assert re.search(rf"%{miss.node} : Float\(2, 64\) = pyrys::linear_tanh\(", opt.graph), opt.graph  # the pooler
    assert max(pyrys.relative_error(opt(*s), model(*s)) for s in samples) <= 5e-3
