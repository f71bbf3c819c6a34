import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; set before huggingface_hub is imported
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend on 2 cores (subprocesses too)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm():
    """A tiny random GPT-2 (2 layers, width 32) with the bundled GPT-2 tokenizer, on CPU."""
    from botkit.model.loading import load_model

    return load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu", seed=0)
