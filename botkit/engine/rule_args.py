"""The rules' per-request arguments as vLLM carries them (`vllm_xargs`, its SamplingParams.extra_args):
`to_xargs` on botkit's side, `from_xargs` in the logits processor. Plain data, no torch, so the remote
backend sends them without loading torch."""

from __future__ import annotations

import math

from botkit.errors import InputError
from botkit.params import SamplingParams

# The SamplingParams fields the rules read, sent as `vllm_xargs` (vLLM accepts str, int, float and
# lists of them; booleans go as 0 / 1). temperature, top_k, stop and max_tokens are vLLM's own request
# fields, which the processor reads from its SamplingParams; vLLM's own repetition / presence /
# frequency penalties and min_p must then stay neutral in the request, or they apply twice.
XARGS_FIELDS = (
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "no_repeat_ngram_size",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_sequence_breakers",
    "min_tokens",
    "min_p",
    "typical_p",
    "unique",
)
XARGS_PREFIX = "botkit_"  # vllm_xargs is shared by every processor a server runs
XARGS_MARKER = "botkit_rules"  # always sent: a request without it is not botkit's and no rule touches it
XARGS_VERSION = 1
_DEFAULTS = SamplingParams()


def to_xargs(params: SamplingParams) -> dict:
    """The rules' fields of `params` that differ from their defaults, JSON-safe, for `vllm_xargs`."""
    out = {XARGS_MARKER: XARGS_VERSION}
    for name in XARGS_FIELDS:
        value = getattr(params, name)
        if value != getattr(_DEFAULTS, name):
            out[XARGS_PREFIX + name] = (
                list(value) if isinstance(value, tuple) else int(value) if isinstance(value, bool) else value
            )
    return out


def from_xargs(d: dict | None, **base) -> SamplingParams:
    """The inverse of to_xargs, validating hostile input (an InputError names what is wrong); `base`:
    fields the caller knows otherwise (vLLM's temperature, top_k, max_new_tokens). Keys without the
    prefix belong to other processors and are ignored."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise InputError("vllm_xargs must be an object.")
    fields = dict(base)
    if d.get(XARGS_MARKER, XARGS_VERSION) != XARGS_VERSION:
        raise InputError(
            f"{XARGS_MARKER} must be {XARGS_VERSION}: this server's botkit is another version than the client's."
        )
    for key, value in d.items():
        if not isinstance(key, str) or not key.startswith(XARGS_PREFIX) or key == XARGS_MARKER:
            continue
        name = key[len(XARGS_PREFIX) :]
        if name not in XARGS_FIELDS:
            raise InputError(
                f"Unknown botkit rule argument {key[:60]!r}: use one of "
                f"{', '.join(XARGS_PREFIX + f for f in XARGS_FIELDS)}."
            )
        fields[name] = _typed(name, value)
    try:
        return SamplingParams(**fields)
    except TypeError:
        raise InputError("A botkit rule argument has the wrong type: use numbers for the numeric fields.") from None


def _typed(name: str, value):
    kind = type(getattr(_DEFAULTS, name))
    if kind is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{XARGS_PREFIX}{name} must be a list of strings.")
        return tuple(value)
    if kind is bool:
        if value not in (0, 1) or isinstance(value, float):
            raise InputError(f"{XARGS_PREFIX}{name} must be 0 or 1.")
        return bool(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is float and not math.isfinite(value)):
        raise InputError(f"{XARGS_PREFIX}{name} must be a {'whole number' if kind is int else 'number'}.")
    return value
