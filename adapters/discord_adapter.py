"""Discord adapter: a Discord message or slash command in, a Prompt to the core, the Reply sent back.

It decides when the bot speaks (mention, reply to the bot, `!gen` / `/gen`, DMs, the chat's trigger
setting, a random chance), keeps "typing…" on from queueing to sending, splits replies at Discord's
2000 characters, never pings anyone (defused text and `AllowedMentions.none()` on every send), and
records what it delivered. Generation, limits and settings belong to the core.

Needs the privileged Message Content intent (developer portal → Bot) to read messages that do not
mention the bot. The client runs as a task in the caller's event loop (`client.run()` is never used).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
from dataclasses import fields

import aiohttp
import discord
from discord import app_commands

from botkit.config import DiscordConfig
from botkit.core import Core, Prompt, Reply, Ticket
from botkit.errors import BotkitError, ConfigError
from botkit.params import ChatSettings
from botkit.replies import defuse_mentions, split_reply

log = logging.getLogger("botkit.discord")

PLATFORM = "discord"
MAX_MESSAGE_CHARS = 2000  # Discord's limit for a message's content
NO_PINGS = discord.AllowedMentions.none()
# What the bot needs in a channel; replying to a message needs Read Message History.
PERMISSIONS = discord.Permissions(
    view_channel=True, send_messages=True, send_messages_in_threads=True, read_message_history=True
)
SETTING_KEYS = [f.name for f in fields(ChatSettings)]
EMPTY_REPLY = "The model gave an empty reply twice; try rephrasing, or raise `length` with /settings."
FAILED = "Something went wrong on my side; please try again in a moment."
HELP = (
    "I continue text with a GPT-2 model. Ask me by mentioning me, replying to one of my messages, "
    "`/gen <text>` or `{prefix} <text>`; in a direct message just write.\n"
    "`/settings` shows how I write in this channel; `/settings <key> <value>` changes it (Manage Server needed). "
    "`/reset` makes me forget this channel's conversation. `/stats` shows the queue and speed."
)


class DiscordAdapter:
    """`async with DiscordAdapter(core, config.discord, token):` connects, answers, and disconnects."""

    def __init__(self, core: Core, config: DiscordConfig, token: str, *, chance=random.random):
        self.core = core
        self.config = config
        self.token = token
        self.chance = chance  # () -> float in [0, 1): draws for random_reply_chance (tests inject it)
        self.client = _Client(self)
        self._gateway: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self._handlers: set[asyncio.Task] = set()
        self._seen: collections.OrderedDict[int, None] = collections.OrderedDict()  # recent message ids

    async def __aenter__(self) -> DiscordAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        """Log in, sync the slash commands, and connect the gateway; raise a BotkitError if that fails."""
        try:
            await self.client.login(self.token)
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
            invite = discord.utils.oauth_url(
                self.client.application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
            )
            log.info("Discord: connected as %s; invite it to a server with %s", self.client.user, invite)
        except BaseException as exc:
            await self.close()
            error = _startup_error(exc, self.config)
            if error is exc:
                raise
            raise error from exc

    async def close(self) -> None:
        """Stop answering (in-flight requests are cancelled), then disconnect."""
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.client.close()
        if self._gateway is not None:
            await asyncio.gather(self._gateway, return_exceptions=True)

    # -- when to speak -----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.webhook_id or not self._is_new(message.id):
            return  # bots (itself included) never trigger a reply: no bot-to-bot loops
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return  # pins, joins, thread starts: system messages are not prompts
        if not self._allowed(message.guild and message.guild.id, message.channel):
            return
        settings = await self.core.get_settings(PLATFORM, str(message.channel.id))
        text = self._prompt_text(message, settings)
        if text is None:
            return
        prompt = Prompt(
            PLATFORM,
            str(message.channel.id),
            str(message.author.id),
            text,
            str(message.id),
            message.author.display_name,
        )
        await self._answer(prompt, _MessageReplies(message), typing_in=message.channel)

    def _prompt_text(self, message: discord.Message, settings: ChatSettings) -> str | None:
        """The text to continue if this message asks for a reply, else None."""
        if settings.trigger == "never":
            return None
        content, prefix = message.content, self.config.command_prefix
        if prefix and (content == prefix or content.startswith((prefix + " ", prefix + "\n"))):
            return content[len(prefix) :].strip()
        if settings.trigger == "command":
            return None
        me = self.client.user.id
        if message.guild is None:
            return content  # a direct message is always for the bot
        ref = message.reference
        replied = ref is not None and isinstance(ref.resolved, discord.Message) and ref.resolved.author.id == me
        if me in message.raw_mentions or replied:
            return re.sub(rf"<@!?{me}>", "", content).strip()
        if not content.strip():
            return None  # an image or sticker alone is a prompt only when addressed to the bot
        if settings.trigger == "always":
            return content
        if settings.random_reply_chance and self.chance() < settings.random_reply_chance:
            return content
        return None

    def _allowed(self, guild_id: int | None, channel) -> bool:
        """The configured allowlists (empty = everywhere); a thread counts as its parent channel too."""
        if guild_id is None:
            return self.config.allow_dms
        if self.config.allowed_guilds and str(guild_id) not in self.config.allowed_guilds:
            return False
        ids = {str(getattr(channel, "id", "")), str(getattr(channel, "parent_id", "") or "")}
        return not self.config.allowed_channels or bool(ids & set(self.config.allowed_channels))

    def _is_new(self, message_id: int) -> bool:
        """False for a message already handled (a gateway replay must not produce a second reply)."""
        if message_id in self._seen:
            return False
        self._seen[message_id] = None
        if len(self._seen) > 1000:
            self._seen.popitem(last=False)
        return True

    # -- answering ---------------------------------------------------------------------------------

    async def _answer(self, prompt: Prompt, out: _MessageReplies | _InteractionReplies, typing_in=None) -> None:
        """Generate (an empty reply is retried once) and send the reply or the sentence saying why not."""
        self._handlers.add(task := asyncio.current_task())
        typing = _Typing(typing_in, self.config.typing_interval_s)
        try:
            try:
                reply = await self._generate(prompt, out)
                if not reply.text.strip():
                    reply = await self._generate(prompt, out)
            except BotkitError as exc:
                reply, text = None, str(exc)
            else:
                text = reply.text if reply.text.strip() else EMPTY_REPLY
            await typing.stop()  # before sending: a late indicator would show again under the reply
            await self._send(out, reply, text)
        except discord.HTTPException as exc:
            log.warning("Could not send a reply to Discord channel %s: %s", prompt.chat_id, exc)
        except Exception:
            log.exception("Answering Discord message %s failed", prompt.message_id)
            await _say(out, FAILED)
        finally:
            await typing.stop()
            self._handlers.discard(task)

    async def _send(self, out: _MessageReplies | _InteractionReplies, reply: Reply | None, text: str) -> None:
        """Send `text` defused and split; record the message ids of a reply, even if only some parts went out."""
        parts = split_reply(defuse_mentions(text), MAX_MESSAGE_CHARS, self.config.max_reply_parts)
        sent: list[str] = []
        try:
            await out.send([p for p in parts if p.strip()], sent)  # Discord refuses whitespace-only messages
        finally:
            if sent and reply is not None:
                await self.core.record_delivery(reply.request_id, sent)

    async def _generate(self, prompt: Prompt, out) -> Reply:
        """Submit and wait; if the wait is long and the request is still queued, say where it is in line."""
        ticket: Ticket = await self.core.submit(prompt)
        result = asyncio.ensure_future(ticket.result())
        try:
            done, _ = await asyncio.wait({result}, timeout=self.config.queue_notice_s)
            if not done and (position := ticket.position()) > 0:
                await out.notice(f"Queued: you're number {position} in line. I'll answer here.")
            return await result
        except asyncio.CancelledError:
            ticket.cancel()
            result.cancel()
            raise

    # -- slash commands ----------------------------------------------------------------------------

    def register_commands(self, tree: app_commands.CommandTree) -> None:
        @tree.command(name="gen", description="Continue your text with the model.")
        @app_commands.describe(prefix="The text for the model to continue")
        async def gen(interaction: discord.Interaction, prefix: str) -> None:
            settings = await self._command_settings(interaction)
            if settings is None:
                return
            if settings.trigger == "never":
                await _respond(interaction, "I'm switched off in this channel (trigger = never).", ephemeral=True)
                return
            await interaction.response.defer(thinking=True)
            prompt = Prompt(
                PLATFORM,
                str(interaction.channel_id),
                str(interaction.user.id),
                prefix,
                str(interaction.id),
                interaction.user.display_name,
            )
            await self._answer(prompt, _InteractionReplies(interaction))

        @tree.command(name="settings", description="Show or change how the bot writes in this channel.")
        @app_commands.describe(key="The setting to change (leave empty to show all)", value="Its new value")
        @app_commands.choices(key=[app_commands.Choice(name=k, value=k) for k in SETTING_KEYS])
        async def settings_command(interaction: discord.Interaction, key: str | None = None, value: str | None = None):
            settings = await self._command_settings(interaction)
            if settings is None:
                return
            if key is None or value is None:
                shown = {k: v for k, v in settings.to_dict().items() if key in (None, k)}
                lines = "\n".join(f"{k} = {v!r}" for k, v in shown.items())
                await _respond(interaction, f"Settings for this channel:\n```\n{lines}\n```", ephemeral=True)
            elif not self._may_change(interaction):
                await _respond(
                    interaction,
                    "Only members with Manage Server (or botkit admins) can change settings.",
                    ephemeral=True,
                )
            else:
                try:
                    changed = await self.core.update_settings(PLATFORM, str(interaction.channel_id), **{key: value})
                except BotkitError as exc:
                    await _respond(interaction, str(exc), ephemeral=True)
                else:
                    await _respond(interaction, f"{key} is now {getattr(changed, key)!r}.")

        @tree.command(name="reset", description="Forget this channel's conversation.")
        async def reset(interaction: discord.Interaction) -> None:
            if await self._command_settings(interaction) is not None:
                await self.core.reset_context(PLATFORM, str(interaction.channel_id))
                await _respond(interaction, "Done: I've forgotten this channel's conversation.")

        @tree.command(name="stats", description="Queue depth, speed and latency.")
        async def stats(interaction: discord.Interaction) -> None:
            await _respond(interaction, self.core.stats().summary(), ephemeral=True)

        @tree.command(name="help", description="How to talk to the bot.")
        async def help_command(interaction: discord.Interaction) -> None:
            await _respond(interaction, HELP.format(prefix=self.config.command_prefix), ephemeral=True)

    async def _command_settings(self, interaction: discord.Interaction) -> ChatSettings | None:
        """The channel's settings, or None (after saying so) where the allowlists exclude it."""
        if not self._allowed(interaction.guild_id, interaction.channel):
            await _respond(interaction, "I'm not enabled in this channel.", ephemeral=True)
            return None
        return await self.core.get_settings(PLATFORM, str(interaction.channel_id))

    def _may_change(self, interaction: discord.Interaction) -> bool:
        if str(interaction.user.id) in self.config.admin_user_ids:
            return True
        if interaction.guild_id is None:
            return True  # a direct message is the user's own chat
        return interaction.permissions.manage_guild


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter):
        intents = discord.Intents.default()
        intents.message_content = True  # privileged: enable it in the developer portal
        super().__init__(intents=intents, allowed_mentions=NO_PINGS)
        self.adapter = adapter
        self.tree = app_commands.CommandTree(self)
        adapter.register_commands(self.tree)

    async def setup_hook(self) -> None:
        if self.adapter.config.sync_commands:
            await self.tree.sync()

    async def on_connect(self) -> None:
        self.adapter._ready.set()

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)


