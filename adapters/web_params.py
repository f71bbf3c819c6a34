"""Turn an HTTP JSON body into validated generation requests: the playground's form, OpenAI's
`/v1/completions` body and its `/v1/chat/completions` body (rendered with a ChatFormat). Pure
functions, no aiohttp: every refusal is an InputError whose str() is the one sentence the client
sees in `{"error": {"message": ...}}`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from botkit.chat_format import ChatFormat
from botkit.config import KIND_NAMES
from botkit.errors import InputError
from botkit.params import EXPECT_TEXT_MIN_TOKENS, STOP_LIMIT, SamplingParams
from botkit.prompting import fit_newest

_INT_LIMIT = 2**63  # every whole number a client sends is below this in size (torch's seeds, top_k and counts fit)
# OpenAI fields botkit cannot honour: accepted only at their neutral values, refused otherwise.
NEUTRAL_ONLY = (("logprobs", (None, 0)), ("echo", (None, False)), ("suffix", (None, "")), ("logit_bias", (None, {})))
# The samplers (rules.py) by their request names: OpenAI's presence / frequency penalties, vLLM's
# min_p, typical_p and min_tokens, and DRY by the names text-generation-webui and koboldcpp use.
SAMPLER_FIELDS = (
    ("presence_penalty", float, 0.0),
    ("frequency_penalty", float, 0.0),
    ("min_p", float, 0.0),
    ("typical_p", float, 1.0),
    ("min_tokens", int, 0),
    ("dry_multiplier", float, 0.0),
    ("dry_base", float, 1.75),
    ("dry_allowed_length", int, 2),
)
# The fields each route reads; any other is refused, so a misspelt `max_token` does not silently mean
# 16 tokens. `model` and `user` are accepted and ignored: one model is served, and callers are told
# apart by their address or key.
COMPLETION_FIELDS = frozenset(
    {
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "stop",
        "stream",
        "stream_options",
        "seed",
        "best_of",
        "top_k",
        "repetition_penalty",
        "model",
        "user",
        "dry_sequence_breakers",
        *(key for key, _ in NEUTRAL_ONLY),
        *(key for key, _, _ in SAMPLER_FIELDS),
    }
)
# The chat route takes the completions' fields, with messages instead of a prompt.
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "best_of", "echo", "suffix"}) | {"messages", "max_completion_tokens"}
ROLES = frozenset({"system", "developer", "user", "assistant"})
# Speaker names for messages without a `name`, in a run that has no names of its own (documented in the README)
DEFAULT_NAMES = {"user": "User", "assistant": "Assistant", "system": "System", "developer": "System"}
PLAYGROUND_FIELDS = frozenset(
    {"prefix", "length", "temperature", "top_k", "top_p", "nsamples", "truncate", "seed", "min_tokens"}
)
STREAM_OPTIONS = frozenset({"include_usage"})


@dataclass(frozen=True)
class CompletionRequest:
    """One HTTP request: `prompts × n` samples, choice `i * n + j` is sample j of prompt i."""

    prompts: tuple[str, ...]
    n: int
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with token counts

    def samples(self) -> list[tuple[str, SamplingParams]]:
        """(prompt, params) per choice index; with a seed, sample j uses seed + j so the n differ."""
        out = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = None if self.params.seed is None else self.params.seed + j
                out.append((prompt, _with_seed(self.params, seed)))
        return out


def parse_completion(body, *, max_n: int) -> CompletionRequest:
    """An OpenAI completions body (prompt, max_tokens, temperature, top_p, n, stop, stream, seed,
    presence_penalty, frequency_penalty; top_k, repetition_penalty, min_p, typical_p and min_tokens as
    vLLM's extensions; DRY's fields). OpenAI's defaults: 16 tokens, temperature 1."""
    body = _object(body)
    _known(
        body,
        COMPLETION_FIELDS,
        "OpenAI's completions fields, top_k, repetition_penalty, min_p, typical_p, min_tokens and dry_*",
    )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    else:
        raise InputError("prompt must be a string or a non-empty list of strings (token-id prompts are not supported).")
    n = _field(body, "n", int, 1)
    best_of = _field(body, "best_of", int, n)
    if best_of != n:
        raise InputError("best_of is not supported by this server: leave it out or make it equal to n.")
    return _openai_request(body, prompts, n, max_n, _field(body, "max_tokens", int, 16), ())


