"""botkit: fine-tune a GPT-2, generate with gpt-2-simple's controls, and serve it to many chats at once.

Importing botkit is cheap: torch and transformers load when a model is first loaded or used.
"""

from botkit.engine.generate import generate, generate_to_file
from botkit.errors import BotkitError
from botkit.model.gpt2_simple import download_gpt2, load_gpt2
from botkit.train.finetune import finetune

_FROM_MODELS = ("LoadedModel", "gpt2_tokenizer", "load_model")

__all__ = ["BotkitError", "download_gpt2", "finetune", "generate", "generate_to_file", "load_gpt2", *_FROM_MODELS]


def __getattr__(name: str):
    if name not in _FROM_MODELS:
        raise AttributeError(f"module 'botkit' has no attribute {name!r}")
    from botkit.model import loading as models

    return getattr(models, name)