class _Typing:
    """Keeps "typing…" on in a channel until `stop()`; a refused indicator never holds up the reply."""

    def __init__(self, channel, interval_s: float):
        self.task = asyncio.create_task(self._run(channel, interval_s)) if channel is not None else None

    @staticmethod
    async def _run(channel, interval_s: float) -> None:
        while True:
            try:
                await channel.typing()  # one POST …/typing; Discord shows it for about 10 s
            except discord.HTTPException as exc:
                log.debug("Typing indicator refused: %s", exc)
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None


class _MessageReplies:
    """Replies to a message: every part answers it; a queue notice is edited into the first part."""

    def __init__(self, message: discord.Message):
        self.message = message
        self.reference = message.to_reference(fail_if_not_exists=False)
        self.noticed: discord.Message | None = None

    async def notice(self, text: str) -> None:
        self.noticed = await self.message.channel.send(text, reference=self.reference, allowed_mentions=NO_PINGS)

    async def send(self, parts: list[str], sent: list[str]) -> None:
        for part in parts:
            if self.noticed is not None:
                message, self.noticed = await self.noticed.edit(content=part, allowed_mentions=NO_PINGS), None
            else:
                message = await self.message.channel.send(part, reference=self.reference, allowed_mentions=NO_PINGS)
            sent.append(str(message.id))


