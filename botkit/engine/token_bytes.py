"""The bytes behind each token of a byte-level BPE tokenizer (GPT-2's, and those `botkit finetune
--train-tokenizer` makes), for two jobs on the hot path:

- incremental detokenization: a reply's text grows by the new token's bytes only (decoding the whole
  reply again on every token is quadratic in its length), multi-byte characters held back until whole;
- a UTF-8 mask: GPT-2 can sample a token that starts a multi-byte character and then one that does not
  continue it, which decodes to U+FFFD (7 of 10 Tang-poem samples at temperature 0.7). Each row keeps
  the state of its bytes in UTF-8's grammar, and sampling may only pick tokens that keep them valid.
"""

from __future__ import annotations

import codecs
import random
from functools import lru_cache

import torch

# UTF-8 (RFC 3629) as states: (continuation bytes still needed, lowest and highest allowed next byte,
# a byte excluded in that range or -1). U+FFFD itself (EF BF BD) is excluded too: GPT-2's vocabulary
# holds tokens that spell it (web text had it), and a reply showing "�" looks just as broken.
STATES = [
    (0, 0, 0, -1),
    (1, 0x80, 0xBF, -1),
    (2, 0x80, 0xBF, -1),
    (2, 0xA0, 0xBF, -1),
    (2, 0x80, 0x9F, -1),
    (3, 0x80, 0xBF, -1),
    (3, 0x90, 0xBF, -1),
    (3, 0x80, 0x8F, -1),
    (2, 0x80, 0xBF, 0xEF),
    (1, 0x80, 0xBF, 0xBD),
]
_STATE = {s: i for i, s in enumerate(STATES)}
_AFTER_EF = _STATE[(2, 0x80, 0xBF, 0xEF)]  # tag 0xEF: the lead byte was EF, so EF BF must not be followed by BD
INVALID = -1


def _after(state: int, byte: int) -> int:
    """The state after `byte`, or INVALID."""
    need, lo, hi, tag = STATES[state]
    if need:
        if not lo <= byte <= hi or (need == 1 and byte == tag):
            return INVALID
        if state == _AFTER_EF and byte == 0xBF:
            return _STATE[(1, 0x80, 0xBF, 0xBD)]
        return _STATE[(need - 1, 0x80, 0xBF, -1) if need > 1 else (0, 0, 0, -1)]
    if byte < 0x80:
        return 0
    if 0xC2 <= byte <= 0xDF:
        return _STATE[(1, 0x80, 0xBF, -1)]
    if byte == 0xEF:
        return _AFTER_EF
    if 0xE0 <= byte <= 0xEF:
        return _STATE[
            (2, 0xA0, 0xBF, -1) if byte == 0xE0 else (2, 0x80, 0x9F, -1) if byte == 0xED else (2, 0x80, 0xBF, -1)
        ]
    if 0xF0 <= byte <= 0xF4:
        return _STATE[
            (3, 0x90, 0xBF, -1) if byte == 0xF0 else (3, 0x80, 0x8F, -1) if byte == 0xF4 else (3, 0x80, 0xBF, -1)
        ]
    return INVALID  # a stray continuation byte, C0, C1, F5-FF


_TRANSITIONS = [[_after(s, b) for b in range(256)] for s in range(len(STATES))]


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (its `bytes_to_unicode`), inverted. Written out here:
    it is part of the tokenizer's definition, and transformers keeps it only in private modules."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class TokenBytes:
    def __init__(self, table: list[bytes], eos_token_id: int):
        self.table = table
        self.eos = eos_token_id
        self._masks: torch.Tensor | None = None  # (states, vocab): allowed
        self._blocked: torch.Tensor | None = None  # its negation, on the logits' device
        self._next: torch.Tensor | None = None

    @staticmethod
    def of(tokenizer) -> TokenBytes | None:
        """The table of a byte-level tokenizer, or None for any other (then text is decoded whole)."""
        return _table_for(tokenizer)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self.table)

    # -- the UTF-8 mask ------------------------------------------------------------------------------

    def build(self) -> TokenBytes:
        """The UTF-8 tables now rather than at the first step that needs them (a second for GPT-2's
        vocabulary, once per tokenizer: the first reply should not wait for it)."""
        if self._masks is None:
            self._build()
        return self

    def _build(self) -> None:
        """allowed (states, vocab) bool and next state (states, vocab), walking every token's bytes
        from every state once (~50k tokens x 8 states, a second at most, once per tokenizer)."""
        masks = torch.zeros(len(STATES), len(self.table), dtype=torch.bool)
        after = torch.full((len(STATES), len(self.table)), INVALID, dtype=torch.long)
        for token, data in enumerate(self.table):
            for start in range(len(STATES)):
                state = start
                for byte in data:
                    state = _TRANSITIONS[state][byte]
                    if state == INVALID:
                        break
                if state != INVALID and (token != self.eos or start == 0):  # the end may not cut a character
                    masks[start, token], after[start, token] = True, state
        self._masks, self._next = masks, after

    def blocked(self, states: list[int], device) -> torch.Tensor:
        """(rows, vocab) bool: the tokens each row may not take; (1, vocab) when every row is in one
        state (the usual case: all at a character boundary), so that it broadcasts instead of being copied."""
        if self._masks is None:
            self._build()
        if self._blocked is None or self._blocked.device != torch.device(device):
            self._blocked = (~self._masks).to(device)
        if all(state == states[0] for state in states):
            return self._blocked[states[0]].unsqueeze(0)
        return self._blocked[torch.tensor(states, device=device)]

    def next_state(self, state: int, token: int) -> int:
        if self._next is None:
            self._build()
        return int(self._next[state, token])


class Detokenizer:
    """A reply's text, one token at a time: `add` returns only the new complete characters."""

    def __init__(self, table: list[bytes]):
        self.table = table
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token: int) -> str:
        return self.decoder.decode(self.table[token])

    def flush(self) -> str:
        """Bytes of an unfinished character at the end (a reply cut by its length): U+FFFD, which the
        caller drops."""
        return self.decoder.decode(b"", final=True)


@lru_cache(maxsize=8)
def _table_for(tokenizer) -> TokenBytes | None:
    byte_of = _gpt2_byte_decoder()
    vocab_size = len(tokenizer)
    special = {i: t.content.encode("utf-8") for i, t in tokenizer.added_tokens_decoder.items()}
    table = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        if i in special:
            table.append(special[i])
        elif piece is None or any(c not in byte_of for c in piece):
            return None  # not byte-level BPE
        else:
            table.append(bytes(byte_of[c] for c in piece))
    rng = random.Random(0)  # check the table against the tokenizer's own decoding on random ids
    for _ in range(20):
        ids = [rng.randrange(vocab_size) for _ in range(12)]
        if b"".join(table[i] for i in ids).decode("utf-8", "replace") != tokenizer.decode(ids):
            return None
    return TokenBytes(table, tokenizer.eos_token_id)
