"""What a remote completions server can honour, asked once at start.

Each probe is a one-token request. A setting the server cannot honour is named in one sentence at
start (a warning) and in /healthz's details, never dropped silently:

- botkit's per-token rules (UTF-8 mask, unique's copy rule, no_repeat_ngram_size and the samplers
  vLLM lacks) need botkit's logits processor in the server: it refuses a request whose `vllm_xargs`
  it cannot read (400), where a server without it ignores them (200);
- `candidates` are scored by the log-probabilities of their tokens (`logprobs`);
- without that processor, the samplers vLLM runs itself (min_p, the penalties) are sent as its own
  request fields, which the server must not refuse.
"""

from __future__ import annotations

import logging

from botkit.errors import GenerationError

log = logging.getLogger("botkit.remote")

RULES = "botkit's per-token rules (the UTF-8 mask, unique's copy rule, no_repeat_ngram_size, DRY, typical_p, min_tokens)"
LOGPROBS = "candidates' scores (log-probabilities)"
SAMPLERS = "the samplers top_k, repetition_penalty, min_p, presence_penalty, frequency_penalty"
BAD_XARGS = {"botkit_rules": 1, "botkit_probe": 1}  # the processor refuses a rule it does not know (rules.from_xargs)


async def probe(client) -> list[str]:
    """The names of what `client`'s server cannot honour (empty when it honours everything)."""
    unsupported = []
    client.has_rules = not await _accepts(client, {"vllm_xargs": BAD_XARGS})
    if not client.has_rules:
        unsupported.append(RULES)
    if not await _has_logprobs(client):
        unsupported.append(LOGPROBS)
    samplers = {"top_k": 1, "repetition_penalty": 1.1, "min_p": 0.01, "presence_penalty": 0.1, "frequency_penalty": 0.1}
    if not client.has_rules and not await _accepts(client, samplers):
        unsupported.append(SAMPLERS)
    return unsupported


def unsupported_sentence(server: str, unsupported: list[str]) -> str:
    return (f"The model server {server} cannot honour {'; '.join(unsupported)}: chats that set them get replies without them. "
            "Start vLLM with --logits-processors botkit.engine.vllm_rules:BotkitRules and botkit installed in its venv "
            '(README, "Scale"), or use backend = "vllm" or "local".')


def _body(client, extra: dict) -> dict:
    return {"model": client.model, "prompt": "Hello", "max_tokens": 1, "temperature": 0} | extra


async def _post(client, extra: dict):
    """(status, JSON body or None) of one probe request; a server that cannot be reached raises."""
    try:
        async with client._request("POST", client.url, json=_body(client, extra)) as response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            return response.status, body
    except Exception as exc:  # noqa: BLE001 - a probe that fails says "cannot tell", never stops botkit
        log.warning("Could not ask %s what it supports (%s).", client.server, type(exc).__name__)
        raise GenerationError(str(exc)) from None


async def _accepts(client, extra: dict) -> bool:
    try:
        status, _ = await _post(client, extra)
    except GenerationError:
        return True  # cannot tell: the first real request will say
    return status < 400


async def _has_logprobs(client) -> bool:
    try:
        status, body = await _post(client, {"logprobs": 0})
    except GenerationError:
        return True
    choices = body.get("choices") if isinstance(body, dict) else None
    logprobs = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
    return status < 400 and isinstance(logprobs, dict) and bool(logprobs.get("token_logprobs"))
