"""OpenAI and gpt-2-simple TensorFlow checkpoints read without TensorFlow, against logits that real
TensorFlow computed (tests/fixtures/tf, written by scripts/make_tf_fixtures.py)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import google_crc32c
import numpy as np
import pytest
import torch
from scripted import serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from botkit import load_gpt2
from botkit.cli import main
from botkit.config import Config, ModelConfig, StoreConfig, WebConfig
from botkit.engine.generate import generate
from botkit.errors import ModelLoadError
from botkit.model.loading import load_model
from botkit.model.sources import resolve
from botkit.model.tf_bundle import TABLE_MAGIC, mask, open_bundle

FIXTURES = Path(__file__).parent / "fixtures" / "tf"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def logits(model, ids=EXPECTED["ids"]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float().numpy()


@pytest.mark.parametrize(("folder", "reference"), [("openai", "logits_openai.npy"), ("run1", "logits_run1.npy")])
def test_tensorflow_checkpoints_give_tensorflows_logits_without_tensorflow(folder, reference):
    lm = load_model(FIXTURES / folder, device="cpu")
    expected = np.load(FIXTURES / reference)
    assert np.abs(logits(lm.model) - expected).max() < 1e-5
    # OpenAI's encoder.py, run by the fixture script
    assert lm.tokenizer.encode(EXPECTED["text"]) == EXPECTED["ids"][1:]
    assert lm.eos_token_id == EXPECTED["ids"][0] and lm.max_context == 32
    # tied, as in OpenAI's model
    assert lm.model.lm_head.weight.data_ptr() == lm.model.transformer.wte.weight.data_ptr()
    assert "tensorflow" not in sys.modules


def test_a_gpt2_simple_run_by_run_name_prefix_or_load_gpt2():
    by_name = load_model(run_name="run1", checkpoint_dir=FIXTURES, device="cpu")
    by_prefix = load_model(FIXTURES / "run1" / "model-3", device="cpu")
    ported = load_gpt2(None, run_name="run1", checkpoint_dir=str(FIXTURES), device="cpu")
    openai = load_gpt2(model_name="openai", model_dir=str(FIXTURES), device="cpu")
    expected = np.load(FIXTURES / "logits_run1.npy")
    for lm in (by_name, by_prefix, ported):
        assert np.abs(logits(lm.model) - expected).max() < 1e-5
    assert np.abs(logits(openai.model) - np.load(FIXTURES / "logits_openai.npy")).max() < 1e-5
    assert (
        resolve(str(FIXTURES / "run1")).kind == "tf"
        and resolve(str(FIXTURES / "openai" / "model.ckpt")).checkpoint == "model.ckpt"
    )


def test_convert_writes_a_folder_that_from_pretrained_loads(tmp_path, capsys):
    assert main(["convert", str(FIXTURES / "run1"), str(tmp_path / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert np.abs(logits(model) - np.load(FIXTURES / "logits_run1.npy")).max() < 1e-5
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(EXPECTED["text"]) == EXPECTED["ids"][1:]
    assert main(["convert", str(FIXTURES / "run1"), str(tmp_path / "hf")]) == 2  # never over an existing folder
    assert "choose a new folder" in capsys.readouterr().err


def copy_of(tmp_path, folder="run1") -> Path:
    return Path(shutil.copytree(FIXTURES / folder, tmp_path / folder))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def damage_missing_shard(run):
    (run / "model-3.data-00000-of-00001").unlink()


def damage_weights(run):
    wte = open_bundle(run / "model-3").entries["model/wte"]
    flip_byte(run / "model-3.data-00000-of-00001", wte.offset + 10)


def damage_truncate(run):
    path = run / "model-3.data-00000-of-00001"
    path.write_bytes(path.read_bytes()[:60_000])


def damage_index(run):
    flip_byte(run / "model-3.index", 100)


def damage_hparams(run):
    (run / "hparams.json").write_text(json.dumps({**json.loads((run / "hparams.json").read_text()), "n_embd": 32}))


def damage_no_hparams(run):
    (run / "hparams.json").unlink()


def damage_tokenizer(run):
    (run / "encoder.json").write_text('{"a": 1}')


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (damage_missing_shard, "model-3.data-00000-of-00001 is missing beside model-3.index"),
        (damage_weights, "fails its checksum"),
        (damage_truncate, "shorter than its index says"),
        (damage_index, "is not a TensorFlow checkpoint index botkit can read"),
        (damage_hparams, "says n_embd = 32 but the checkpoint has 16"),
        (damage_no_hparams, "but no hparams.json"),
        (damage_tokenizer, r"has no <\|endoftext\|> token"),
    ],
)
def test_damaged_checkpoints_are_one_sentence(tmp_path, damage, says):
    run = copy_of(tmp_path)
    damage(run)
    with pytest.raises(ModelLoadError, match=says) as info:
        load_model(run, device="cpu")
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_a_tensorflow_checkpoint_of_another_model_is_one_sentence():
    with pytest.raises(
        ModelLoadError,
        match=r"not a GPT-2 in OpenAI's layout \(no model/wte; it holds dense/bias, "
        r"dense/kernel",
    ):
        load_model(FIXTURES / "other", device="cpu")


def test_the_command_line_says_one_sentence_for_a_damaged_checkpoint(tmp_path):
    run = copy_of(tmp_path)
    damage_weights(run)
    out = subprocess.run(
        [sys.executable, "-m", "botkit", "generate", "--model", str(run), "--length", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "botkit: model/wte in model-3.data-00000-of-00001 fails its checksum "
        "(the file is damaged): copy the checkpoint again."
    ]


async def test_botkit_run_serves_a_gpt2_simple_run(tmp_path, capsys):
    config = Config(
        model=ModelConfig(source=str(FIXTURES / "run1"), device="cpu"),
        store=StoreConfig(path=str(tmp_path / "b.db")),
        web=WebConfig(port=0),
    )
    async with serving(config, capsys) as (url, _), aiohttp.ClientSession() as http:
        body = {"prompt": "Hello world", "max_tokens": 6, "temperature": 0}
        async with http.post(url + "v1/completions", json=body) as answer:
            served = (await answer.json())["choices"][0]["text"]
    [expected] = generate(
        load_model(FIXTURES / "run1", device="cpu"),
        prefix="Hello world",
        length=6,
        temperature=0,
        include_prefix=False,
        return_as_list=True,
    )
    assert served == expected and len(served) > 0


def test_an_index_of_many_blocks_and_other_dtypes():
    # 500 variables: an 11 KB index, a restart point every 16 keys
    bundle = open_bundle(FIXTURES / "many" / "model.ckpt")
    assert sorted(bundle.entries) == [f"v{i:03d}" for i in range(500)]
    for i in range(500):
        values = bundle.read(f"v{i:03d}")
        assert values.dtype == (np.float32, np.int64, np.float16)[i % 3] and values.tolist() == [i, -i]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def block(entries: list[tuple[int, bytes, bytes]]) -> bytes:
    """An SSTable block of (shared, unshared key bytes, value) entries, one restart point, then its trailer."""
    body = b"".join(
        varint(shared) + varint(len(key)) + varint(len(value)) + key + value for shared, key, value in entries
    )
    body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    return body + b"\0" + mask(google_crc32c.value(body + b"\0")).to_bytes(4, "little")


def write_index(path: Path, data_entries: list[tuple[int, bytes, bytes]], num_references: int = 1) -> None:
    """A table with one data block that its index block lists `num_references` times."""
    data = block(data_entries)
    handle = varint(0) + varint(len(data) - 5)
    index = block([(0, f"k{i:04d}".encode(), handle) for i in range(num_references)])
    footer = varint(0) + varint(0) + varint(len(data)) + varint(len(index) - 5)
    path.write_bytes(data + index + footer.ljust(40, b"\0") + TABLE_MAGIC.to_bytes(8, "little"))


@pytest.mark.parametrize(
    ("entries", "num_references"),
    [
        # each key the last plus 200 bytes
        ([(0, b"a" * 200, b"")] + [(200 * i, b"b" * 200, b"") for i in range(1, 500)], 1),
        ([(0, b"model/wte", b"")], 200),  # one block read 200 times
    ],
)
def test_a_hostile_index_is_refused_before_it_costs_memory_or_time(tmp_path, entries, num_references):
    write_index(tmp_path / "model.ckpt.index", entries, num_references)
    with pytest.raises(ModelLoadError, match="is not a TensorFlow checkpoint index botkit can read"):
        open_bundle(tmp_path / "model.ckpt")


def tensor_entry(*dims: int) -> bytes:
    """A BundleEntryProto of a float32 tensor of shape `dims` at offset 0 of shard 0."""
    shape = b"".join(b"\x12" + varint(len(d := b"\x08" + varint(size))) + d for size in dims)
    return b"\x08\x01" + b"\x12" + varint(len(shape)) + shape + b"\x28" + varint(4 * math.prod(dims))


def test_a_checkpoint_of_width_zero_is_one_sentence(tmp_path):
    names = {"model/h0/ln_1/b": (0,), "model/wpe": (8, 0), "model/wte": (50257, 0)}
    write_index(
        tmp_path / "model.ckpt.index", [(0, name.encode(), tensor_entry(*dims)) for name, dims in sorted(names.items())]
    )
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"")
    (tmp_path / "hparams.json").write_text(json.dumps({"n_head": 1}))
    with pytest.raises(ModelLoadError, match="does not have GPT-2's shapes") as info:
        load_model(tmp_path, device="cpu")
    assert str(info.value).count(". ") == 0


def test_an_encoder_json_nested_deep_is_one_sentence(tmp_path):
    run = copy_of(tmp_path)
    (run / "encoder.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelLoadError, match="cannot be read as OpenAI's tokenizer files"):
        load_model(run, device="cpu")
