"""Reply splitting and mention defusing: pure functions, checked on examples and with hypothesis."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from botkit.chat.replies import ELLIPSIS, defuse_mentions, split_reply, utf16_len

TRICKY = st.lists(
    st.sampled_from(
        ["a", "b", " ", "\n", "é", "e\u0301", "👍🏽", "👨‍👩‍👧", "\u200b", "@everyone", "<@123>", "<@&9>", "\\*"]
    ),
    max_size=40,
).map("".join)


@given(text=TRICKY, limit=st.integers(2, 40))
def test_split_never_exceeds_the_limit_and_joins_back(text, limit):
    text = defuse_mentions(text)
    parts = split_reply(text, limit, max_parts=10_000)
    assert all(0 < utf16_len(p) <= limit for p in parts)
    if text.strip():
        assert "".join(parts) == text
    else:
        assert parts == []


@given(text=TRICKY, limit=st.integers(12, 40), max_parts=st.integers(1, 3))
def test_split_never_cuts_inside_a_character_or_mention(text, limit, max_parts):
    text = defuse_mentions(text)
    for part in split_reply(text, limit, max_parts):
        body = part.removesuffix(ELLIPSIS)
        assert not body.startswith(("\u0301", "\U0001f3fd", "\u200d"))  # no orphaned accent / skin tone / joiner
        assert not body.endswith(("\u200d", "<@", "<@\u200b", "@\u200b", "<@\u200b&"))
        assert body.count("<@") == body.count(">")  # mentions open and close in one part


def test_split_prefers_newlines_then_spaces():
    text = "first line\n" + "word " * 5
    assert split_reply(text, 16, 5) == ["first line\n", "word word word ", "word word "]


def test_split_caps_the_parts_and_says_so():
    parts = split_reply("word " * 1000, 2000, max_parts=2)
    assert len(parts) == 2
    assert parts[-1].endswith("word" + ELLIPSIS) and len(parts[-1]) <= 2000


def test_split_counts_utf16_units():
    assert split_reply("😀" * 3, 4, 5) == ["😀😀", "😀"]


def test_split_rejects_nonsense_limits():
    with pytest.raises(ValueError):
        split_reply("x", 1, 1)


@pytest.mark.parametrize(
    "raw",
    ["@everyone", "@here", "@Everyone", "<@123456789012345678>", "<@!123>", "<@&987>", "hi @everyone and <@&1>"],
)
def test_defuse_breaks_every_mass_or_id_mention(raw):
    defused = defuse_mentions(raw)
    for mention in ("@everyone", "@here", "<@1", "<@!", "<@&", "@Everyone"):
        assert mention not in defused
    assert defused.replace("\u200b", "") == raw
    assert defuse_mentions(defused) == defused


def test_defuse_leaves_ordinary_text_and_optionally_usernames():
    assert defuse_mentions("mail me@x.org, @bob") == "mail me@x.org, @bob"
    assert defuse_mentions("mail me@x.org, @bob", usernames=True) == "mail me@x.org, @\u200bbob"
