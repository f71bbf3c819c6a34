"""LoRA fine-tuning (peft): the loss falls, checkpoints hold the adapter alone, resume is exact, and a
LoRA run loads (and converts) as its base with the adapter merged in."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from botkit.cli import main
from botkit.errors import InputError, ModelLoadError
from botkit.model.loading import load_model
from botkit.model.lora import load_adapter
from botkit.train.finetune import finetune

TEXT = "".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(60))
NEW_TEXT = "".join(f"The lazy dog number {i} jumps over the quick brown fox.\n" for i in range(60))  # what LoRA learns
FIXTURES = Path(__file__).parent / "fixtures" / "tf"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained GPT-2 (with its own small tokenizer) in a folder: the model LoRA adapts."""
    tmp = tmp_path_factory.mktemp("base")
    (tmp / "data.txt").write_text(TEXT)
    result = finetune(
        str(tmp / "data.txt"),
        model="scratch",
        train_tokenizer=True,
        vocab_size=300,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_ctx=32,
        steps=30,
        batch_size=4,
        learning_rate=1e-2,
        sample_every=0,
        progress=False,
        run_name="base",
        checkpoint_dir=str(tmp),
        device="cpu",
    )
    return result.run_dir


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(NEW_TEXT)
    return path


def lora(tmp_path, dataset, base, **kwargs):
    args = dict(
        model=str(base),
        lora=4,
        steps=6,
        batch_size=4,
        learning_rate=1e-2,
        sample_every=0,
        save_every=100,
        progress=False,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        sample_dir=str(tmp_path / "samples"),
        device="cpu",
    )
    return finetune(str(dataset), **{**args, **kwargs})


def loss_rows(run_dir):
    return [
        (r["step"], r["loss"], r["avg_loss"], r["learning_rate"])
        for r in csv.DictReader((run_dir / "loss.csv").read_text().splitlines())
    ]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    with safe_open(run_dir / "adapter_model.safetensors", "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_loss_falls_and_the_checkpoint_is_the_adapter_alone(tmp_path, text_file, base):
    before = (base / "model.safetensors").read_bytes()
    result = lora(tmp_path, text_file, base, steps=30, sample_every=15, sample_length=4, run_name="fall")
    rows = loss_rows(result.run_dir)
    # average loss at the end vs the first step's (2.3 -> 1.1 when written)
    assert float(rows[-1][2]) < float(rows[0][1]) - 0.8
    files = {p.name for p in result.run_dir.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    } <= files and "model.safetensors" not in files
    weights = adapter(result.run_dir)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in weights} == {"c_attn", "c_proj", "c_fc"}
    # 2 layers x (A, B)
    assert len([n for n in weights if ".mlp.c_proj." in n]) == len([n for n in weights if ".attn.c_proj." in n]) == 4
    # per layer: A (rank, in) and B (out, rank) of c_attn (32->96), attn.c_proj (32->32), c_fc (32->128), mlp.c_proj
    # (128->32)
    rank, width = 4, 32
    assert sum(t.numel() for t in weights.values()) == 2 * rank * (
        (width + 3 * width) + 2 * width + 2 * (width + 4 * width)
    )
    config = json.loads((result.run_dir / "adapter_config.json").read_text())
    assert (
        config["fan_in_fan_out"] is True
        and config["base_model_name_or_path"] == str(base.resolve())
        and config["r"] == 4
    )
    assert (base / "model.safetensors").read_bytes() == before  # the base is never written
    assert (tmp_path / "samples" / "fall" / "samples-15.txt").stat().st_size > 0


