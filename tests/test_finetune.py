"""Fine-tuning on tiny models: exact resume, datasets, held-out loss, early stopping, bad input."""

import csv
import dataclasses
import inspect

import numpy as np
import pytest
import torch
from scripted import tiny_run as tiny
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from botkit.engine.generate import generate
from botkit.errors import BotkitError, DatasetError, InputError
from botkit.model.loading import gpt2_tokenizer, load_model
from botkit.train.encoding import encode_dataset, load_tokens, read_documents, train_tokenizer
from botkit.train.finetune import finetune
from botkit.train.options import FinetuneOptions

TEXT = "".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(60))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT)
    return path


def loss_rows(run_dir):
    rows = csv.DictReader((run_dir / "loss.csv").read_text().splitlines())
    return [(row["step"], row["loss"], row["avg_loss"], row["learning_rate"]) for row in rows]


def test_resume_is_exact(tmp_path, text_file):
    schedule = dict(steps=8, lr_schedule="cosine", warmup_steps=2, accumulate_gradients=2)  # dropout is on (0.1)
    straight = tiny(tmp_path, text_file, run_name="straight", **schedule)
    first = tiny(tmp_path, text_file, run_name="split", stop_at_step=4, **schedule)
    assert first.step == 4 and first.stopped == "stop_at_step"
    torch.manual_seed(1234)  # as a new process would be: the dropout RNG must come from the checkpoint
    resumed = tiny(tmp_path, text_file, run_name="split", restore_from="latest", **schedule)
    assert resumed.step == 8 and resumed.stopped == "steps"
    for (name, a), b in zip(
        straight.lm.model.state_dict().items(), resumed.lm.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert loss_rows(straight.run_dir) == loss_rows(resumed.run_dir)
    assert len(loss_rows(resumed.run_dir)) == 8


def test_loss_falls_and_checkpoint_loads_with_plain_transformers(tmp_path, text_file):
    result = tiny(tmp_path, text_file, steps=30, run_name="fall")
    rows = loss_rows(result.run_dir)
    assert float(rows[-1][2]) < float(rows[0][1]) - 1.0  # average loss at the end vs the first step's loss
    assert (result.run_dir / "loss.png").stat().st_size > 1000

    model = AutoModelForCausalLM.from_pretrained(result.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir)
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    torch.testing.assert_close(model(ids).logits, result.lm.model(ids).logits)
    lm = load_model(run_name="fall", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    assert lm.tokenizer.encode("The quick brown fox") == ids[0].tolist()


def test_older_checkpoints_are_kept_up_to_max_checkpoints(tmp_path, text_file):
    result = tiny(tmp_path, text_file, steps=7, save_every=2, max_checkpoints=3, run_name="keep")
    assert sorted(p.name for p in result.run_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    older = load_model(result.run_dir / "checkpoint-4", device="cpu")
    assert older.tokenizer.get_vocab() == result.lm.tokenizer.get_vocab()
    assert not torch.equal(older.model.transformer.wte.weight, result.lm.model.transformer.wte.weight)


def test_gradient_checkpointing_and_frozen_embeddings(tmp_path, text_file):
    plain = tiny(tmp_path, text_file, steps=3, run_name="plain")
    checkpointed = tiny(tmp_path, text_file, steps=3, run_name="gc", gradient_checkpointing=True)
    torch.testing.assert_close(plain.lm.model.lm_head.weight, checkpointed.lm.model.lm_head.weight)
    frozen = tiny(tmp_path, text_file, steps=3, run_name="frozen", only_train_transformer_layers=True)
    # same seed: the starting weights
    initial = tiny(tmp_path, text_file, steps=1, learning_rate=1e-12, run_name="initial")
    torch.testing.assert_close(frozen.lm.model.transformer.wte.weight, initial.lm.model.transformer.wte.weight)
    assert not torch.allclose(
        frozen.lm.model.transformer.h[0].mlp.c_fc.weight, initial.lm.model.transformer.h[0].mlp.c_fc.weight
    )


def test_gpt2_model_trains_on_csv_and_writes_samples(tmp_path):
    dataset = tmp_path / "rows.csv"
    dataset.write_text("text\n" + "".join(f'"line {i}, with a comma"\n' for i in range(40)))
    result = finetune(
        str(dataset),
        model=GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64),
        steps=2,
        batch_size=2,
        block_size=32,
        sample_every=2,
        sample_num=2,
        sample_length=5,
        run_name="csv",
        progress=False,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        sample_dir=str(tmp_path / "samples"),
        device="cpu",
    )
    assert result.step == 2
    samples = (tmp_path / "samples" / "csv" / "samples-2.txt").read_text()
    assert samples.count("=" * 20) == 1  # two samples, one separator
    assert AutoModelForCausalLM.from_pretrained(result.run_dir).config.vocab_size == 50257


def test_csv_rows_are_wrapped_and_header_skipped(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text\nfirst row\n"second, with comma"\n')
    assert read_documents(path) == [
        "<|startoftext|>first row<|endoftext|>",
        "<|startoftext|>second, with comma<|endoftext|>",
    ]


def test_jsonl_folder_and_glob(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_documents(tmp_path / "d.jsonl") == ["one", "two"]
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "a.txt").write_text("alpha")
    (tmp_path / "folder" / "sub" / "b.txt").write_text("beta")
    (tmp_path / "folder" / "notes.md").write_text("ignored")
    assert read_documents(tmp_path / "folder") == ["alpha", "beta"]
    assert read_documents(str(tmp_path / "folder" / "*.txt")) == ["alpha"]


def test_encode_cache_round_trip(tmp_path, text_file):
    tokenizer = gpt2_tokenizer()
    stream = encode_dataset(text_file, tokenizer, tmp_path / "cache.npz")
    assert stream.tokens[-1] == tokenizer.eos_token_id
    with np.load(tmp_path / "cache.npz") as data:
        assert data["tokens"].dtype == np.uint16
        assert data["tokens"].tolist() == stream.tokens.tolist()
    result = finetune(
        str(tmp_path / "cache.npz"),
        model=GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32),
        steps=1,
        run_name="npz",
        sample_every=0,
        progress=False,
        checkpoint_dir=str(tmp_path / "c"),
        device="cpu",
    )
    assert result.step == 1
    with pytest.raises(DatasetError, match="another tokenizer"):
        load_tokens(tmp_path / "cache.npz", train_tokenizer([TEXT], vocab_size=300))


def test_held_out_loss_and_early_stopping(tmp_path):
    # Training text and held-out text share no characters, so held-out loss rises from the first step.
    dataset = tmp_path / "shift.txt"
    dataset.write_text("abc " * 900 + "xyz " * 100)
    result = tiny(
        tmp_path, dataset, steps=20, val_fraction=0.1, val_every=1, early_stopping=2, learning_rate=1e-2, run_name="es"
    )
    assert result.stopped == "early stopping" and result.step < 20
    val = [float(row["val_loss"]) for row in csv.DictReader((result.run_dir / "loss.csv").read_text().splitlines())]
    assert len(val) == result.step  # evaluated at every step
    best_step = val.index(min(val)) + 1
    assert result.best_val_loss == pytest.approx(min(val), rel=1e-5)
    assert result.step == best_step + 2  # two evaluations without improvement, then stop
    assert (result.run_dir / "best" / "model.safetensors").is_file()


def test_chinese_dataset_trains_and_generates_utf8(tmp_path):
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
    dataset = tmp_path / "poems.txt"
    dataset.write_text(poem * 40, encoding="utf-8")
    result = tiny(tmp_path, dataset, steps=40, learning_rate=1e-2, run_name="zh")
    # the trained tokenizer fits Chinese
    assert len(result.lm.tokenizer.encode(poem)) < len(gpt2_tokenizer().encode(poem)) / 2
    [text] = generate(result.lm, prefix="床前", length=12, temperature=0, return_as_list=True)
    assert "\ufffd" not in text and set(text) <= set(poem) and len(text) > len("床前") + 4


def test_existing_run_needs_overwrite_or_restore(tmp_path, text_file):
    tiny(tmp_path, text_file, steps=1, run_name="r")
    with pytest.raises(
        InputError,
        match=r"already exists.*restore_from='latest' \(--restore-from "
        r"latest\).*overwrite=True",
    ):
        tiny(tmp_path, text_file, steps=2, run_name="r")
    assert tiny(tmp_path, text_file, steps=2, run_name="r", overwrite=True).step == 2
    with pytest.raises(InputError, match="already trained 2 steps"):
        tiny(tmp_path, text_file, steps=2, run_name="r", restore_from="latest")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, text_file):
    # Warmup makes step 1's learning rate 0 (a good checkpoint); step 2's huge rate ruins the weights.
    with pytest.raises(
        InputError,
        match=r"loss became nan at step 3.*last good checkpoint \(step 1\) is kept.*lower "
        r"learning_rate",
    ):
        tiny(
            tmp_path,
            text_file,
            steps=5,
            save_every=1,
            learning_rate=1e30,
            lr_schedule="linear",
            warmup_steps=3,
            max_grad_norm=0,
            optimizer="sgd",
            run_name="nan",
        )
    lm = load_model(run_name="nan", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    ids = torch.tensor([lm.tokenizer.encode(TEXT[:60])])
    assert torch.isfinite(lm.model(ids, labels=ids).loss)


@pytest.mark.parametrize(
    ("content", "kwargs", "error", "message"),
    [
        (None, {}, DatasetError, "does not exist"),
        ("   \n", {}, DatasetError, "is empty"),
        (b"\x89PNG\x00\x00binary", {}, DatasetError, "binary"),
        ("a,b\n1,2\n", {"suffix": ".csv"}, DatasetError, "exactly one column"),
        ("too short", {}, DatasetError, "fewer than one block of 32"),
        (TEXT, {"steps": 0}, InputError, "steps must be a whole number above 0"),
        (TEXT, {"optimizer": "lion"}, InputError, "optimizer must be one of"),
        (TEXT, {"mixed_precision": "fp16"}, InputError, "needs a CUDA GPU"),
        (TEXT, {"train_tokenizer": False, "model": "/nonexistent/model"}, BotkitError, "does not exist"),
    ],
)
def test_bad_input_is_one_sentence(tmp_path, content, kwargs, error, message):
    path = tmp_path / ("data" + kwargs.pop("suffix", ".txt"))
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(error, match=message) as info:
        tiny(tmp_path, path, run_name="bad", **kwargs)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_finetune_options_are_frozen_and_refuse_a_bad_value_with_the_same_sentence(tmp_path, text_file):
    options = FinetuneOptions(steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 4
    assert options.steps == 3 and dataclasses.replace(options, steps=5).steps == 5
    with pytest.raises(InputError) as direct:
        FinetuneOptions(optimizer="lion")
    with pytest.raises(InputError) as public:
        finetune(str(text_file), optimizer="lion", checkpoint_dir=str(tmp_path / "checkpoint"))
    assert str(direct.value) == str(public.value) == "optimizer must be one of 'adamw', 'adam', 'sgd', not 'lion'."


def test_finetune_keywords_are_the_options_fields_with_the_same_defaults():
    keywords = {name: p.default for name, p in inspect.signature(finetune).parameters.items() if name != "dataset"}
    fields = {f.name: f.default for f in dataclasses.fields(FinetuneOptions)}
    assert keywords == fields
