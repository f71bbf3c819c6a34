"""What a chat dataset became before a step is trained: messages kept and dropped (by reason),
speakers, conversations, tokens, epochs at the chosen steps, and a few conversations exactly as the
model will see them. `botkit finetune --dry-run` prints it and stops; every run prints it first."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

NUM_SAMPLES = 3
MAX_SAMPLE_CHARS = 600  # a sample shows the shape of the text, not a whole day of chat
MAX_SPEAKERS = 100_000  # names remembered for the count; a hostile export must not grow this without end


@dataclass
class DataSummary:
    num_kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> messages
    speakers: set[str] = field(default_factory=set)
    num_conversations: int = 0
    samples: list[str] = field(default_factory=list)

    def keep(self, speaker: str) -> None:
        self.num_kept += 1
        if len(self.speakers) < MAX_SPEAKERS:
            self.speakers.add(speaker)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def conversation(self, text: str) -> None:
        self.num_conversations += 1
        if len(self.samples) < NUM_SAMPLES:
            self.samples.append(text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS] + " [...]")

    def report(
        self, num_train_tokens: int, num_val_tokens: int, tokens_per_step: int, steps: int, val_note: str = ""
    ) -> str:
        """The summary as lines of text for a person."""
        lines = []
        if self.num_conversations:
            total = self.num_kept + sum(self.dropped.values())
            lines.append(
                f"Chat messages: {self.num_kept:,} of {total:,} kept, from {len(self.speakers):,} speakers in "
                f"{self.num_conversations:,} conversations."
            )
            lines += [f"  dropped {n:,}: {reason}" for reason, n in self.dropped.most_common()]
        epochs = steps * tokens_per_step / max(1, num_train_tokens)
        held = f", {num_val_tokens:,} held out" if num_val_tokens else ""
        lines.append(
            f"Tokens: {num_train_tokens:,} to train on{held}. {steps:,} steps of {tokens_per_step:,} tokens "
            f"read the training part about {epochs:,.1f} times."
        )
        if epochs > 10:
            lines.append(
                "  That is many passes over small data: the model may learn it by heart; held-out loss "
                "and early stopping tell you when to stop."
            )
        if val_note:
            lines.append(val_note)
        for i, sample in enumerate(self.samples, 1):
            lines.append(f"--- conversation {i} as the model sees it ---\n{sample}")
        return "\n".join(lines)