@dataclass(frozen=True)
class ApiMessage:
    role: str  # system | developer | user | assistant
    name: str  # the speaker's name as the model will see it ("" = the role's default)
    content: str


def parse_chat(body, *, max_n: int, default_stop: tuple[str, ...]) -> tuple[tuple[ApiMessage, ...], CompletionRequest]:
    """An OpenAI chat completions body: `messages` (role, content as text or text parts, optional
    name), and the completions route's samplers. Its prompt is left empty: `chat_prompt` renders it.
    Replies end at `default_stop` (the end of a message in the run's format) and at `stop`."""
    body = _object(body)
    _known(body, CHAT_FIELDS, "OpenAI's chat completions fields, top_k and repetition_penalty")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError('messages must be a non-empty list of {"role": ..., "content": ...} objects.')
    parsed = tuple(_chat_message(m, i) for i, m in enumerate(messages))
    max_tokens = _field(body, "max_completion_tokens", int, _field(body, "max_tokens", int, 16))
    if body.get("min_tokens") is None:  # a chat client shows the reply to a person: no empty one unless asked
        body = {**body, "min_tokens": EXPECT_TEXT_MIN_TOKENS}
    return parsed, _openai_request(body, ("",), _field(body, "n", int, 1), max_n, max_tokens, default_stop)


def _chat_message(message, index: int) -> ApiMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InputError(f"{where} must be an object whose role is one of {', '.join(sorted(ROLES))}.")
    unknown = sorted(set(message) - {"role", "content", "name"})
    if unknown:
        raise InputError(
            f"{where} has a field this server does not read ({_short(unknown[0])}): send role, content and name only."
        )
    content = message.get("content")
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise InputError(f"{where}.content must be text, or a list of text parts (images and audio are not supported).")
    name = message.get("name", "")
    if not isinstance(name, str):
        raise InputError(f"{where}.name must be a string.")
    return ApiMessage(message["role"], name, content)


def chat_prompt(messages: tuple[ApiMessage, ...], fmt: ChatFormat, budget_tokens: int, count_tokens) -> tuple[str, str]:
    """The conversation in the run's format, oldest messages dropped whole until it fits
    `budget_tokens`, then the assistant's turn; and the assistant's name. The assistant is named by
    its last message with a `name`, else DEFAULT_NAMES["assistant"]."""
    bot = next((m.name for m in reversed(messages) if m.role == "assistant" and m.name), DEFAULT_NAMES["assistant"])
    lines = [fmt.line(m.name or (bot if m.role == "assistant" else DEFAULT_NAMES[m.role]), m.content) for m in messages]
    # the last message always stays
    prompt = fit_newest(lines[:-1], lines[-1] + fmt.bot_turn(bot), budget_tokens, count_tokens)
    if count_tokens(prompt) > budget_tokens:
        raise InputError(
            f"The last message alone is longer than the model's window allows ({budget_tokens} tokens "
            "with max_tokens taken off): shorten it or ask for fewer tokens."
        )
    return prompt, bot


