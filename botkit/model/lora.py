"""LoRA fine-tuning (peft) of GPT-2: adapters on the attention and MLP projections, runs that save
only the adapter, and loading a LoRA run as one plain GPT-2 with the adapter merged into its weights.

A LoRA run's folder is peft's adapter folder: adapter_config.json (whose base_model_name_or_path
names the base model: a hub name, or the absolute path of a local folder) and
adapter_model.safetensors, beside botkit's trainer state and tokenizer files.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from botkit.errors import ModelLoadError
from botkit.model.sources import ADAPTER_CONFIG, Source, resolve

# GPT-2's projections, all transformers `Conv1D` (weight stored (in, out), hence fan_in_fan_out):
# attn.c_attn (q, k, v in one), attn.c_proj, mlp.c_fc and mlp.c_proj ("c_proj" matches both).
TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]


def base_ref(source: Source) -> str:
    """How a LoRA run names its base: a hub name as is, a local folder by its absolute path (so the
    run loads from any working directory), a TensorFlow checkpoint other than the latest by its prefix."""
    if not source.is_local:
        return source.path
    path = Path(source.path).resolve()
    return str(path / source.checkpoint) if source.kind == "tf" and source.checkpoint != "latest" else str(path)


def add_lora(model, base: Source, rank: int, alpha: int, dropout: float) -> PeftModel:
    """Wrap `model` with new LoRA adapters (A random, B zero: the model's output is unchanged at first);
    every other weight is frozen. Seed torch first for a reproducible A."""
    model.name_or_path = base_ref(base)  # peft writes it to adapter_config.json as base_model_name_or_path
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        lora_dropout=dropout,
        target_modules=TARGET_MODULES,
        fan_in_fan_out=True,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _peft_on_transformers5():
        return get_peft_model(model, config)


def read_adapter_config(run_dir: Path) -> dict:
    path = run_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested deep
        raise ModelLoadError(
            f"{path} cannot be read as JSON: the LoRA run is damaged, train it again or copy it again."
        ) from exc
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("base_model_name_or_path"), str)
        or not isinstance(config.get("r"), int)
    ):
        raise ModelLoadError(
            f"{path} does not name its base model and rank: it is not a LoRA run of `botkit finetune --lora`."
        )
    return config


def base_source(run_dir: Path) -> Source:
    """The model a LoRA run adapts (itself maybe a LoRA run: they stack), checked to end in a plain model."""
    source, chain = _base_of(run_dir), [run_dir.resolve()]
    link = source
    # walked once here, so a run naming itself or a cycle is a sentence, not a RecursionError
    while link.kind == "lora":
        path = Path(link.path).resolve()
        if path in chain:
            raise ModelLoadError(
                f"The LoRA run {run_dir} adapts {source.path}, and the chain of LoRA runs it names "
                "comes back to "
                f"{path}: point its adapter_config.json at the plain base model."
            )
        chain.append(path)
        link = _base_of(path)
    return source


def _base_of(run_dir: Path) -> Source:
    base = read_adapter_config(run_dir)["base_model_name_or_path"]
    try:
        return resolve(base)
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"The LoRA run {run_dir} adapts {base}, which cannot be loaded here "
            f"({str(exc).rstrip('.')}): "
            "put the base model back at that path, or convert the run on the machine that has it "
            "(`botkit convert --merge`)."
        ) from exc


def load_adapter(model, run_dir: Path, is_trainable: bool) -> PeftModel:
    """The run's adapter on `model` (its base), to train further (`is_trainable`) or to merge."""
    try:
        with _peft_on_transformers5():
            return PeftModel.from_pretrained(model, run_dir, is_trainable=is_trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"The LoRA adapter in {run_dir} does not fit its base model ({exc.__class__.__name__}): "
            "the run is damaged or its base changed."
        ) from exc


def merged(model: PeftModel):
    """The base model with the adapter added into its weights: a plain GPT2LMHeadModel again."""
    with torch.no_grad():
        return model.merge_and_unload()


@contextmanager
def _peft_on_transformers5():
    """peft 0.21 reads `is_gradient_checkpointing` when it wraps a model, which transformers 5.24
    deprecates (FutureWarning) in favour of `is_activation_checkpointing`: nothing botkit can change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
