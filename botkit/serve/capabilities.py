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

import json
import logging

from botkit.errors import GenerationError

log = logging.getLogger("botkit.remote")

RULES = (
    "botkit's per-token rules (the UTF-8 mask, unique's copy rule, no_repeat_ngram_size, DRY, typical_p, min_tokens)"
)
LOGPROBS = "candidates' scores (log-probabilities)"
SAMPLER_PROBES = {"repetition_penalty": 1.1, "min_p": 0.01, "presence_penalty": 0.1, "frequency_penalty": 0.1}
# the processor refuses a rule it does not know (rule_args.from_xargs)
BAD_XARGS = {"botkit_rules": 1, "botkit_probe": 1}


async def probe(client) -> list[str]:
    """The names of what `client`'s server cannot honour (empty when it honours everything)."""
    unsupported = []
    client.has_rules = await _has_rules(client)
    if not client.has_rules:
        unsupported.append(RULES)
    if not await _has_logprobs(client):
        unsupported.append(LOGPROBS)
    if not client.has_rules:  # then the samplers vLLM has go as its own fields, one probe each
        client.native_samplers = {name for name, on in SAMPLER_PROBES.items() if await _accepts(client, {name: on})}
        unsupported += [name for name in SAMPLER_PROBES if name not in client.native_samplers]
    return unsupported


def unsupported_sentence(server: str, unsupported: list[str]) -> str:
    return (
        f"The model server {server} cannot honour {'; '.join(unsupported)}: chats that set them get replies "
        "without them. "
        "Start vLLM with --logits-processors botkit.engine.vllm_rules:BotkitRules and botkit installed in its venv "
        '(README, "Scale"), or use backend = "vllm" or "local".'
    )


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


async def _has_rules(client) -> bool:
    """The processor refuses the unknown rule, naming it; a server without it ignores vllm_xargs (vLLM)
    or refuses the field itself (botkit's web API)."""
    try:
        status, body = await _post(client, {"vllm_xargs": BAD_XARGS})
    except GenerationError:
        return False
    return status == 400 and "botkit_probe" in json.dumps(body)


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
