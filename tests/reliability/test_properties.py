"""Property tests (hypothesis) for the pure parts: reply splitting, the engine's stop/truncate text
handling, prompt trimming to a token budget, config parsing. Few examples each, so the suite stays fast."""

import dataclasses
import json

import regex
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from botkit.chat.replies import defuse_mentions, split_reply, utf16_len
from botkit.config import BatchConfig, Config, DiscordConfig, LimitsConfig, WebConfig, load_config
from botkit.engine.engine import Engine, Sequence
from botkit.params import SamplingParams
from botkit.prompting import build_prompt

FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PIECES = [
    "a",
    "bc",
    " ",
    "\n",
    "é",
    "e\u0301",
    "😀",
    "👍🏽",
    "👨‍👩‍👧",
    "𝕏",
    "\u200b",
    "@everyone",
    "@here",
    "<@123>",
    "<@!45>",
    "<@&6789>",
    "\\*",
    "END",
    "。",
]
TEXT = st.lists(st.sampled_from(PIECES) | st.text(max_size=3), max_size=60).map("".join)
ESCAPED = regex.compile(r"<@\u200b[!&]?\d+>|@\u200b(?:everyone|here)", regex.IGNORECASE)


def cut_points(parts: list[str]) -> list[int]:
    points, at = [], 0
    for part in parts[:-1]:
        at += len(part)
        points.append(at)
    return points


@FEW
@given(text=TEXT, limit=st.integers(8, 60))
def test_split_reply_keeps_within_the_limit_and_joins_back(text, limit):
    text = defuse_mentions(text)
    parts = split_reply(text, limit, max_parts=10_000)
    assert all(0 < utf16_len(p) <= limit for p in parts)  # UTF-16: an astral character counts 2
    assert "".join(parts) == (text if text.strip() else "")


@FEW
@given(text=TEXT, limit=st.integers(12, 60))
def test_split_reply_never_cuts_a_character_or_a_mention_escape(text, limit):
    text = defuse_mentions(text)
    parts = split_reply(text, limit, max_parts=10_000)
    boundaries = {m.end() for m in regex.finditer(r"\X", text)}
    protected = [(m.start(), m.end()) for m in ESCAPED.finditer(text)]
    for point in cut_points(parts):
        assert point in boundaries, f"cut inside a character at {point}: {text[point - 2 : point + 2]!r}"
        assert not any(start < point < end for start, end in protected), f"cut inside a mention escape at {point}"
    for part in parts:
        part.encode("utf-16", "strict")  # no half surrogate pair (a lone surrogate would not encode)


@given(text=TEXT)
@FEW
def test_defusing_is_idempotent_and_leaves_nothing_that_pings(text):
    once = defuse_mentions(text)
    assert defuse_mentions(once) == once
    assert not regex.search(r"@(everyone|here)|<@[!&]?\d", once, regex.IGNORECASE)


# -- the engine's text: stop strings, partial characters, deltas -----------------------------------

STOPS = st.lists(st.sampled_from(["\n", "END", "。", "😀", "ab"]), max_size=2).map(tuple)
MODEL_TEXT = st.lists(st.sampled_from(PIECES + ["x", "EN", "D", "a", "b"]), min_size=1, max_size=30).map("".join)


def run_engine_text(engine: Engine, token_ids: list[int], stops: tuple[str, ...]) -> tuple[Sequence, list[str]]:
    """Feed tokens one at a time through the post-processor's add_text / take_delta as Postprocessor.process does."""
    params = SamplingParams(max_new_tokens=len(token_ids), stop=stops)
    seq = Sequence(0, [engine.eos], params, torch.Generator(), 0, detok=engine.token_bytes.detokenizer())
    deltas = []
    for token in token_ids:
        seq.generated.append(token)
        engine.post.add_text(seq, token)
        if seq.finish_reason is None and len(seq.generated) >= params.max_new_tokens:
            seq.finish_reason = "length"
        deltas.append(engine.post.take_delta(seq))
        if seq.finish_reason:
            break
    return seq, deltas