def test_resume_is_exact(tmp_path, text_file, base):
    schedule = dict(steps=8, lr_schedule="cosine", warmup_steps=2, accumulate_gradients=2, lora_dropout=0.1)
    straight = lora(tmp_path, text_file, base, run_name="straight", **schedule)
    first = lora(tmp_path, text_file, base, run_name="split", stop_at_step=4, **schedule)
    assert first.step == 4 and first.stopped == "stop_at_step"
    torch.manual_seed(1234)  # as a new process would be: the dropout RNG must come from the checkpoint
    resumed = lora(tmp_path, text_file, base, run_name="split", restore_from="latest", **schedule)
    assert resumed.step == 8
    for (name, a), b in zip(adapter(straight.run_dir).items(), adapter(resumed.run_dir).values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert loss_rows(straight.run_dir) == loss_rows(resumed.run_dir) and len(loss_rows(resumed.run_dir)) == 8
    with pytest.raises(InputError, match="is a LoRA run of rank 4: pass --lora 4 to continue it"):
        lora(tmp_path, text_file, base, run_name="split", restore_from="latest", lora=8, steps=10)


def test_merged_model_equals_the_adapter_applied_on_the_fly(tmp_path, text_file, base):
    result = lora(tmp_path, text_file, base, run_name="merge")
    ids = torch.tensor([load_model(base, device="cpu").tokenizer.encode("The quick brown fox number 7")])
    # peft's PeftModel
    on_the_fly = load_adapter(AutoModelForCausalLM.from_pretrained(base), result.run_dir, is_trainable=False).eval()
    assert isinstance(on_the_fly, PeftModel)
    plain_base = AutoModelForCausalLM.from_pretrained(base).eval()
    merged = load_model(run_name="merge", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    with torch.no_grad():
        expected = on_the_fly(ids).logits
        assert not torch.allclose(expected, plain_base(ids).logits, atol=1e-3)  # the adapter changed the model
        torch.testing.assert_close(merged.model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.lm.model(ids).logits, expected, rtol=1e-5, atol=1e-5)

    # needs --merge
    assert main(["convert", "merge", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "checkpoint")]) == 2
    assert main(["convert", str(result.run_dir), str(tmp_path / "out"), "--merge"]) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits, expected, rtol=1e-5, atol=1e-5
        )


def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, text_file, base):
    plain = lora(tmp_path, text_file, base, steps=3, run_name="plain")
    checkpointed = lora(tmp_path, text_file, base, steps=3, run_name="gc", gradient_checkpointing=True)
    for (name, a), b in zip(adapter(plain.run_dir).items(), adapter(checkpointed.run_dir).values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_on_a_tensorflow_checkpoint(tmp_path, text_file):
    result = lora(tmp_path, text_file, FIXTURES / "openai", steps=2, batch_size=2, run_name="tf")
    assert json.loads((result.run_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (FIXTURES / "openai").resolve()
    )
    lm = load_model(run_name="tf", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode("hello world")])
    torch.testing.assert_close(lm.model(ids).logits, result.lm.model(ids).logits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": "scratch"}, "LoRA adapts a trained model"),
        ({"only_train_transformer_layers": True}, "lora already trains only the transformer layers"),
        ({"lora": -1}, "lora must be a whole number"),
        ({"lora_alpha": 2.5}, "lora_alpha must be a whole number"),
        ({"lora_dropout": 1.5}, "lora_dropout must be at least 0"),
        ({"lora": 10_000}, "lora rank 10000 is above the model's width of 32"),  # would allocate for nothing
    ],
)
def test_bad_lora_options_are_one_sentence(tmp_path, text_file, base, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        lora(tmp_path, text_file, base, run_name="bad", **kwargs)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_a_lora_run_whose_base_is_gone_is_one_sentence(tmp_path, text_file, base):
    moved = Path(shutil.copytree(base, tmp_path / "base-copy"))
    result = lora(tmp_path, text_file, moved, steps=1, run_name="orphan")
    shutil.rmtree(moved)
    with pytest.raises(
        ModelLoadError,
        match=r"adapts .*base-copy, which cannot be loaded here .*: put the base model "
        r"back",
    ) as info:
        load_model(result.run_dir, device="cpu")
    assert str(info.value).endswith("(`botkit convert --merge`).")


def lora_folder(path: Path, base) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 4}))
    return path


@pytest.mark.parametrize("layout", ["itself", "each other", "nested"])
def test_a_lora_run_that_adapts_a_lora_run_or_is_damaged_is_one_sentence(tmp_path, layout):
    if layout == "itself":
        run = lora_folder(tmp_path / "self", tmp_path / "self")
    elif layout == "each other":
        run = lora_folder(tmp_path / "a", tmp_path / "b")
        lora_folder(tmp_path / "b", tmp_path / "a")
    else:
        run = tmp_path / "nested"
        run.mkdir()
        (run / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError) as info:
        load_model(run, device="cpu")
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
    assert layout == "nested" or "chain of LoRA runs it names comes back to" in str(info.value)
