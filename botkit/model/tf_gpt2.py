"""OpenAI's GPT-2 downloads (`models/124M`) and gpt-2-simple's runs (`checkpoint/run1`) as a
transformers GPT2LMHeadModel and tokenizer, with no TensorFlow.

OpenAI's `model.py` names its variables `model/wte` (vocab, C), `model/wpe` (n_ctx, C),
`model/h<i>/{ln_1,ln_2}/{g,b}`, `model/h<i>/attn/{c_attn,c_proj}/{w,b}`,
`model/h<i>/mlp/{c_fc,c_proj}/{w,b}` and `model/ln_f/{g,b}`; its `conv1d` weights are (1, in, out),
which is transformers' `Conv1D` layout (in, out) with a leading 1. The output head is `wte` itself
(tied). Anything else in the checkpoint (Adam slots, beta powers, global_step) is training state
and is left unread.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, PreTrainedTokenizerBase

from botkit.errors import ModelLoadError
from botkit.model.tf_bundle import Bundle, open_bundle
from botkit.model.tokenizer import finish_tokenizer, gpt2_tokenizer

log = logging.getLogger("botkit")

HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
END_OF_TEXT = "<|endoftext|>"
# OpenAI name (after model/h<i>/) -> transformers name (after transformer.h.<i>.)
BLOCK_NAMES = {
    "ln_1/g": "ln_1.weight",
    "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight",
    "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight",
    "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight",
    "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight",
    "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight",
    "mlp/c_proj/b": "mlp.c_proj.bias",
}


def find_prefix(folder: Path, checkpoint: str = "latest") -> Path:
    """The checkpoint to read in `folder`: the one its `checkpoint` file names (only its file name is
    used: gpt-2-simple on Colab writes absolute paths such as /content/checkpoint/run1/model-1000),
    else the highest-numbered `*.index`. `checkpoint` other than "latest" names one, e.g. model-500."""
    if checkpoint != "latest":
        name = Path(checkpoint).name
    else:
        name = _named_in_state_file(folder) or ""
        if not (folder / f"{name}.index").is_file():
            indexes = sorted(folder.glob("*.index"), key=lambda p: [int(n) for n in re.findall(r"\d+", p.stem)] or [-1])
            if not indexes:
                raise ModelLoadError(
                    f"{folder} has no TensorFlow checkpoint (no *.index file): copy the model.ckpt.* "
                    "or model-<step>.* files into it."
                )
            name = indexes[-1].name[: -len(".index")]
    if not (folder / f"{name}.index").is_file():
        raise ModelLoadError(
            f"{folder} has no checkpoint {name!r} ({name}.index is missing): pass one that is there, or 'latest'."
        )
    return folder / name


def _named_in_state_file(folder: Path) -> str | None:
    try:
        text = (folder / "checkpoint").read_text(encoding="utf-8", errors="replace")[:100_000]
    except OSError:
        return None
    found = re.search(r'^model_checkpoint_path:\s*"([^"\n]*)"', text, re.MULTILINE)
    return found and re.split(r"[/\\]", found.group(1))[-1]


def read_hparams(folder: Path) -> dict[str, int]:
    path = folder / "hparams.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"{folder} has a TensorFlow checkpoint but no hparams.json: copy it from the model it was "
            "trained from (such as models/124M/hparams.json)."
        ) from exc
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested deep
        raise ModelLoadError(f"{path} is not valid JSON: copy it again from the model it was trained from.") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object like OpenAI's hparams.json: copy it again.")
    hparams = {key: raw[key] for key in HPARAMS if key in raw}
    for key, value in hparams.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10_000_000:
            raise ModelLoadError(f"{path} has {key} = {value!r}, not a whole number above 0: fix it or copy it again.")
    return hparams


def load_tf_gpt2(folder: Path, checkpoint: str = "latest") -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """The model (float32, on CPU, eval mode) and tokenizer of an OpenAI or gpt-2-simple folder."""
    hparams = read_hparams(folder)
    prefix = find_prefix(folder, checkpoint)
    bundle = open_bundle(prefix)
    config = _config(bundle, hparams, folder)
    tokenizer = folder_tokenizer(folder, config.vocab_size, config.n_positions)
    config = GPT2Config(
        **{**config.to_diff_dict(), "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    )
    state = _state_dict(bundle, config)
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = GPT2LMHeadModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.name_or_path = str(folder.resolve())
    log.info(
        "Read %s (TensorFlow checkpoint %s, %d layers, width %d).", folder, prefix.name, config.n_layer, config.n_embd
    )
    return model.eval(), tokenizer


def _config(bundle: Bundle, hparams: dict[str, int], folder: Path) -> GPT2Config:
    """GPT2Config from hparams.json, checked against the checkpoint's own shapes."""
    for name in ("model/wte", "model/wpe"):
        if name not in bundle.entries:
            found = ", ".join(sorted(bundle.entries)[:3]) or "no tensors"
            raise ModelLoadError(
                f"{bundle.prefix.name} in {folder} is a TensorFlow checkpoint but not a GPT-2 in "
                f"OpenAI's layout (no {name}; it holds {found}...): botkit reads checkpoints of "
                "OpenAI's gpt-2 and gpt-2-simple."
            )
    wte, wpe = bundle.entries["model/wte"].shape, bundle.entries["model/wpe"].shape
    layers = {int(m.group(1)) for name in bundle.entries if (m := re.match(r"model/h(\d+)/", name))}
    found = {
        "n_vocab": wte[0] if len(wte) == 2 else -1,
        "n_embd": wte[-1] if wte else -1,
        "n_ctx": wpe[0] if wpe else -1,
        "n_layer": len(layers),
    }
    for key, value in found.items():
        if key in hparams and hparams[key] != value:
            raise ModelLoadError(
                f"hparams.json in {folder} says {key} = {hparams[key]} but the checkpoint has "
                f"{value}: it belongs to another model, copy the right one."
            )
    n_head = hparams.get("n_head", 12)  # gpt-2-simple's default_hparams()
    if layers != set(range(len(layers))) or not layers or min(found.values()) < 1 or found["n_embd"] % n_head:
        raise ModelLoadError(
            f"{bundle.prefix.name} in {folder} does not have GPT-2's shapes (layers "
            f"{sorted(layers)[:5]}, width {found['n_embd']}, {n_head} heads): botkit reads OpenAI's "
            "GPT-2 layout only."
        )
    eot = found["n_vocab"] - 1  # GPT-2's <|endoftext|> is its last token; replaced by the tokenizer's own below
    return GPT2Config(
        vocab_size=found["n_vocab"],
        n_positions=found["n_ctx"],
        n_embd=found["n_embd"],
        n_layer=found["n_layer"],
        n_head=n_head,
        bos_token_id=eot,
        eos_token_id=eot,
    )


