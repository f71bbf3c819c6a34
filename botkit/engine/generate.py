"""gpt-2-simple's `generate` / `generate_to_file`, on botkit's continuous-batching engine.

A gpt-2-simple script ports by replacing its session lines:

    sess = gpt2.start_tf_sess(); gpt2.load_gpt2(sess, run_name="run1")    # before
    sess = botkit.load_model(run_name="run1")                             # after
    botkit.generate(sess, prefix="<|startoftext|>", truncate="<|endoftext|>", nsamples=4, batch_size=2)

Unlike gpt-2-simple, `length` counts new tokens and may exceed the window, each sample stops at its
`truncate` string or end of text (its batch slot goes to the next sample at once), `include_prefix`
works without `truncate`, and `prefix` may be a list of different prompts.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from botkit.errors import GenerationError, InputError
from botkit.params import DRY_SEQUENCE_BREAKERS, SAMPLERS, SamplingParams

if TYPE_CHECKING:
    from botkit.model.loading import LoadedModel

DEFAULT_DELIM = "=" * 20 + "\n"


def generate(
    sess: LoadedModel | None = None,
    run_name: str | None = None,
    checkpoint_dir: str = "checkpoint",
    model_name: str | None = None,
    return_as_list: bool = False,
    truncate: str | None = None,
    destination_path: str | None = None,
    sample_delim: str = DEFAULT_DELIM,
    prefix: str | list[str] | None = None,
    seed: int | None = None,
    nsamples: int = 1,
    batch_size: int = 1,
    length: int = 1023,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 1.0,
    include_prefix: bool = True,
    repetition_penalty: float = 1.0,
    unique: bool = False,
    no_repeat_ngram_size: int = 0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    dry_multiplier: float = 0.0,
    dry_base: float = 1.75,
    dry_allowed_length: int = 2,
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS,
    min_tokens: int = 0,
) -> list[str] | None:
    """Generate `nsamples` texts per prefix, `batch_size` at a time, as gpt-2-simple does.

    Returns the texts when `return_as_list`; otherwise writes them to `destination_path` (or prints
    them), each followed by `sample_delim`. On a run trained on chat exports, `truncate` defaults to
    its chat format's (one message per sample); pass `truncate=""` for whole conversations.

    `unique=True` checks each sample against the run's training texts (its copy index) and its
    prefix, and draws one that copies again (up to 3 times), keeping the least copying: what
    gpt-2-simple's README asks you to do by hand. `no_repeat_ngram_size=n` never repeats an n-gram.

    Today's samplers (botkit/engine/rules.py): `min_p` (0.05 with temperature 1 is a common choice),
    `typical_p`, OpenAI's `presence_penalty` / `frequency_penalty`, DRY against verbatim loops
    (`dry_multiplier` 0.8 turns it on; `dry_base`, `dry_allowed_length`, `dry_sequence_breakers`), and
    `min_tokens`: no end of text and no `truncate` string before that many new tokens.
    """
    samplers = {name: value for name, value in locals().items() if name in SAMPLERS}
    if not isinstance(nsamples, int) or nsamples < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(
            f"nsamples and batch_size must be positive whole numbers, not {nsamples!r} and {batch_size!r}."
        )
    prefixes = [prefix] if prefix is None or isinstance(prefix, str) else list(prefix)
    if (nsamples * len(prefixes)) % batch_size:
        raise InputError(
            f"nsamples ({nsamples}) times the number of prefixes must be a multiple of batch_size "
            f"({batch_size}), as in gpt-2-simple."
        )
    base = check_sampling(
        length=length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        truncate=truncate,
        seed=seed,
        nsamples=nsamples * len(prefixes),
        unique=unique,
        no_repeat_ngram_size=no_repeat_ngram_size,
        **samplers,
    )
    if not return_as_list:
        check_destination(destination_path)
    from botkit.engine.engine import Engine  # torch loads here, not when botkit is imported
    from botkit.model.loading import load_model

    lm = sess or load_model(model_name, run_name=run_name, checkpoint_dir=checkpoint_dir)
    if truncate is None and getattr(lm, "chat_format", None) is not None:
        truncate = lm.chat_format.truncate  # a run trained on conversations: each sample is one message
        base = replace(base, stop=(truncate,) if truncate else ())
    engine = Engine(lm, max_batch_size=batch_size)
    samples = []  # (prefix, Sequence), in order
    for p in prefixes:
        ids = lm.tokenizer(p, verbose=False).input_ids if p else [lm.eos_token_id]  # no prefix: start from end of text
        for _ in range(nsamples):
            sample_seed = None if seed is None else seed + len(samples)
            samples.append((p, engine.add(ids, replace(base, seed=sample_seed))))
    while engine.has_work:
        engine.step()
    if failed := [seq for _, seq in samples if seq.finish_reason == "error"]:  # its text is cut short, not a sample
        raise GenerationError(
            f"{len(failed)} of {len(samples)} samples could not be generated "
            f"({failed[0].error.rstrip('.')}): "
            "try another seed, unique=False, or a model with a longer window."
        )

    texts = [((p or "") + seq.text if include_prefix else seq.text).lstrip("\n") for p, seq in samples]
    if return_as_list:
        return texts
    if destination_path:
        with open(destination_path, "w", encoding="utf-8") as f:
            f.writelines(text + "\n" + sample_delim for text in texts)
    else:
        for text in texts:
            sys.stdout.write(text + "\n" + sample_delim)
    return None


def check_sampling(
    *,
    length,
    temperature,
    top_k,
    top_p,
    repetition_penalty,
    truncate,
    seed,
    nsamples: int = 1,
    unique: bool = False,
    no_repeat_ngram_size: int = 0,
    **samplers,
) -> SamplingParams:
    """The sampling options as SamplingParams (without a seed), refused with a sentence before any model
    loads; the seeds `seed` to `seed + nsamples - 1` that the samples will use are checked too."""
    base = SamplingParams(
        max_new_tokens=length,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=(truncate,) if truncate else (),
        unique=unique,
        no_repeat_ngram_size=no_repeat_ngram_size,
        **samplers,
    )
    if seed is not None:
        for sample_seed in {seed, seed + max(nsamples, 1) - 1}:
            replace(base, seed=sample_seed)
    return base


def check_destination(destination_path: str | None) -> None:
    """The file the samples go to can be written: its folder exists and it is not a folder itself;
    checked before generating, not after the last sample."""
    if not destination_path:
        return
    path = Path(destination_path)
    if path.is_dir():
        raise InputError(f"The destination path {path} is a folder: give a file name, e.g. {path / 'samples.txt'}.")
    if not path.parent.is_dir():
        raise InputError(
            f"The folder {path.parent} of the destination path does not exist: create it first or choose another path."
        )


def generate_to_file(sess: LoadedModel | None = None, destination_path: str = "gpt_2_gen_texts.txt", **kwargs) -> None:
    """gpt-2-simple's `generate_to_file`: `generate` writing every sample to one file."""
    Path(destination_path).parent.mkdir(parents=True, exist_ok=True)
    generate(sess, destination_path=destination_path, return_as_list=False, **kwargs)
