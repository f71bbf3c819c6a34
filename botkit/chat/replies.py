"""Making a generated reply safe and sendable on a chat platform: pure functions, no SDK imports.

Order matters: `defuse_mentions` first, then `split_reply`, so a part never ends inside an escape.
"""

from __future__ import annotations

import re

import regex  # transformers' own dependency; its \X matches a user-perceived character (grapheme)

ELLIPSIS = "…"  # ends the last part when a reply had to be cut to max_parts

# Spans that must stay whole in one part: Discord mentions, channels, custom emoji and timestamps
# (escaped or not), defused @everyone/@here, a markdown backslash escape, then any grapheme cluster
# (a letter with its accents, an emoji with its skin tone or ZWJ sequence, "\r\n").
_ATOM = regex.compile(
    r"<@\u200b?[!&]?\d{1,20}>|<#\d{1,20}>|<a?:\w{1,32}:\d{1,20}>|<t:-?\d{1,20}(?::[tTdDfFR])?>"
    r"|@\u200b(?:everyone|here)|\\\X|\X",
    regex.IGNORECASE,
)
_ZWSP = "\u200b"
_MASS_OR_ID = re.compile(r"@(?=(?:everyone|here)|[!&]?\d)", re.IGNORECASE)
_ANY_AT = re.compile(r"(?<!\w)@(?=\w)")  # not the @ of an e-mail address


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: what Telegram counts, and never less than `len(text)`."""
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def defuse_mentions(text: str, *, usernames: bool = False) -> str:
    """Text that pings nobody even if the platform's allowed-mentions were set wrong.

    A zero-width space goes after the "@" of `@everyone`, `@here`, `<@id>`, `<@!id>` and `<@&id>`
    (as `discord.utils.escape_mentions` does), so they show as typed but are not parsed as
    mentions. `usernames=True` also breaks every `@name` (Telegram notifies `@username`).
    Idempotent: defusing twice changes nothing more.
    """
    text = _MASS_OR_ID.sub("@" + _ZWSP, text)
    if usernames:
        text = _ANY_AT.sub("@" + _ZWSP, text)
    return text


def split_reply(text: str, limit: int, max_parts: int) -> list[str]:
    """`text` cut into at most `max_parts` messages of at most `limit` UTF-16 units each.

    Cuts go after the last newline in a part, else after the last whitespace, when that keeps the
    part over half full; otherwise the cut is hard. A cut never falls inside a grapheme cluster
    (so never inside a multi-byte or multi-codepoint character) or a mention/escape, except that
    a single cluster longer than `limit` is broken between code points. Nothing is dropped or
    stripped: joined together the parts give `text` back, unless it needed more than `max_parts`,
    in which case the last part is cut at a word boundary where possible and ends with "…".
    Whitespace-only text gives no parts.
    """
    if limit < 2 or max_parts < 1:
        raise ValueError(f"split_reply needs limit >= 2 and max_parts >= 1, not {limit} and {max_parts}")
    if not text.strip():
        return []
    parts: list[list[str]] = []
    current: list[str] = []
    size = 0
    for atom in _atoms(text, limit):
        atom_size = utf16_len(atom)
        while size + atom_size > limit:  # current is not empty here: atom_size <= limit
            cut = _best_cut(current, limit)
            parts.append(current[:cut])
            current = current[cut:]
            size = sum(map(utf16_len, current))
            if len(parts) == max_parts:
                return _with_ellipsis(parts, limit)
        current.append(atom)
        size += atom_size
    parts.append(current)
    return ["".join(part) for part in parts if part]


def _atoms(text: str, limit: int):
    """Indivisible pieces of `text`, lazily (a 1 MB reply is only scanned as far as needed)."""
    for match in _ATOM.finditer(text):
        atom = match.group()
        if utf16_len(atom) <= limit:
            yield atom
        else:  # e.g. a letter with hundreds of combining marks: break it rather than exceed the limit
            yield from atom


def _best_cut(atoms: list[str], limit: int) -> int:
    """Index to cut `atoms` at: after a newline, else whitespace, in the second half; else at the end."""
    half = limit // 2
    for is_boundary in (lambda a: a in ("\n", "\r\n"), str.isspace):
        position = sum(map(utf16_len, atoms))
        for i in range(len(atoms) - 1, -1, -1):
            if position <= half:
                break
            if is_boundary(atoms[i]):
                return i + 1
            position -= utf16_len(atoms[i])
    return len(atoms)


def _with_ellipsis(parts: list[list[str]], limit: int) -> list[str]:
    """Make the last part end with ELLIPSIS within `limit`, at a word boundary if one is near."""
    last = parts.pop()
    while last and sum(map(utf16_len, last)) + utf16_len(ELLIPSIS) > limit:
        last.pop()
    last = last[: _best_cut(last, limit)]  # ends after whitespace in its second half, if there is any
    return ["".join(part) for part in parts] + ["".join(last).rstrip() + ELLIPSIS]
