import os

import pytest
from transformers import GPT2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny random GPT-2 (2 layers, width 32) with the bundled GPT-2 tokenizer, on CPU."""
    from botkit.models import load_model

    return load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu", seed=0)
