"""Where a model comes from: a hub name, a local folder (transformers' files, an OpenAI download or a
gpt-2-simple run in TensorFlow's format), a run from `botkit finetune` (a LoRA run too), or the bundled
demo model. Resolved before torch and transformers are imported, so a wrong path or an unreachable
hub is one sentence within a second or two, not after seconds of imports and minutes of retries."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from botkit.errors import ModelLoadError

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
# gpt-2-simple's (and OpenAI's) model names -> the hub's copies of the same weights
GPT2_SIMPLE_NAMES = {
    "124M": "gpt2",
    "117M": "gpt2",
    "355M": "gpt2-medium",
    "345M": "gpt2-medium",
    "774M": "gpt2-large",
    "1558M": "gpt2-xl",
}
HUB_TIMEOUT_S = 1.5  # a hub that does not answer a TCP connect by then counts as unreachable


KINDS = ("hf", "tf", "lora")
ADAPTER_CONFIG = "adapter_config.json"  # peft's: a LoRA run of `botkit finetune --lora`


@dataclass(frozen=True)
class Source:
    path: str  # a local folder, or a hub name
    name: str  # what logs and /v1/models call the model
    is_local: bool
    local_files_only: bool = False  # a hub model already in the local cache, used without the network
    # "hf": transformers' files; "tf": an OpenAI or gpt-2-simple TensorFlow folder; "lora": a LoRA run (adapter + its
    # base)
    kind: str = "hf"
    checkpoint: str = "latest"  # "tf" only: which checkpoint in the folder (e.g. model-500)


def folder_kind(path: Path) -> str | None:
    """What a local folder holds, from its file names alone (cheap: no file is read)."""
    if (path / "config.json").is_file():
        return "hf"
    if (path / ADAPTER_CONFIG).is_file():
        return "lora"
    if any(path.glob("*.index")) or (path / "hparams.json").is_file():
        return "tf"  # OpenAI's models/124M: model.ckpt.index; gpt-2-simple's checkpoint/run1: model-<step>.index
    return None


def asset_dir(name: str) -> Path:
    """A folder shipped inside the package (`gpt2` tokenizer, `demo` model)."""
    return Path(str(resources.files("botkit") / "assets" / name))


# what errors call the three values
CLI_NAMES = {"model": "--model", "run_name": "--run-name", "checkpoint_dir": "--checkpoint-dir"}


def resolve(
    model: str | os.PathLike | Source | None,
    run_name: str | None = None,
    checkpoint_dir: str | os.PathLike = "checkpoint",
    names: dict[str, str] | None = None,
) -> Source:
    """The Source that `load_model` reads, or a ModelLoadError that says what to do instead; `names`
    are what the errors call model, run_name and checkpoint_dir (a config file's keys, say)."""
    names = {**CLI_NAMES, **(names or {})}
    if isinstance(model, Source):
        return model
    if model is None and run_name:
        path = Path(checkpoint_dir) / run_name
        kind = folder_kind(path) if path.is_dir() else None
        if kind is None:
            raise ModelLoadError(
                f"No trained model in {path}: check {names['run_name']} and "
                f"{names['checkpoint_dir']}, or train one with `botkit finetune`."
            )
        return Source(str(path), run_name, is_local=True, kind=kind)
    if model is None:
        path = asset_dir("demo")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                "The bundled demo model is missing from this install: pass --model gpt2 (online) or a "
                "local model folder."
            )
        return Source(str(path), "botkit-demo", is_local=True)
    path = Path(model).expanduser()
    if path.is_dir():
        kind = folder_kind(path)
        if kind is None:
            raise ModelLoadError(
                f"{path} has no config.json: point {names['model']} at a folder saved by "
                "`save_pretrained` or `botkit finetune`, "
                "an OpenAI download such as models/124M, or a gpt-2-simple run such as "
                "checkpoint/run1."
            )
        return Source(str(path), path.name, is_local=True, kind=kind)
    # a checkpoint prefix: models/124M/model.ckpt, checkpoint/run1/model-1000
    if path.with_name(path.name + ".index").is_file():
        return Source(str(path.parent), path.parent.name, is_local=True, kind="tf", checkpoint=path.name)
    if path.exists() or os.sep in str(model) or str(model).startswith("."):
        raise ModelLoadError(
            f"Model path {model} ({names['model']}) does not exist: check the path, or use a hub name such as gpt2."
        )
    return _hub_source(GPT2_SIMPLE_NAMES.get(str(model), str(model)))


def _hub_source(name: str) -> Source:
    from huggingface_hub import try_to_load_from_cache  # light: no torch

    is_cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    why = hub_unavailable()
    if why:
        if is_cached:
            return Source(name, name, is_local=False, local_files_only=True)
        raise ModelLoadError(
            f"{name!r} is a hub name, but {why} and it was never downloaded: download it once while "
            "online, "
            "or pass a local folder that holds config.json and the weights, e.g. --model ./my-gpt2."
        )
    return Source(name, name, is_local=False)


def hub_unavailable() -> str | None:
    """Why the Hugging Face hub cannot be used now, or None when it can."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    return None if hub_reachable(constants.ENDPOINT) else "the Hugging Face hub cannot be reached from here"


def hub_reachable(endpoint: str, timeout_s: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within `timeout_s` (name lookup included: it has no
    timeout of its own, so it runs in a thread that is left behind if it hangs)."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    finished, opened = threading.Event(), []

    def connect() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass
        finished.set()

    threading.Thread(target=connect, name="botkit-hub-check", daemon=True).start()
    finished.wait(timeout_s)
    return bool(opened)
