"""`dtype = "int8"`: int8 weights for GPT-2's matmuls on CPU (botkit/model/quantize.py)."""

import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config
from transformers.pytorch_utils import Conv1D

from botkit.config import load_config
from botkit.engine.engine import Engine
from botkit.errors import InputError
from botkit.model.loading import load_model
from botkit.model.quantize import Int8Embedding, Int8Linear, has_fast_int8, model_bytes, quantize_int8
from botkit.params import SamplingParams

TINY = GPT2Config(n_layer=2, n_head=2, n_embd=32)
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def tiny_int8():
    return load_model(TINY, device="cpu", dtype="int8", seed=0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_a_layer_is_the_float_layer_within_int8_rounding(kind):
    torch.manual_seed(0)
    layer = Conv1D(48, 64) if kind == "conv1d" else torch.nn.Linear(64, 48)  # Conv1D(out, in): weight (in, out)
    torch.nn.init.normal_(layer.bias, std=0.1)
    x = torch.randn(3, 5, 64)  # (batch, tokens, in)
    q = Int8Linear.of(layer, has_fast_int8())
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 64)
    with torch.no_grad():
        want, got = layer(x), q(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    assert 0 < relative_error(got, want) < 0.02  # quantised (not a float copy), and close


def test_every_row_is_quantised_on_its_own():
    """A row's output does not depend on the other rows of the batch (so batching cannot change a
    sample), and an all-zero row gives exactly the bias."""
    torch.manual_seed(0)
    q = Int8Linear.of(Conv1D(16, 32), has_fast_int8())
    x = torch.randn(4, 32)
    x[1] *= 1000  # a row with huge values must not coarsen the others
    x[2] = 0
    with torch.no_grad():
        together = q(x)
        alone = torch.cat([q(row[None]) for row in x])
    assert torch.equal(together, alone)
    assert torch.equal(together[2], q.bias)


def test_the_float32_fallback_gives_the_kernels_numbers():
    torch.manual_seed(0)
    layer = Conv1D(40, 768)  # K = 768: every int32 dot product fits float32's 24-bit mantissa
    fast, slow = Int8Linear.of(layer, True), Int8Linear.of(layer, False)
    x = torch.randn(7, 768)
    with torch.no_grad():
        assert torch.allclose(fast(x), slow(x), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's CPU flags")
def test_the_fast_kernel_is_chosen_where_the_cpu_has_avx512_vnni():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert has_fast_int8() == ("avx512_vnni" in flags and torch.backends.mkldnn.enabled)


def test_an_int8_model_swaps_only_the_matmuls_and_is_a_quarter_of_the_size(tiny_int8):
    fp32 = load_model(TINY, device="cpu", dtype="float32", seed=0).model
    model = tiny_int8.model
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * TINY.n_layer + 1  # 4 per block and the head
    assert isinstance(model.transformer.wte, Int8Embedding)
    assert model.transformer.wte.weight is model.lm_head.weight  # tied: one int8 matrix
    assert model.transformer.h[0].attn.__class__ is fp32.transformer.h[0].attn.__class__  # attention untouched
    assert model.dtype == torch.float32  # activations, layer norms and the KV cache stay float32
    assert model_bytes(model) < 0.3 * model_bytes(fp32)
    ids = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert 0 < relative_error(model(ids).logits, fp32(ids).logits) < 0.05


def test_a_trained_models_loss_and_predictions_barely_move():
    """The demo model (trained on fortunes) on 2,048 tokens of real English it never saw."""
    fp32, int8 = load_model(None, device="cpu", dtype="float32"), load_model(None, device="cpu", dtype="int8")
    ids = torch.tensor(fp32.tokenizer(README.read_text(encoding="utf-8")).input_ids[: 8 * 256]).view(8, 256)
    with torch.inference_mode():
        want, got = fp32.model(ids, labels=ids), int8.model(ids, labels=ids)
    assert abs(got.loss.item() / want.loss.item() - 1) < 0.002  # measured: 0.012 %
    assert (got.logits.argmax(-1) == want.logits.argmax(-1)).float().mean() > 0.95  # measured: 98 %
    assert 0 < relative_error(got.logits, want.logits) < 0.03  # measured: 0.8 %


def test_the_engine_generates_with_int8_as_transformers_does_with_the_same_model(tiny_int8):
    """The engine's own attention and KV cache over int8 layers: the same greedy tokens as
    transformers' `generate` on the same int8 model, in a mixed batch with one row joining late."""
    lm = tiny_int8
    prompts = [lm.tokenizer(p).input_ids for p in ("Hello world", "The quick brown fox jumps over the lazy", "A")]
    engine = Engine(lm, max_batch_size=2, cache_mb=0)
    seqs = [engine.add(ids, SamplingParams(max_new_tokens=16, temperature=0)) for ids in prompts]
    while engine.has_work:
        engine.step()
    for ids, seq in zip(prompts, seqs, strict=True):
        x = torch.tensor([ids])
        out = lm.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=16,
            min_new_tokens=16,
            pad_token_id=lm.eos_token_id,
        )
        assert seq.generated == out[0, len(ids) :].tolist()


def test_int8_off_the_cpu_is_one_sentence():
    with pytest.raises(InputError, match="CPU only") as info:
        load_model(TINY, device="cuda", dtype="int8")  # refused before looking for a GPU: the same on any machine
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
    model = load_model(TINY, device="cpu", seed=0).model.to("meta")  # a model already elsewhere
    with pytest.raises(InputError, match="CPU only"):
        quantize_int8(model)


def test_without_the_fast_kernel_int8_still_works_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr("botkit.model.quantize.has_fast_int8", lambda: False)
    with caplog.at_level(logging.WARNING, logger="botkit"):
        lm = load_model(TINY, device="cpu", dtype="int8", seed=0)
    warnings = [r.getMessage() for r in caplog.records if "VNNI" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].count(". ") == 0 and warnings[0].endswith(".")
    assert not any(m.fast for m in lm.model.modules() if isinstance(m, Int8Linear))
    fast = load_model(TINY, device="cpu", dtype="int8", seed=0)
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert torch.allclose(lm.model(ids).logits, fast.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_config_takes_int8_and_a_wrong_dtype_lists_it(tmp_path):
    path = tmp_path / "botkit.toml"
    path.write_text('[model]\ndtype = "int8"\n')
    assert load_config(path).model.dtype == "int8"
    with pytest.raises(InputError, match="float16, int8[.]"):
        load_model(TINY, device="cpu", dtype="int4")