def _openai_request(
    body: dict, prompts: tuple[str, ...], n: int, max_n: int, max_tokens: int, default_stop: tuple[str, ...]
) -> CompletionRequest:
    """The fields both OpenAI routes share: neutral-only fields, n, the samplers, stream options."""
    for key, allowed in NEUTRAL_ONLY:
        if body.get(key) not in allowed:
            raise InputError(f"{key} is not supported by this server: leave it out.")
    if not 1 <= n * len(prompts) <= max_n:
        raise InputError(f"n × the number of prompts must be from 1 to {max_n}, not {n * len(prompts)}.")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise InputError('stream_options must be an object such as {"include_usage": true}.')
    _known(stream_options, STREAM_OPTIONS, "include_usage")
    stop = _stop(body.get("stop"))
    params = _sampling(
        max_new_tokens=max_tokens,
        temperature=_field(body, "temperature", float, 1.0),
        top_k=max(0, _field(body, "top_k", int, 0)),  # vLLM writes "off" as -1, botkit as 0
        top_p=_field(body, "top_p", float, 1.0),
        repetition_penalty=_field(body, "repetition_penalty", float, 1.0),
        stop=_with_default_stop(default_stop, stop),
        seed=_field(body, "seed", int, None),
        **{key: _field(body, key, kind, default) for key, kind, default in SAMPLER_FIELDS},
        **_breakers(body.get("dry_sequence_breakers")),
    )
    return CompletionRequest(
        prompts=prompts,
        n=n,
        params=params,
        stream=_field(body, "stream", bool, False),
        include_usage=_field(stream_options, "include_usage", bool, False),
    )


def parse_playground(body, *, max_n: int) -> CompletionRequest:
    """The playground form: prefix, length, temperature, top_k, top_p, nsamples, truncate, seed
    (gpt-2-simple's names) and min_tokens (default 1); a sample ends before `truncate` ("" = only at
    the end of text or length)."""
    body = _object(body)
    _known(body, PLAYGROUND_FIELDS, ", ".join(sorted(PLAYGROUND_FIELDS)))
    prefix = _field(body, "prefix", str, "")
    nsamples = _field(body, "nsamples", int, 1)
    if not 1 <= nsamples <= max_n:
        raise InputError(f"nsamples must be from 1 to {max_n}, not {nsamples}.")
    truncate = _field(body, "truncate", str, "")
    params = _sampling(
        max_new_tokens=_field(body, "length", int, 60),
        temperature=_field(body, "temperature", float, 0.8),
        top_k=_field(body, "top_k", int, 40),
        top_p=_field(body, "top_p", float, 0.95),
        stop=(truncate,) if truncate else (),
        seed=_field(body, "seed", int, None),
        # a person is looking: no empty sample by default
        min_tokens=_field(body, "min_tokens", int, EXPECT_TEXT_MIN_TOKENS),
    )
    return CompletionRequest(prompts=(prefix,), n=nsamples, params=params, stream=True)


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise InputError('The request body must be a JSON object such as {"prompt": "Once upon a time"}.')
    return body


def _known(body: dict, fields: frozenset[str], described: str) -> None:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InputError(f"Unknown field {_short(unknown[0])}: check its spelling; this route reads {described}.")


def _field(body: dict, key: str, kind: type, default):
    value = body.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 40.0 from a JavaScript number input
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise InputError(f"{key} must be a {KIND_NAMES[kind]}, not {_short(value)}.")
    if kind is int and not -_INT_LIMIT <= value < _INT_LIMIT:
        raise InputError(f"{key} is too large: send a whole number between -2^63 and 2^63 - 1.")
    return value


def _stop(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InputError("stop must be a string or a list of strings.")
    if len(value) > STOP_LIMIT:
        raise InputError(f"At most {STOP_LIMIT} stop strings are allowed, not {len(value)}.")
    return tuple(value)


def _with_default_stop(default_stop: tuple[str, ...], stop: tuple[str, ...]) -> tuple[str, ...]:
    both = tuple(dict.fromkeys((*default_stop, *stop)))
    if len(both) > STOP_LIMIT:
        raise InputError(
            f"At most {STOP_LIMIT - len(default_stop)} stop strings are allowed here (a reply also ends "
            "at the end of its message)."
        )
    return both


def _breakers(value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InputError('dry_sequence_breakers must be a list of strings such as ["\\n", ":"].')
    return {"dry_sequence_breakers": tuple(value)}


def _sampling(**fields) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except TypeError:  # a comparison with a value of the wrong kind; _field checks kinds first
        raise InputError("A sampling parameter has the wrong type: use numbers for the numeric fields.") from None


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return params if seed == params.seed else replace(params, seed=seed)


def _short(value) -> str:
    """A client's value echoed back in an error, cut short so a 60 kB field is not returned whole."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT:
        return "a number that large"  # repr of a 4,000-digit int is 4,000 characters
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
