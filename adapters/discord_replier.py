"""What botkit sends on Discord: the conversation layer's `Replier` protocol in discord.py calls.

Every call also carries `AllowedMentions.none()`, so even a text that escaped defusing pings nobody.
"""

from __future__ import annotations

import asyncio

import discord

NO_PINGS = discord.AllowedMentions.none()  # on the client and every send, besides the defused text


class ChannelReplier:
    """Replies to a message in a channel or DM: every part answers it."""

    def __init__(self, channel, reference: discord.MessageReference | None):
        self.channel, self.reference = channel, reference

    async def reply(self, text: str, *, private: bool = False) -> str:
        return str((await self.channel.send(text, reference=self.reference, allowed_mentions=NO_PINGS)).id)

    async def edit(self, message_id: str, text: str) -> str:
        message = self.channel.get_partial_message(int(message_id))
        return str((await message.edit(content=text, allowed_mentions=NO_PINGS)).id)

    async def typing(self) -> None:
        await self.channel.typing()  # one POST …/typing; Discord shows it for about 10 s

    async def draft(self, draft_id: int, text: str) -> bool:
        return False  # Discord has no drafts: a streamed reply is sent and edited

    async def delete(self, message_id: str) -> None:
        await self.channel.get_partial_message(int(message_id)).delete()


class InteractionReplier:
    """Answers a slash command: "thinking…" is its typing; the first text fills the response, the rest follow up."""

    def __init__(self, interaction: discord.Interaction):
        self.interaction, self.original = interaction, None
        self._lock = asyncio.Lock()  # the response can be acknowledged once

    async def typing(self) -> None:
        async with self._lock:
            if not self.interaction.response.is_done():
                await self.interaction.response.defer(thinking=True)

    async def reply(self, text: str, *, private: bool = False) -> str:
        async with self._lock:
            if not self.interaction.response.is_done():
                sent = await self.interaction.response.send_message(text, ephemeral=private, allowed_mentions=NO_PINGS)
                message_id = getattr(sent, "message_id", None)  # discord.py < 2.5 returns nothing: ask for it
                self.original = str(message_id or (await self.interaction.original_response()).id)
            elif self.original is None:
                self.original = str(
                    (await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)).id
                )
            else:
                return str(
                    (
                        await self.interaction.followup.send(
                            text, ephemeral=private, allowed_mentions=NO_PINGS, wait=True
                        )
                    ).id
                )
            return self.original

    async def draft(self, draft_id: int, text: str) -> bool:
        return False

    async def delete(self, message_id: str) -> None:
        if message_id == self.original:
            await self.interaction.delete_original_response()
            self.original = None
        else:
            await self.interaction.followup.delete_message(int(message_id))

    async def edit(self, message_id: str, text: str) -> str:
        if message_id == self.original:
            return str((await self.interaction.edit_original_response(content=text, allowed_mentions=NO_PINGS)).id)
        return str(
            (await self.interaction.followup.edit_message(int(message_id), content=text, allowed_mentions=NO_PINGS)).id
        )
