"""Prepacked weights (model/prepack.py): the engine's copy of the model computes what transformers computes,
and the model itself is left as it was (it may still be trained or saved)."""

import pytest
import torch
from scripted import hf_greedy
from transformers import GPT2Config
from transformers.pytorch_utils import Conv1D

from botkit.engine.engine import Engine
from botkit.model.loading import load_model
from botkit.model.prepack import MIN_WIDTH, PackedLinear, can_prepack, prepack
from botkit.params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.fixture(scope="module")
def wide_lm():
    """The narrowest model packing is used for (one layer, so that it builds in a second)."""
    return load_model(GPT2Config(n_layer=1, n_head=8, n_embd=MIN_WIDTH, n_positions=64), device="cpu", seed=0)


@torch.inference_mode()
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_a_packed_layer_computes_what_the_plain_one_does(rows):
    layer = Conv1D(96, 64)
    packed = PackedLinear(layer.weight.t(), layer.bias)
    x = torch.randn(1, rows, 64)
    torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)


def test_packing_leaves_the_model_as_it_was(wide_lm):
    keys = set(wide_lm.model.state_dict())
    packed = prepack(wide_lm.model)
    assert isinstance(packed.transformer.h[0].mlp.c_fc, PackedLinear) and isinstance(packed.lm_head, PackedLinear)
    assert isinstance(wide_lm.model.transformer.h[0].mlp.c_fc, Conv1D)
    assert not isinstance(wide_lm.model.lm_head, PackedLinear)
    assert set(wide_lm.model.state_dict()) == keys
    assert packed.transformer.wte.weight is wide_lm.model.transformer.wte.weight  # shared, not copied


def test_only_wide_float32_cpu_models_are_packed(tiny_lm, wide_lm):
    assert can_prepack(wide_lm.model)
    assert not can_prepack(tiny_lm.model)  # too narrow to pay
    assert isinstance(Engine(wide_lm, 4, cache_mb=0, prepack=True).runner.model.lm_head, PackedLinear)
    assert not isinstance(Engine(wide_lm, 4, cache_mb=0).runner.model.lm_head, PackedLinear)


def test_greedy_text_on_packed_weights_equals_transformers(wide_lm):
    """Sixteen rows decode together, fewer as they finish; each reply is transformers' greedy
    continuation of its prompt alone, token for token."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in range(3, 35, 2)]
    lengths = list(range(2, 18))  # rows leave one by one: steps of 16 rows down to 1
    engine = Engine(wide_lm, 16, cache_mb=0, prepack=True)
    seqs = [
        engine.add(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(prompts, lengths, strict=True)
    ]
    while engine.has_work:
        engine.step()
    for prompt, n, seq in zip(prompts, lengths, seqs, strict=True):
        assert seq.generated == hf_greedy(wide_lm, prompt, n)
