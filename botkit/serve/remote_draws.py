"""A judged request on a remote server, judged as the own engine judges it (botkit.engine.judging).

`candidates` samples are drawn as that many requests (the server batches them), sample i with seed
`seed + i` as in the engine, each with the log-probabilities of its tokens. A draw holding a banned
word or copying is drawn again with the engine's next seed, up to judging.MAX_RESAMPLES times; the
request then sends judging.best of all draws: never a banned one, then one that does not copy, then
the best score. Banned words are never sent to the server: they are checked here, on the text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

from botkit.engine import judging
from botkit.errors import GenerationError
from botkit.params import SamplingParams
from botkit.serve.backends import Completion, Job

NEXT_SEED = 0x9E3779B97F4A7C15  # the engine's step from one draw's seed to the next (engine.py _draw_again)


class _Encoding:
    """judging.judge reads a transformers-style tokenizer (`tokenizer(text).input_ids`); the remote
    backend's is a bare `tokenizers` one (no torch)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str, verbose: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.tokenizer.encode(text).ids)


async def judged_completion(backend, job: Job, prompt: str, params: SamplingParams) -> Completion:
    prompt_ids = backend.tokenizer.encode(prompt).ids
    one = dataclasses.replace(params, candidates=1)
    samples = await asyncio.gather(
        *(_sample(backend, prompt, prompt_ids, one, params.seed + i) for i in range(params.candidates))
    )
    attempts = [a for draws, _ in samples for a in draws]
    chosen = judging.best(attempts)
    if chosen is None:
        raise GenerationError(
            f"Generation failed (each of {len(attempts)} draws held a banned word); please try again."
        )
    first_token_at = time.time()
    job.on_text(chosen.text)  # one piece, once judged, as the own engine hands it out
    return Completion(
        chosen.text,
        chosen.finish_reason,
        samples[0][1],
        chosen.num_tokens,
        chosen.seed,
        first_token_at,
        num_draws=len(attempts),
        copies=chosen.copies,
    )


async def _sample(
    backend, prompt: str, prompt_ids: list[int], params: SamplingParams, seed: int
) -> tuple[list[judging.Attempt], int]:
    """The draws of one sample (the last is allowed, or the draws ran out) and the prompt's token count."""
    draws, num_prompt_tokens = [], len(prompt_ids)
    for _ in range(1 + judging.MAX_RESAMPLES):
        text, reason, num_tokens, logprob_sum, num_prompt_tokens = await _draw(
            backend, prompt, dataclasses.replace(params, seed=seed)
        )
        attempt = judging.judge(
            text,
            params,
            _Encoding(backend.tokenizer),
            backend.copy_index(),
            prompt_ids=prompt_ids,
            finish_reason=reason,
            num_tokens=num_tokens,
            seed=seed,
            mean_logprob=logprob_sum / max(1, num_tokens),
        )
        draws.append(attempt)
        if not (attempt.banned or attempt.copies) or params.temperature == 0:
            break
        seed = (seed + NEXT_SEED) % 2**63
    return draws, num_prompt_tokens


async def _draw(backend, prompt: str, params: SamplingParams) -> tuple[str, str, int, float, int]:
    text, last = [], None
    async for chunk in backend.client.stream(prompt, params, logprobs=True):
        text.append(chunk.text)
        last = chunk
    num_prompt_tokens = last.num_prompt_tokens if last.num_prompt_tokens is not None else backend.count_tokens(prompt)
    return "".join(text), last.finish_reason or "stop", last.num_tokens, last.logprob_sum or 0.0, num_prompt_tokens
