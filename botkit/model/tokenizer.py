"""GPT-2's tokenizer from the files bundled with botkit (OpenAI's vocab.json and merges.txt), with no
network: as transformers' tokenizer for models and training (`gpt2_tokenizer`), and as a bare
`tokenizers` one where only counting and cutting text is needed (`count_tokenizer`, which loads
neither torch nor transformers: the remote backend runs without them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from botkit.model.sources import asset_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"


def gpt2_tokenizer() -> PreTrainedTokenizerBase:
    """OpenAI's GPT-2 BPE tokenizer, as transformers loads it."""
    from transformers import AutoTokenizer

    return finish_tokenizer(AutoTokenizer.from_pretrained(asset_dir("gpt2")))


def finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; padded columns are masked anyway
    tokenizer.padding_side = "left"  # GPT-2 samples from the last column
    return tokenizer


def count_tokenizer() -> Tokenizer:
    """The same ids as `gpt2_tokenizer` (end-of-text included), from the `tokenizers` library alone."""
    from tokenizers import ByteLevelBPETokenizer

    folder = asset_dir("gpt2")
    tokenizer = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.add_special_tokens([EOS])
    return tokenizer
