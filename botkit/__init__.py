"""botkit: fine-tune a GPT-2, generate with gpt-2-simple's controls, and serve it to many chats at once."""

from .errors import BotkitError
from .finetune import finetune
from .generate import generate, generate_to_file
from .models import LoadedModel, gpt2_tokenizer, load_model

__all__ = ["BotkitError", "finetune", "generate", "generate_to_file", "LoadedModel", "gpt2_tokenizer", "load_model"]
