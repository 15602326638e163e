"""HuggingFace transformers (small configs of the zoo's five families) on the dnnl backend against eager:
attention in oneDNN, no torch fallback inside a layer.  They skip without the ``transformers`` extra."""
import pytest
import torch

import pyrys
from pyrys import zoo
from pyrys.backends.dnnl import binding
from pyrys.bench.transformer_models import EXTRA, MODELS
from tests.conftest import TOLERANCE

pytest.importorskip("transformers", reason=f"needs HuggingFace transformers: {EXTRA}")
available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")

# what may still run through torch: the embeddings' gather, the mask's construction from the ids' mask
OUTSIDE_LAYERS = {"torch::embedding", "torch::_to_copy", "torch::index", "torch::__and__", "torch::expand"}


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
