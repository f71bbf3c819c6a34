"""`botkit export-dataset`: the messages of chats that opted in (`/settings dataset_opt_in on`) as a
chat dataset for `botkit finetune --dataset`, from the moment each opted in (earlier messages were
sent without that consent).

Only people's messages are exported: the bot's own replies would teach the model its own output,
and API completions are not chat. The file names no platform, chat or user id, handle or name:
chats are numbered, speakers are user1, user2, ... (one pseudonym a person across the file: a
Telegram name is often an @username), and the text is cleaned as every chat export is (mentions,
Discord's <@id> markup, links and Telegram profile links removed; see train/conversations.normalise). Read through a
read-only connection, so a running
bot is not disturbed.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from botkit.errors import DatasetError, InputError
from botkit.params import ChatSettings
from botkit.train.chat_exports import botkit_header
from botkit.train.conversations import normalise

log = logging.getLogger("botkit")


@dataclass(frozen=True)
class ExportSummary:
    num_chats: int
    num_messages: int
    path: Path


def export_dataset(
    db_path: str | os.PathLike, out_path: str | os.PathLike, defaults: ChatSettings | None = None
) -> ExportSummary:
    """Write the opted-in chats' messages of the store at `db_path` to `out_path` (JSONL), oldest
    first per chat. `defaults` are the config's chat settings (a chat's stored settings are changes
    to them, as in the running bot)."""
    db_path, out_path = Path(db_path), Path(out_path)
    if not db_path.is_file():
        raise DatasetError(f"The database {db_path} does not exist: pass the [store] path of your bot with --db.")
    if out_path.is_dir():
        raise DatasetError(
            f"{out_path} is a folder: pass a file name with --out, such as {out_path / 'dataset.jsonl'}."
        )
    if not out_path.parent.is_dir():
        raise DatasetError(f"The folder of {out_path} does not exist: create it or choose another --out.")
    defaults = defaults or ChatSettings()
    try:
        db = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise DatasetError(f"Cannot open the database {db_path} ({exc}): check the path and its permissions.") from None
    tmp = out_path.with_name(out_path.name + ".tmp")
    num_chats = num_messages = 0
    pseudonyms: dict[tuple[str, str], str] = {}  # (platform, user id) -> userN
    try:
        with db, tmp.open("w", encoding="utf-8") as out:
            out.write(botkit_header() + "\n")
            chats = db.execute(
                "SELECT DISTINCT m.platform, m.chat_id, COALESCE(c.settings, '{}'), "
                "COALESCE(c.export_since_message, 0)"
                " FROM messages m LEFT JOIN chats c ON c.platform = m.platform AND c.chat_id = m.chat_id"
                " ORDER BY m.platform, m.chat_id"
            )
            for platform, chat_id, settings, since in chats.fetchall():
                if not _opted_in(defaults, settings, platform, chat_id):
                    continue
                rows = db.execute(
                    "SELECT m.user_id, m.text, m.received_at FROM messages m LEFT JOIN requests r ON r.message_id = "
                    "m.id"
                    " WHERE m.platform=? AND m.chat_id=? AND m.id > ? AND (r.kind IS NULL OR r.kind = 'chat') ORDER BY "
                    "m.id",
                    (platform, chat_id, since),
                )
                label = f"chat{num_chats + 1}"
                for user_id, text, received_at in rows:
                    speaker = pseudonyms.setdefault((platform, user_id), f"user{len(pseudonyms) + 1}")
                    record = {"chat": label, "speaker": speaker, "time_s": received_at, "text": normalise(text)}
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    num_messages += 1
                    num_chats += label == f"chat{num_chats + 1}"  # counted at its first message
    except sqlite3.DatabaseError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"Cannot read the database {db_path} ({exc}): is it a botkit store?") from None
    finally:
        db.close()
    os.replace(tmp, out_path)
    return ExportSummary(num_chats, num_messages, out_path)


def _opted_in(defaults: ChatSettings, stored: str, platform: str, chat_id: str) -> bool:
    try:
        return defaults.replace(**json.loads(stored)).dataset_opt_in
    except (ValueError, TypeError, InputError):
        log.warning("Stored settings for %s/%s are not readable: its messages are not exported.", platform, chat_id)
        return False


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export-dataset", help="write the messages of chats that opted in as a fine-tuning dataset"
    )
    p.add_argument(
        "--db", default=None, help="the bot's SQLite store (default: [store] path of --config, else botkit.db)"
    )
    p.add_argument(
        "--out", default="dataset.jsonl", help="the JSONL file to write (then: botkit finetune --dataset it)"
    )
    p.add_argument(
        "--config",
        default=None,
        help="the bot's TOML config: its [chat] defaults decide opt-in for chats that kept them",
    )
    p.set_defaults(func=_run)


def _run(args) -> None:
    from botkit.config import load_config

    config = load_config(args.config) if args.config else None
    db = args.db or (config.store.path if config else "botkit.db")
    summary = export_dataset(db, args.out, config.chat if config else None)
    if not summary.num_chats:
        print(
            f"No chat in {db} has opted in: in a chat, an admin sends `/settings dataset_opt_in on`; wrote an empty "
            f"{args.out}."
        )
        return
    chats = f"{summary.num_chats} chat" + ("s" if summary.num_chats != 1 else "")
    messages = f"{summary.num_messages:,} message" + ("s" if summary.num_messages != 1 else "")
    print(
        f"Wrote {messages} of {chats} to {summary.path}: train on it with `botkit finetune --dataset {summary.path}`."
    )
