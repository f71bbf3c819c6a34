"""Discord adapter: discord.py's messages and slash commands in as `ChatEvent`s, the conversation
layer's texts out as replies (botkit/chat/conversation.py holds the policy). Needs the privileged Message
Content intent (developer portal → Bot). The client runs as a task in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re

import aiohttp
import discord
from botkit.adapters.discord_replier import NO_PINGS, ChannelReplier, InteractionReplier
from discord import app_commands

from botkit.chat.chats import Chats
from botkit.chat.commands import COMMANDS, SETTING_KEYS
from botkit.chat.conversation import Conversation
from botkit.chat.events import ChatEvent, Platform
from botkit.config import DiscordConfig
from botkit.errors import BotkitError, ConfigError

log = logging.getLogger("botkit.discord")

PLATFORM = "discord"
MAX_MESSAGE_CHARS = 2000  # Discord's limit for a message's content
# What the bot needs in a channel; replying to a message needs Read Message History.
PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, read_message_history=True
)


class DiscordAdapter:
    """`async with DiscordAdapter(chats, config.discord, token):` connects, answers, and disconnects."""

    def __init__(self, chats: Chats, config: DiscordConfig, token: str, *, chance=random.random):
        self.config, self.token = config, token
        platform = Platform(
            PLATFORM,
            MAX_MESSAGE_CHARS,
            config.max_reply_parts,
            config.command_prefix,
            typing_interval_s=config.typing_interval_s,
            queue_notice_s=config.queue_notice_s,
            admin_user_ids=config.admin_user_ids,
            admins="members with Manage Server",
            stream_interval_s=config.stream_interval_s,
            group_stream_interval_s=config.stream_interval_s,
        )
        self.conversation = Conversation(chats, platform, self._replier_for, chance=chance)
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        self.client = discord.Client(intents=intents, allowed_mentions=NO_PINGS)
        for handler in (self.on_message, self.on_connect, self.on_resumed, self.on_disconnect):
            self.client.event(handler)
        self.tree = app_commands.CommandTree(self.client)
        self.register_commands(self.tree)
        self._gateway: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> DiscordAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        """Log in, sync the slash commands, and connect the gateway; raise a BotkitError if that fails."""
        await self.conversation.__aenter__()
        try:
            await self.client.login(self.token)
            if self.config.sync_commands:
                await self.tree.sync()
            self._gateway = asyncio.create_task(self.client.connect(reconnect=True), name="discord-gateway")
            ready = asyncio.create_task(self._ready.wait())
            await asyncio.wait(
                {self._gateway, ready}, timeout=self.config.connect_timeout_s, return_when="FIRST_COMPLETED"
            )
            ready.cancel()
            if not self._ready.is_set():
                if self._gateway.done():
                    self._gateway.result()  # raises why the gateway gave up
                raise TimeoutError
        except BaseException as exc:
            await self.close()
            error = _startup_error(exc, self.config)
            raise error from (None if error is exc else exc)
        name = self.conversation.platform.bot_name = self.client.user.display_name
        self.conversation.platform.mention_hint = f"mention me (@{name})"
        invite = discord.utils.oauth_url(
            self.client.application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
        )
        log.info("Discord: connected as %s; invite it to a server with %s", self.client.user, invite)

    async def close(self) -> None:
        """Stop answering (requests in flight are answered after the restart), then disconnect."""
        await self.conversation.close()
        await self.client.close()
        if self._gateway is not None:
            await asyncio.gather(self._gateway, return_exceptions=True)

    # -- events in ---------------------------------------------------------------------------------

    async def on_connect(self) -> None:
        self._ready.set()
        self.conversation.connected()

    async def on_resumed(self) -> None:
        self.conversation.connected()

    async def on_disconnect(self) -> None:
        self.conversation.disconnected("disconnected from the gateway; reconnecting")

    async def on_message(self, message: discord.Message) -> None:
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # pins, joins, thread starts: system messages are not prompts
        me, ref = self.client.user.id, message.reference
        await self.conversation.handle(
            ChatEvent(
                chat_id=str(message.channel.id),
                event_id=str(message.id),
                user_id=str(message.author.id),
                user_name=message.author.display_name,
                text=re.sub(rf"<@!?{me}>", "", message.content).strip(),
                is_private=message.guild is None,
                mentions_bot=me in message.raw_mentions,
                replies_to_bot=ref is not None
                and isinstance(ref.resolved, discord.Message)
                and ref.resolved.author.id == me,
                from_bot=message.author.bot or message.webhook_id is not None,
                allowed=self._allowed(message.guild and message.guild.id, message.channel),
            ),
            ChannelReplier(message.channel, message.to_reference(fail_if_not_exists=False)),
        )

    async def on_command(self, interaction: discord.Interaction, name: str, text: str = "") -> None:
        await self.conversation.handle(
            ChatEvent(
                chat_id=str(interaction.channel_id),
                event_id=str(interaction.id),
                user_id=str(interaction.user.id),
                user_name=interaction.user.display_name,
                text=text,
                is_private=interaction.guild_id is None,
                command=name,
                allowed=self._allowed(interaction.guild_id, interaction.channel),
                is_admin=functools.partial(_manages_server, interaction),
            ),
            InteractionReplier(interaction),
        )

    def _allowed(self, guild_id: int | None, channel) -> bool:
        """The configured allowlists (empty = everywhere); a thread counts as its parent channel too."""
        if guild_id is None:
            return self.config.allow_dms
        if self.config.allowed_guilds and str(guild_id) not in self.config.allowed_guilds:
            return False
        ids = {str(getattr(channel, "id", "")), str(getattr(channel, "parent_id", "") or "")}
        return not self.config.allowed_channels or bool(ids & set(self.config.allowed_channels))

    def _replier_for(self, chat_id: str, message_id: str | None) -> ChannelReplier:
        """Replies to a message known only by ids (after a restart); without it, plain sends in the channel."""
        reference = message_id and discord.MessageReference(
            message_id=int(message_id), channel_id=int(chat_id), fail_if_not_exists=False
        )
        return ChannelReplier(self.client.get_partial_messageable(int(chat_id)), reference or None)

    def register_commands(self, tree: app_commands.CommandTree) -> None:
        @tree.command(name="gen", description=COMMANDS["gen"])
        @app_commands.describe(prefix="The text for the model to continue")
        async def gen(interaction: discord.Interaction, prefix: str) -> None:
            await self.on_command(interaction, "gen", prefix)

        @tree.command(name="settings", description=COMMANDS["settings"])
        @app_commands.describe(key="The setting to show or change (empty: all)", value="Its new value")
        @app_commands.choices(key=[app_commands.Choice(name=k, value=k) for k in SETTING_KEYS])
        async def settings(interaction: discord.Interaction, key: str | None = None, value: str | None = None) -> None:
            await self.on_command(interaction, "settings", " ".join(w for w in (key, value) if w))

        @tree.command(name="forget", description=COMMANDS["forget"])
        @app_commands.choices(scope=[app_commands.Choice(name="everyone's (admins)", value="all")])
        async def forget(interaction: discord.Interaction, scope: str | None = None) -> None:
            await self.on_command(interaction, "forget", scope or "")

        for name in ("reset", "stats", "help", "privacy"):
            tree.command(name=name, description=COMMANDS[name])(self._plain_command(name))

    def _plain_command(self, name: str):
        async def callback(interaction: discord.Interaction) -> None:
            await self.on_command(interaction, name)

        callback.__name__ = name
        return callback


async def _manages_server(interaction: discord.Interaction) -> bool:
    return interaction.permissions.manage_guild


def _startup_error(exc: BaseException, config: DiscordConfig) -> BaseException:
    """A one-sentence BotkitError for why the bot could not come online."""
    if isinstance(exc, discord.LoginFailure):
        return ConfigError(
            f"Discord refused the bot token in {config.token_env}: copy it again from the "
            "developer portal (Bot → Reset Token) and export it."
        )
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return ConfigError(
            "Discord refused the Message Content intent: enable it in the developer portal "
            "(your application → Bot → Privileged Gateway Intents) and start again."
        )
    if isinstance(exc, TimeoutError):
        return BotkitError(
            f"Discord's gateway did not answer within {config.connect_timeout_s:.0f} s; "
            "check the network and https://discordstatus.com, then start again."
        )
    if isinstance(exc, discord.HTTPException | aiohttp.ClientError | OSError | discord.ConnectionClosed):
        return BotkitError(
            f"Could not connect to Discord ({type(exc).__name__}: {exc}); check the network and start again."
        )
    return exc  # a BotkitError already, a cancellation, or a bug
