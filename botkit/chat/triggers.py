"""When the bot speaks: one policy for every platform, pure functions of the event and the chat's settings.

`trigger` (a chat setting) decides which ordinary messages ask for a reply:

| trigger | private chat | group: mention / reply to the bot | group: other messages |
|---|---|---|---|
| always  | yes | yes | yes (an empty one, an image alone, no) |
| mention | yes | yes | with probability `random_reply_chance` |
| command | no  | no  | no |
| never   | no  | no  | no |

Commands (`/gen TEXT`, or the platform's text prefix such as `!gen TEXT`) are answered under every
trigger but `never`, where `/gen` gets a sentence saying so and the prefix nothing. Other bots are
never answered (no loops).
"""

from __future__ import annotations

from collections.abc import Callable

from botkit.chat.events import ChatEvent
from botkit.params import ChatSettings


def prefixed_text(text: str, prefix: str) -> str | None:
    """The text after the command prefix (`"!gen hello"` -> `"hello"`), or None if `text` does not start with it."""
    if prefix and (text == prefix or text.startswith((prefix + " ", prefix + "\n"))):
        return text[len(prefix) :].strip()
    return None


def wants_reply(event: ChatEvent, settings: ChatSettings, chance: Callable[[], float]) -> bool:
    """Whether an ordinary message (not a command) asks for a reply under the chat's trigger."""
    if event.from_bot or settings.trigger in ("never", "command"):
        return False
    if event.is_private or event.mentions_bot or event.replies_to_bot:
        return True  # addressed to the bot: even an empty one gets a sentence saying what to write
    if not event.text.strip():
        return False  # an image or a sticker alone is a prompt only when addressed to the bot
    if settings.trigger == "always":
        return True
    return settings.random_reply_chance > 0 and chance() < settings.random_reply_chance