@FEW
@given(text=MODEL_TEXT, stops=STOPS)
def test_streamed_text_is_the_reply_and_stops_before_the_first_stop_string(tiny_lm, text, stops):
    engine = Engine(tiny_lm, max_batch_size=1)
    token_ids = tiny_lm.tokenizer(text).input_ids
    seq, deltas = run_engine_text(engine, token_ids, stops)
    consumed = tiny_lm.tokenizer.decode(seq.generated)
    assert "".join(deltas) == seq.text, "the stream differs from the reply"
    assert not any(s in seq.text for s in stops), "a stop string leaked into the reply"
    cuts = [consumed.find(s) for s in stops if s in consumed]
    if cuts:
        assert seq.finish_reason == "stop"
        assert seq.text == consumed[: min(cuts)]
    else:
        assert seq.text == consumed.rstrip("\ufffd")
    assert "\ufffd" not in seq.text or "\ufffd" in text  # no half-decoded character is handed out


# -- prompt trimming ----------------------------------------------------------------------------------

HISTORY = st.lists(st.tuples(TEXT, TEXT), max_size=8)


@FEW
@given(message=TEXT.filter(str.strip), history=HISTORY, budget=st.integers(1, 120))
def test_build_prompt_fits_the_budget_and_keeps_the_newest_history(tiny_lm, message, history, budget):
    def count(text: str) -> int:
        return len(tiny_lm.tokenizer(text).input_ids)

    template, separator = "User: {message}\nBot:", "\n"
    current = template.format(message=message)
    prompt = build_prompt(template, message, history, separator, budget, count)
    assert prompt.endswith(current)
    if count(current) <= budget:
        assert count(prompt) <= budget
    kept = prompt[: len(prompt) - len(current)]
    pieces = [template.format(message=m) + r + separator for m, r in history]
    suffixes = ["".join(pieces[i:]) for i in range(len(pieces) + 1)]
    assert kept in suffixes, "history was not trimmed from the oldest end"


# -- config parsing ---------------------------------------------------------------------------------

NAMES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
ENV_NAMES = st.from_regex(r"\A([A-Z_][A-Z0-9_]{0,11})?\Z")  # "" or an environment variable's name


def toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML also forbids a raw DEL


def to_toml(config: Config) -> str:
    lines = []
    for section in ("batch", "limits", "web", "discord"):
        lines.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str | int | float):
                text = toml_string(value) if isinstance(value, str) else repr(value)
            else:  # tuple of strings
                text = "[" + ", ".join(map(toml_string, value)) + "]"
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


CONFIGS = st.builds(
    Config,
    batch=st.builds(
        BatchConfig,
        max_size=st.integers(1, 512),
        max_queue=st.integers(1, 10**6),
        timeout_s=st.floats(0.001, 1e6, allow_nan=False),
    ),
    limits=st.builds(LimitsConfig, max_message_chars=st.integers(1, 10**6), user_per_minute=st.integers(0, 1000)),
    web=st.builds(WebConfig, enabled=st.booleans(), host=NAMES, port=st.integers(0, 65535), api_key_env=ENV_NAMES),
    discord=st.builds(
        DiscordConfig,
        token_env=st.sampled_from(["DISCORD_TOKEN", "BOT_TOKEN_2"]),
        admin_user_ids=st.lists(st.from_regex(r"\A[0-9]{1,20}\Z"), max_size=3).map(tuple),
        command_prefix=NAMES,
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=CONFIGS)
def test_config_survives_a_round_trip_through_toml(tmp_path, config):
    path = tmp_path / "bot.toml"
    path.write_text(to_toml(config), encoding="utf-8")
    anchored = dataclasses.replace(  # a config file's relative paths count from its folder
        config,
        model=dataclasses.replace(config.model, checkpoint_dir=str(tmp_path / config.model.checkpoint_dir)),
        store=dataclasses.replace(config.store, path=str(tmp_path / config.store.path)),
    )
    assert load_config(path) == anchored
