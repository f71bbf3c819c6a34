"""Load a GPT-2 and its tokenizer from any source botkit accepts; the one loader used everywhere."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.activations import NewGELUActivation

from botkit.chat_format import ChatFormat
from botkit.errors import InputError, ModelLoadError
from botkit.model.sources import Source, resolve
from botkit.model.tokenizer import finish_tokenizer, gpt2_tokenizer

log = logging.getLogger("botkit")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = (*DTYPES, "int8")  # int8: float32 loaded, then its matmuls quantised (botkit/model/quantize.py), CPU only
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: GPT2LMHeadModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    chat_format: ChatFormat | None = None  # the run's chat_format.json: how it was trained to see a conversation
    path: Path | None = None  # the local folder it came from (its copy index, `copy_index.CopyIndex.load(path)`)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_context(self) -> int:
        """The model window in tokens (1024 for GPT-2)."""
        return self.model.config.n_positions

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"  # CPU matmuls in half precision are slower than in float32


def load_model(
    model: str | os.PathLike | GPT2Config | Source | None = None,
    *,
    run_name: str | None = None,
    checkpoint_dir: str | os.PathLike = "checkpoint",
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Load a model for generation or training.

    `model` is a Hugging Face hub name (`gpt2`, `distilgpt2`, ...), a local Hugging Face folder, an
    OpenAI download (`models/124M`) or gpt-2-simple run (`checkpoint/run1`) in TensorFlow's format
    (read without TensorFlow), a `GPT2Config` (a randomly initialised model, seeded with `seed`), or
    None: then `run_name` picks `checkpoint_dir/run_name`, and with neither the bundled demo model is
    used. A LoRA run loads as its base model with the adapter merged in. A folder without tokenizer
    files gets the bundled GPT-2 tokenizer. `dtype` "int8" (CPU only, for generation) quantises the
    matmuls' weights to int8 after loading (botkit/model/quantize.py).
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype not in DTYPE_NAMES:
        raise InputError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPE_NAMES)}.")
    if dtype == "int8" and torch.device(device).type != "cpu":
        raise InputError(
            f"int8 runs on CPU only, not on {device!r}: use --device cpu, or bfloat16 or float16 on a GPU."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} was asked for but no CUDA GPU is available: use --device cpu.")

    if isinstance(model, GPT2Config):
        torch.manual_seed(seed)
        loaded = LoadedModel(GPT2LMHeadModel(model), gpt2_tokenizer(), name="random-gpt2")
    else:
        loaded = _load_pretrained(resolve(model, run_name, checkpoint_dir))
    loaded.model.to(device=device, dtype=DTYPES.get(dtype, torch.float32)).eval()
    # GPT2LMHeadModel's name matches no loss of transformers': given labels it warns, then uses this
    loaded.model.loss_type = "ForCausalLM"
    fuse_gelu(loaded.model)
    if dtype == "int8":
        from botkit.model.quantize import quantize_int8

        quantize_int8(loaded.model)
    return loaded


class NewGELU(torch.nn.Module):
    """GPT-2's `gelu_new` without its five temporary tensors. Without gradients: the same ops in the
    same order, in place, so the output is the same bit for bit. In training: torch's one-kernel tanh
    GELU, the same formula with a fused backward (only last-bit rounding differs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.nn.functional.gelu(x, approximate="tanh")
        t = torch.pow(x, 3.0).mul_(0.044715).add_(x).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
        return (0.5 * x).mul_(t)


def fuse_gelu(model: torch.nn.Module) -> None:
    """Swap GPT-2's `gelu_new` modules for `NewGELU` (on this 2-core CPU, a layer's activation for a
    981-token step takes 4.2 ms instead of 10.3 ms). The saved config is unchanged."""
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            module.act = NewGELU()


def _load_pretrained(source: Source) -> LoadedModel:
    if source.kind == "tf":
        from botkit.model.tf_gpt2 import load_tf_gpt2

        model, tokenizer = load_tf_gpt2(Path(source.path), source.checkpoint)
        return LoadedModel(model, tokenizer, name=source.name)
    if source.kind == "lora":
        return _load_lora_run(source)
    from safetensors import SafetensorError  # light: the loader below imports it anyway

    options = {"local_files_only": True} if source.local_files_only else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **options)
    except SafetensorError as exc:  # truncated, empty, or a header that is not safetensors
        files = sorted(Path(source.path).glob("*.safetensors")) if source.is_local else []
        where = files[0] if len(files) == 1 else Path(source.path) / "*.safetensors"
        why = str(exc).removeprefix("Error while deserializing header: ")
        raise ModelLoadError(f"The weights file {where} is damaged ({why}): copy or save the model again.") from None
    except OSError as exc:
        if source.is_local:
            raise ModelLoadError(
                f"Could not read the model in {source.path} ({exc.__class__.__name__}): is the folder complete?"
            ) from exc
        raise ModelLoadError(
            f"Could not get {source.path!r} from the Hugging Face hub (no such model, or the download failed): "
            "check the name, or pass a local folder with --model."
        ) from exc
    if source.is_local and not any((Path(source.path) / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = gpt2_tokenizer()
    else:
        try:
            tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(source.path, **options))
        except OSError:
            log.warning("No usable tokenizer with %s; using the bundled GPT-2 tokenizer.", source.name)
            tokenizer = gpt2_tokenizer()
    if not source.is_local:
        return LoadedModel(model, tokenizer, name=source.name)
    return LoadedModel(model, tokenizer, source.name, ChatFormat.load(source.path), Path(source.path))


def _load_lora_run(source: Source) -> LoadedModel:
    """A LoRA run: its base model with the run's adapter merged into the weights (a plain GPT-2)."""
    from botkit.model.lora import base_source, load_adapter, merged

    run_dir = Path(source.path)
    base = _load_pretrained(base_source(run_dir))
    model = merged(load_adapter(base.model, run_dir, is_trainable=False))
    has_tokenizer = any((run_dir / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = finish_tokenizer(AutoTokenizer.from_pretrained(run_dir)) if has_tokenizer else base.tokenizer
    return LoadedModel(model, tokenizer, source.name, ChatFormat.load(run_dir), run_dir)