class _InteractionReplies:
    """Answers a deferred slash command: the first part fills the "thinking…" message, the rest follow up."""

    def __init__(self, interaction: discord.Interaction):
        self.interaction = interaction
        self.filled = False

    async def notice(self, text: str) -> None:
        await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)

    async def send(self, parts: list[str], sent: list[str]) -> None:
        for part in parts:
            if not self.filled:
                message = await self.interaction.edit_original_response(content=part, allowed_mentions=NO_PINGS)
                self.filled = True
            else:
                message = await self.interaction.followup.send(part, allowed_mentions=NO_PINGS, wait=True)
            sent.append(str(message.id))


async def _say(out: _MessageReplies | _InteractionReplies, sentence: str) -> None:
    """Tell the user why there is no reply; if even that cannot be sent, log it."""
    try:
        await out.send([sentence], [])
    except discord.HTTPException as exc:
        log.warning("Could not tell a Discord user %r: %s", sentence, exc)


async def _respond(interaction: discord.Interaction, text: str, *, ephemeral: bool = False) -> None:
    await interaction.response.send_message(defuse_mentions(text), ephemeral=ephemeral, allowed_mentions=NO_PINGS)


def _startup_error(exc: BaseException, config: DiscordConfig) -> BaseException:
    """A one-sentence BotkitError for why the bot could not come online."""
    if isinstance(exc, BotkitError | asyncio.CancelledError | KeyboardInterrupt):
        return exc
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
    return exc
