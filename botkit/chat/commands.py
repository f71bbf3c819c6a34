"""The chat commands, the same on every platform: /gen /settings /reset /stats /help /privacy /forget.

An adapter passes a command's name and its arguments as text (`/settings temperature 0.7`: name
"settings", text "temperature 0.7"); every answer goes through the conversation's outbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import TYPE_CHECKING

from botkit.chat.events import ChatEvent, Replier
from botkit.errors import BotkitError
from botkit.params import ChatSettings

if TYPE_CHECKING:
    from botkit.chat.conversation import Conversation

SETTING_KEYS = [f.name for f in fields(ChatSettings)]
COMMANDS = {  # name -> what it does, as platforms list them
    "gen": "Continue the text after the command",
    "settings": "Show this chat's settings, or set one: /settings temperature 0.7",
    "reset": "Forget this chat's conversation",
    "stats": "Queue depth, speed and latency",
    "help": "How to talk to this bot",
    "privacy": "What the bot keeps about you, and for how long",
    "forget": "Erase your messages here (/forget all: everyone's, admins only)",
}

Command = Callable[["Conversation", ChatEvent, Replier, ChatSettings], Awaitable[None]]


async def settings_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    words = event.text.split(maxsplit=1)  # NAME VALUE; the value may contain spaces
    if not words:
        lines = "\n".join(f"{k} = {v!r}" for k, v in settings.to_dict().items())
        await conv.say(
            replier,
            f"Settings for this chat:\n{lines}\nChange one with /settings NAME VALUE ({conv.platform.admins} only).",
            private=True,
        )
    elif words[0] not in SETTING_KEYS:
        await conv.say(replier, f"Unknown setting {words[0]!r}: use one of {', '.join(SETTING_KEYS)}.", private=True)
    elif len(words) == 1:
        await conv.say(replier, f"{words[0]} = {getattr(settings, words[0])!r}", private=True)
    elif not await conv.may_administer(event):
        await conv.say(replier, f"Only {conv.platform.admins} can change this chat's settings.", private=True)
    else:
        try:
            changed = await conv.chats.update_settings(conv.platform.name, event.chat_id, **{words[0]: words[1]})
        except BotkitError as exc:
            await conv.say(replier, str(exc), private=True)
        else:
            await conv.say(replier, f"{words[0]} is now {getattr(changed, words[0])!r}.")


async def reset_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    await conv.chats.reset_context(conv.platform.name, event.chat_id)
    await conv.say(replier, "Done: I forgot this chat's conversation; my next reply starts fresh.")


async def stats_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    await conv.say(replier, conv.core.stats().summary(), private=True)


async def help_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    prefix = conv.platform.command_prefix
    await conv.say(
        replier,
        (
            f"I continue text with a GPT-2 model. In a group, {conv.platform.mention_hint}, reply to one of my "
            "messages, "
            f"or write /gen TEXT{f' or {prefix} TEXT' if prefix else ''}; in a private chat just write.\n"
            "/settings shows this chat's settings (admins: /settings NAME VALUE), /reset forgets the conversation, "
            "/stats shows the queue and speed, /privacy says what I keep about you, /forget erases it."
        ),
        private=True,
    )


async def privacy_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    days = conv.chats.config.store.retention_days
    kept = f"for {days:g} days, then erased" if days else "until erased (this bot's operator set no time limit)"
    room = ""
    if settings.use_context and settings.context == "channel":
        room = (
            f" In this chat I also keep the last {conv.chats.config.conversation.max_channel_messages} messages"
            " not addressed to me, with their authors' names, to follow the conversation."
        )
    if settings.dataset_opt_in:
        dataset = (
            " This chat has opted in to training data: what is kept from messages sent here since then may be "
            "exported,"
            " without ids, to train the bot's model."
        )
    else:
        dataset = (
            " Nothing from this chat is used as training data unless its admins opt in (/settings "
            "dataset_opt_in on),"
            " and then only messages sent from that moment on."
        )
    await conv.say(
        replier,
        (
            "I keep every message that asks me for a reply, with your user id and name, and my reply, in this bot's "
            f"database, {kept}.{room}{dataset} /forget erases yours in this chat; its admins can erase everyone's with "
            "/forget all."
        ),
        private=True,
    )


async def forget_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    scope = event.text.strip().lower()
    chats, platform = conv.chats, conv.platform.name
    if scope not in ("", "all"):
        await conv.say(
            replier,
            "Write /forget to erase your messages here, or /forget all to erase everyone's (admins only).",
            private=True,
        )
    elif scope == "all" and not await conv.may_administer(event):
        await conv.say(replier, f"Only {conv.platform.admins} can erase everyone's messages here.", private=True)
    elif scope == "all":
        erased = await chats.forget(platform, event.chat_id)
        await conv.say(replier, f"Done: I erased {_messages(erased)} I kept from this chat, and my replies to them.")
    else:
        erased = await chats.forget(platform, event.chat_id, event.user_id)
        await conv.say(
            replier,
            f"Done: I erased {_messages(erased)} I kept from you in this chat, and my replies to them.",
            private=True,
        )


def _messages(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


async def gen_command(conv: Conversation, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
    await conv.gen(event, event.text, replier, settings)


HANDLERS: dict[str, Command] = {
    "gen": gen_command,
    "settings": settings_command,
    "reset": reset_command,
    "stats": stats_command,
    "help": help_command,
    "start": help_command,
    "privacy": privacy_command,
    "forget": forget_command,
}
