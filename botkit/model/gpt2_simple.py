"""gpt-2-simple's remaining names, for scripts being ported: `download_gpt2` and `load_gpt2`.

    gpt2.download_gpt2(model_name="355M")                 botkit.download_gpt2(model_name="355M")
    sess = gpt2.start_tf_sess()
    gpt2.load_gpt2(sess, run_name="run1")                 sess = botkit.load_gpt2(run_name="run1")

Both read what gpt-2-simple wrote: `models/<name>` may hold OpenAI's TensorFlow download, and
`checkpoint/<run>` a gpt-2-simple run; neither needs TensorFlow. Light: nothing heavy is imported
until a model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from botkit.errors import InputError, ModelLoadError
from botkit.model.sources import GPT2_SIMPLE_NAMES, folder_kind, hub_unavailable, resolve

if TYPE_CHECKING:
    from botkit.model.loading import LoadedModel

HUB_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
]


def download_gpt2(model_dir: str = "models", model_name: str = "124M") -> str:
    """Put GPT-2 `model_name` ("124M", "355M", "774M" or "1558M") in `model_dir/model_name`, from the
    Hugging Face hub's copy of OpenAI's weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl); returns the
    folder. A folder already there (an earlier download, or OpenAI's own files) is kept as it is."""
    if model_name not in GPT2_SIMPLE_NAMES:
        raise InputError(
            f"model_name must be one of {', '.join(repr(n) for n in GPT2_SIMPLE_NAMES)}, not {model_name!r}."
        )
    folder, repo = Path(model_dir) / model_name, GPT2_SIMPLE_NAMES[model_name]
    if folder.is_dir() and folder_kind(folder) in ("hf", "tf"):
        return str(folder)
    why = hub_unavailable()
    if why:
        raise ModelLoadError(
            f"Downloading {model_name} (the hub's {repo}) needs the Hugging Face hub, but {why}: run "
            "it once while online, "
            f"or put OpenAI's files (model.ckpt.*, hparams.json, encoder.json, vocab.bpe) in "
            f"{folder}."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        snapshot_download(repo, local_dir=folder, allow_patterns=HUB_FILES)
    except (HfHubHTTPError, OSError) as exc:
        raise ModelLoadError(
            f"Downloading {repo} into {folder} failed ({exc.__class__.__name__}): check the "
            "connection and the free disk space, then try again."
        ) from exc
    return str(folder)


def load_gpt2(
    sess=None,
    checkpoint: str = "latest",
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    model_dir: str = "models",
    multi_gpu: bool = False,
    reuse: bool = False,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """gpt-2-simple's `load_gpt2`, returning the model to pass to `botkit.generate` as its `sess`.

    `model_name` loads `model_dir/model_name` (OpenAI's download or `download_gpt2`'s), otherwise the
    run `checkpoint_dir/run_name` (gpt-2-simple's or botkit's). `checkpoint` other than "latest"
    names one checkpoint in it: gpt-2-simple's `model-500`, or botkit's `checkpoint-500`. `sess`,
    `multi_gpu` and `reuse` are accepted and unused (TensorFlow's session; devices come from `device`).
    """
    from botkit.model.loading import load_model

    folder = Path(model_dir) / model_name if model_name else Path(checkpoint_dir) / run_name
    if not folder.is_dir():
        hint = (
            f"download it with download_gpt2(model_name={model_name!r})"
            if model_name
            else "check run_name and checkpoint_dir"
        )
        raise ModelLoadError(f"There is no model in {folder}: {hint}.")
    if checkpoint != "latest":
        folder = folder / checkpoint  # botkit's checkpoint-<step>/ folder, or gpt-2-simple's model-<step> prefix
    return load_model(resolve(folder), device=device, dtype=dtype)
