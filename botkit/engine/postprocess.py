"""After a step's tokens are drawn: each row's text grows, stop strings and lengths end rows, and
the new text that is safe to hand out becomes an event (nano-vllm's `Scheduler.postprocess`, plus
detokenising). Judged rows hand out nothing here: their text goes out once judged (judging.py)."""

from __future__ import annotations

from botkit.engine.sequence import Event, Sequence


class Postprocessor:
    def __init__(self, eos: int, token_bytes, tokenizer):
        """`token_bytes`: token_bytes.TokenBytes of the tokenizer, or None (not byte level: decode whole)."""
        self.eos, self.token_bytes, self.tokenizer = eos, token_bytes, tokenizer

    def detokenizer(self):
        return self.token_bytes.detokenizer() if self.token_bytes else None

    def process(self, seqs: list[Sequence], tokens: list[int]) -> tuple[list[Event], list[Sequence]]:
        """Append each row's token; returns the events to hand out and the rows that finished."""
        events, done = [], []
        for seq, token in zip(seqs, tokens, strict=True):
            self.append(seq, token)
            if seq.finish_reason:
                done.append(seq)
            if seq.is_judged:
                continue
            delta = self.take_delta(seq)
            if delta or seq.finish_reason:
                events.append(Event(seq, delta, seq.finish_reason is not None))
        return events, done

    def append(self, seq: Sequence, token: int) -> None:
        if token == self.eos:
            seq.finish_reason = "stop"
            return
        seq.generated.append(token)
        seq.rules.append(token)
        self.add_text(seq, token)
        if seq.finish_reason is None and len(seq.generated) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"

    def add_text(self, seq: Sequence, token: int) -> None:
        """Grow the reply's text by the new token (or decode it whole for a tokenizer that is not byte
        level); a stop string ends it, wherever it falls across tokens."""
        before = len(seq.text)
        if seq.detok is not None:
            seq.text += seq.detok.add(token)
        else:
            seq.text = self.tokenizer.decode(seq.generated)
        for stop in seq.params.stop:
            cut = seq.text.find(stop, max(0, min(before, len(seq.text)) - len(stop) + 1))
            if cut >= 0:
                seq.text, seq.finish_reason = seq.text[:cut], "stop"

    @staticmethod
    def take_delta(seq: Sequence) -> str:
        """New text that is safe to hand out: no half-decoded character, no possible stop-string start."""
        text = seq.text.rstrip("\ufffd")  # a multi-byte character not complete yet (or cut off at the end)
        if seq.finish_reason:
            seq.text = text
        else:
            hold = max(map(len, seq.params.stop), default=1) - 1  # a stop string may be starting here
            text = text[: len(text) - hold] if hold else text
        delta = text[seq.num_emitted :]
        seq.num_emitted = max(seq.num_emitted, len(text))
        return delta