def _state_dict(bundle: Bundle, config: GPT2Config) -> dict[str, torch.Tensor]:
    c, vocab = config.n_embd, config.vocab_size
    expected = {
        "model/wte": ("transformer.wte.weight", (vocab, c)),
        "model/wpe": ("transformer.wpe.weight", (config.n_positions, c)),
        "model/ln_f/g": ("transformer.ln_f.weight", (c,)),
        "model/ln_f/b": ("transformer.ln_f.bias", (c,)),
    }
    shapes = {
        "ln_1/g": (c,),
        "ln_1/b": (c,),
        "ln_2/g": (c,),
        "ln_2/b": (c,),
        "attn/c_attn/w": (1, c, 3 * c),
        "attn/c_attn/b": (3 * c,),
        "attn/c_proj/w": (1, c, c),
        "attn/c_proj/b": (c,),
        "mlp/c_fc/w": (1, c, 4 * c),
        "mlp/c_fc/b": (4 * c,),
        "mlp/c_proj/w": (1, 4 * c, c),
        "mlp/c_proj/b": (c,),
    }
    for i in range(config.n_layer):
        for tf_name, hf_name in BLOCK_NAMES.items():
            expected[f"model/h{i}/{tf_name}"] = (f"transformer.h.{i}.{hf_name}", shapes[tf_name])
    state = {}
    for tf_name, (hf_name, shape) in expected.items():
        entry = bundle.entries.get(tf_name)
        if entry is None:
            raise ModelLoadError(
                f"{bundle.prefix.name} has no {tf_name}: it is not a complete GPT-2 checkpoint, copy it again."
            )
        if entry.shape != shape:
            raise ModelLoadError(
                f"{tf_name} in {bundle.prefix.name} has shape {list(entry.shape)}, not {list(shape)} "
                "as hparams.json implies: copy the hparams.json of this model."
            )
        values = torch.from_numpy(bundle.read(tf_name)).float()
        state[hf_name] = values[0] if len(shape) == 3 else values  # (1, in, out) -> Conv1D's (in, out)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return state


def folder_tokenizer(folder: Path, vocab_size: int, n_ctx: int) -> PreTrainedTokenizerBase:
    """The byte-level BPE tokenizer of encoder.json + vocab.bpe (OpenAI's files: the same content as
    transformers' vocab.json + merges.txt); without them, the bundled GPT-2 tokenizer if it fits."""

    encoder_path, merges_path = folder / "encoder.json", folder / "vocab.bpe"
    if not encoder_path.is_file() or not merges_path.is_file():
        if vocab_size != 50257:
            raise ModelLoadError(
                f"{folder} has no encoder.json and vocab.bpe, and its {vocab_size}-token vocabulary "
                "is not GPT-2's: copy them from where the model was trained."
            )
        log.warning("%s has no encoder.json/vocab.bpe; using the bundled GPT-2 tokenizer.", folder)
        return gpt2_tokenizer()
    try:
        vocab = json.loads(encoder_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested deep
        raise ModelLoadError(
            f"{encoder_path.name} or {merges_path.name} in {folder} cannot be read as OpenAI's "
            "tokenizer files: copy them again."
        ) from exc
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    if (
        not isinstance(vocab, dict)
        or not all(isinstance(k, str) and isinstance(v, int) and 0 <= v < vocab_size for k, v in vocab.items())
        or any(len(m) != 2 for m in merges)
    ):
        raise ModelLoadError(
            f"encoder.json or vocab.bpe in {folder} does not fit this model's {vocab_size}-token "
            "vocabulary: copy the files it was trained with."
        )
    if END_OF_TEXT not in vocab:
        raise ModelLoadError(
            f"encoder.json in {folder} has no {END_OF_TEXT} token, which GPT-2 needs: copy the file "
            "the model was trained with."
        )
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=n_ctx)
    return finish_tokenizer(tokenizer)
