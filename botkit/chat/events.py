"""What an adapter hands the conversation layer, and what it gets back: plain data and a protocol.

An adapter turns each platform event into a `ChatEvent` and gives a `Replier` that answers it; it
describes its platform once in a `Platform`. Nothing here knows any SDK.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol


async def _not_admin() -> bool:
    return False


@dataclass(frozen=True)
class ChatEvent:
    """One message (or command) on a platform, as the conversation layer needs to see it."""

    chat_id: str
    event_id: str  # the platform's message id (interaction id for a Discord slash command): unique in the chat
    user_id: str
    user_name: str
    text: str  # as written, mentions of the bot taken out; a command's arguments when `command` is set
    is_private: bool = False  # a direct message / private chat: every message in it is for the bot
    mentions_bot: bool = False
    replies_to_bot: bool = False  # a reply to one of the bot's messages
    from_bot: bool = False  # another bot (or the bot itself): never answered, so bots cannot loop
    command: str | None = None  # "gen", "settings", ... when the platform marked the message as a command
    allowed: bool = True  # inside the configured allowlists (servers, channels, chats, DMs)
    is_admin: Callable[[], Awaitable[bool]] = field(default=_not_admin, repr=False)  # may change the chat's settings


class Replier(Protocol):
    """Answers one event on its platform. Each method returns the platform's id of the message it
    sent or edited; failures raise the SDK's exceptions (the conversation layer logs them)."""

    async def reply(self, text: str, *, private: bool = False) -> str:
        """Send `text` as a reply to the event's message (`private`: only the asker sees it, where the platform can)."""
        ...

    async def edit(self, message_id: str, text: str) -> str:
        """Replace the text of a message this replier sent."""
        ...

    async def typing(self) -> None:
        """Show "typing…" (or "thinking…") once; the conversation layer repeats it while it waits."""
        ...

    async def draft(self, draft_id: int, text: str) -> bool:
        """Show `text` as the reply being written (`draft_id`: the same for one reply, never 0; "" shows
        "thinking") where the chat has drafts; False, sending nothing, where it has none: then a streamed
        reply is sent early and edited instead."""
        ...

    async def delete(self, message_id: str) -> None:
        """Delete a message this replier sent (a streamed part the final reply no longer needs)."""
        ...


@dataclass
class Platform:
    """What the conversation layer needs to know about a platform; `bot_name` is filled in once connected."""

    name: str  # "discord", "telegram", "console": the store's platform column
    max_chars: int  # one message's limit, in UTF-16 units
    max_parts: int = 3  # a long reply is split into at most this many messages
    command_prefix: str = "!gen"  # a text command that works everywhere ("" = none)
    usernames_ping: bool = False  # "@name" in a text notifies that user (Telegram)
    typing_interval_s: float = 5.0
    queue_notice_s: float = 5.0
    admin_user_ids: tuple[str, ...] = ()  # may change settings in every chat
    admins: str = "this chat's admins"  # who else may, in the platform's words
    bot_name: str = "bot"  # its name in channel context and help
    mention_hint: str = "mention me"  # how to address the bot, for /help
    # A streamed reply (chat setting `stream`) changes at most once per this many seconds, in private
    # chats and in groups, to stay inside the platform's rate limits; None: the platform cannot stream.
    stream_interval_s: float | None = None
    group_stream_interval_s: float | None = None
