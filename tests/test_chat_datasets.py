"""Chat exports into conversations: every export shape (fixtures written by hand in the documented
shapes), detection from content, splitting, normalisation, hostile files, and botkit's own store."""

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from botkit.chat_format import ChatFormat
from botkit.cli import main
from botkit.errors import DatasetError
from botkit.params import ChatSettings
from botkit.serve.store import Store
from botkit.train.conversations import ChatMessage, ConversationOptions, conversations, normalise
from botkit.train.encoding import read_documents
from botkit.train.export_dataset import export_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "chats"
EXPECTED = {
    "discord_general.json": [
        "Alice: who is up for pizza tonight?\nCarol: @user knows a place, see <link>\nBob: yes!! margherita for "
        "me<br>and garlic bread\n<|endoftext|>",
        "Carol: that was the best pizza of my life :chefkiss:\ndave: same time next week? ask @user or mail "
        "<email>\n<|endoftext|>",
    ],
    "discord_general.csv": [
        "alice_1999: who is up for pizza tonight?\nbob_the_builder: yes!! margherita for me<br>and garlic bread, "
        '"the" best\n<|endoftext|>',
        "carol.w: that was the best pizza of my life\n<|endoftext|>",
    ],
    "telegram_chat.json": [
        "Alice: who is up for pizza tonight?\nBob: ask @user she knows the place\nCarol: this one on main street, or "
        "@user cooks\n<|endoftext|>",
        "someone: anyone still hungry? call <phone>\n<|endoftext|>",
    ],
    "telegram_full_export.json": ["Alice: lunch pizza?\nBob: always\n<|endoftext|>", "Carol: 🦉 hoot\n<|endoftext|>"],
}
LEAKS = re.compile(
    r"\d{6,}|https?://|@(?!user\b)\w|carol_w|alice_real|555|door code|passwords|Your "
    r"order|BREAKING|pizza dance|/order"
)


def chats(**kwargs) -> ConversationOptions:
    return ConversationOptions.of(**kwargs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_export_shape_becomes_conversations(name):
    # MEE6 is marked isBot in the JSON; CSV has no bot flag, so it is named.
    docs = read_documents(FIXTURES / name, chats=chats(exclude_speakers="MEE6"))
    assert docs == EXPECTED[name]
    for doc in docs:  # no ids, handles, links, numbers, private chats, forwards, bot commands or system lines
        assert not LEAKS.search(doc), doc


def test_the_shape_is_read_from_the_content_not_the_name(tmp_path):
    for source, target in [
        ("telegram_chat.json", "discord.json"),
        ("discord_general.json", "export"),
        ("telegram_full_export.json", "result.data"),
        ("discord_general.csv", "messages.csv"),
    ]:
        shutil.copy(FIXTURES / source, tmp_path / target)
        assert read_documents(tmp_path / target, chats=chats(exclude_speakers="MEE6")) == EXPECTED[source]


def test_a_folder_of_exports_is_one_dataset_and_bots_need_naming_in_csv(tmp_path):
    shutil.copy(FIXTURES / "discord_general.csv", tmp_path / "a.csv")
    shutil.copy(FIXTURES / "telegram_chat.json", tmp_path / "b.json")
    (tmp_path / "notes.txt").write_text("plain text too")
    docs = read_documents(tmp_path)
    assert "MEE6: Welcome to the server!" in docs[0]  # not excluded: a CSV cannot say it is a bot
    assert docs[1:] == EXPECTED["discord_general.csv"][1:] + EXPECTED["telegram_chat.json"] + ["plain text too"]


def test_speakers_can_be_anonymized_across_files(tmp_path):
    shutil.copy(FIXTURES / "discord_general.csv", tmp_path / "a.csv")
    shutil.copy(FIXTURES / "telegram_chat.json", tmp_path / "b.json")
    docs = read_documents(tmp_path, chats=chats(exclude_speakers="MEE6", anonymize_speakers=True))
    assert docs[0].startswith("user1: who is up for pizza tonight?\nuser2: yes!! margherita")
    assert docs[1] == "user3: that was the best pizza of my life\n<|endoftext|>"
    assert (
        docs[2]
        == "user4: who is up for pizza tonight?\nuser5: ask @user she knows the place\nuser6: this one on main street, "
        "or @user cooks\n<|endoftext|>"
    )
    assert not re.search(r"alice|bob|carol|Alice|Bob|Carol", "".join(docs))


def test_conversations_split_on_silence_chat_and_length():
    msgs = [
        ChatMessage("a", "x", "1", 0.0),
        ChatMessage("a", "y", "2", 59.0),
        ChatMessage("a", "x", "3", 200.0),
        ChatMessage("b", "x", "4", 201.0),
        ChatMessage("b", "x", "5", None),
        ChatMessage("b", "y", "6", 150.0),
        ChatMessage("b", "y", "7", 10.0),
    ]
    texts = lambda groups: [[m.text for m in g] for g in groups]  # noqa: E731
    # 7 is 140 s back in time
    assert texts(conversations(msgs, gap_s=60)) == [["1", "2"], ["3"], ["4", "5", "6"], ["7"]]
    assert texts(conversations(msgs, gap_s=3600)) == [["1", "2", "3"], ["4", "5", "6", "7"]]
    assert texts(conversations(msgs, exclude_speakers=frozenset({"y"}))) == [["1", "3"], ["4", "5"]]
    many = [ChatMessage("a", "x", str(i), float(i)) for i in range(2500)]
    assert [len(g) for g in conversations(many)] == [1000, 1000, 500]


def test_gap_and_format_options_reach_the_documents():
    fmt = ChatFormat(speaker="<{name}> {message}", end="\n===\n")
    docs = read_documents(FIXTURES / "discord_general.json", chats=chats(chat_format=fmt, gap_s=30))
    assert docs[:2] == [
        "<Alice> who is up for pizza tonight?\n\n===\n",
        "<Carol> @user knows a place, see <link>\n\n===\n",
    ]
    joined = read_documents(FIXTURES / "discord_general.json", chats=chats(gap_s=6 * 3600))
    assert len(joined) == 1


def test_normalise_mentions_links_and_line_breaks():
    text = (
        "hey <@123456789012345678> and <@!42> in <#77> with <@&9> <a:party:555555555555> \u2028 www.x.org/a?b"
        " @Some One a\rb\r\nc\x00d"
    )
    assert (
        normalise(text, ["Some One"])
        == "hey @user and @user in #channel with @user :party: \n <link> @user a\nb\nc" + "d"
    )
    assert normalise("write to me@mail.example or @here / @everyone") == "write to <email> or @user / @user"


def _discord(*messages) -> bytes:
    return json.dumps(
        {"guild": {"id": "1", "name": "g"}, "channel": {"id": "2", "name": "c"}, "messages": list(messages)}
    ).encode()


def _msg(content="hi", **changes):
    author = {"id": "1", "name": "ann", "nickname": "Ann", "isBot": False}
    return {
        "id": "9",
        "type": "Default",
        "timestamp": "2024-01-01T00:00:00+00:00",
        "content": content,
        "author": author,
        **changes,
    }


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("x.json", b'{"foo": [1, 2, 3]}', "holds no messages"),
        ("x.json", b'{"messages": ["a", 1, null, [2]]}', "holds no messages"),
        ("x.json", b'{"messages": [{"id": 1, "text": "no type"}]}', "neither DiscordChatExporter"),
        ("x.json", _discord(_msg())[:-20], "not valid JSON"),
        ("x.json", b'{"messages": [{"type": "message", "text": "\xff\xfe"}]}', "not valid JSON"),
        ("x.json", b'{"messages": [{"type": "message", "date_unixtime": 1e999}]}', "not valid JSON"),
        (
            "x.json",
            b'{"messages": [{"type": "message", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
            "nested more than 64",
        ),
        ("x.json", b"", "not valid JSON"),
        (
            "x.jsonl",
            b'{"format": "botkit-chat", "version": 1}\n{"chat": "1", "speaker": "a", "time_s": 1, "text": '
            b'"ok"}\n{"chat": 1}\n',
            "line 3",
        ),
        (
            "x.jsonl",
            b'{"format": "botkit-chat", "version": 1}\n{"chat": "1", "speaker": "a", "time_s": true, "text": "ok"}\n',
            "line 2",
        ),
        ("x.jsonl", b'{"format": "botkit-chat", "version": 1}\n{"chat"\n', "line 2 is not valid JSON"),
        ("x.csv", b'AuthorID,Author,Date,Content\n"1","a","2024","\x00"\n', "binary"),
        ("x.csv", b'AuthorID,Author,Date,Content\n"1","a","2024","caf\xe9"\n', "not UTF-8"),
    ],
)
def test_malformed_exports_are_one_sentence(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_documents(path)
    message = str(info.value)
    assert (
        says in message and "\n" not in message and message.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", message)
    ), message


def test_odd_but_readable_exports_keep_what_is_usable(tmp_path):
    path = tmp_path / "odd.json"
    path.write_bytes(
        b"\xef\xbb\xbf"
        + _discord(
            _msg("kept"),
            _msg("x" * 30_000),  # a paste: dropped
            _msg(12345),  # content not text
            _msg("no author", author="ann"),
            _msg("bad time", timestamp="yesterday-ish"),
            _msg("zero\u200bwidth and \u202eRTL", author={"name": "N\u2028a{m}e\x07", "isBot": None}),
            _msg("bot", author={"name": "b", "isBot": True}),
            _msg("deep", mentions=[[[[{"name": "x"}]]]], extra={"a": [[[[[[[[1]]]]]]]]}),
            _msg("a\x00b", type="Reply"),
        )
    )
    [doc] = read_documents(path)
    assert doc == "Ann: kept\nAnn: bad time\nN a m e: zero\u200bwidth and \u202eRTL\nAnn: deep\nAnn: ab\n<|endoftext|>"


async def test_botkit_store_exports_only_chats_that_opted_in(tmp_path, capsys):
    db = tmp_path / "botkit.db"
    async with Store.open(db) as store:
        for chat, user, text, kind in [
            ("100", "u1", "first in the opted-in chat", "chat"),
            ("200", "u2", "private talk", "chat"),
            ("100", "u3", "second, @bob see https://x.org", "chat"),
            ("api", "api", "raw completion", "completion"),
        ]:
            await store.add_request(
                kind=kind,
                platform="discord",
                chat_id=chat,
                user_id=user,
                user_name=user.upper(),
                platform_message_id=None,
                text=text,
                prompt=text,
                params={},
            )
        await store.set_chat_settings("discord", "100", {"dataset_opt_in": True})
        await store.set_chat_settings("discord", "200", {"temperature": 0.5})
        await store.set_chat_settings("discord", "api", {"dataset_opt_in": True})
    summary = export_dataset(db, tmp_path / "data.jsonl")
    assert (summary.num_chats, summary.num_messages) == (1, 2)  # the opted-in API chat has only a completion
    lines = (tmp_path / "data.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "botkit-chat", "version": 1}
    records = [json.loads(line) for line in lines[1:]]
    assert [(r["chat"], r["speaker"], r["text"]) for r in records] == [
        ("chat1", "user1", "first in the opted-in chat"),
        ("chat1", "user2", "second, @user see <link>"),
    ]
    assert "100" not in (tmp_path / "data.jsonl").read_text()  # no platform ids
    assert read_documents(tmp_path / "data.jsonl") == [
        "user1: first in the opted-in chat\nuser2: second, @user see <link>\n<|endoftext|>"
    ]

    # The config's default counts for chats that kept it, as in the running bot.
    everyone = export_dataset(db, tmp_path / "all.jsonl", ChatSettings(dataset_opt_in=True))
    assert (everyone.num_chats, everyone.num_messages) == (2, 3)

    assert main(["export-dataset", "--db", str(db), "--out", str(tmp_path / "cli.jsonl")]) == 0
    assert "Wrote 2 messages of 1 chat to" in capsys.readouterr().out
    assert main(["export-dataset", "--db", str(tmp_path / "missing.db")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_odd_telegram_messages_keep_what_is_usable(tmp_path):
    def tg(**fields):
        return {
            "id": 1,
            "type": "message",
            "date": "2024-01-01T00:00:00",
            "date_unixtime": "1704067200",
            "from": "Ann",
            **fields,
        }

    path = tmp_path / "result.json"
    path.write_text(
        json.dumps(
            {
                "name": "g",
                "type": "private_group",
                "id": 1,
                "messages": [
                    tg(text="kept"),
                    tg(text=["a", {"type": "italic", "text": 5}, {"no": "text"}, None, "b"]),  # odd parts are skipped
                    tg(text="x", text_entities="not a list"),  # falls back to text
                    tg(text=12),  # no text
                    tg(text="number name", **{"from": 7}),
                    tg(text="huge time", date_unixtime="9" * 40, date="1999-99-99"),
                    tg(text="odd digits", date_unixtime="\u00b2"),  # a digit to str.isdigit, not to float()
                    tg(text="lone surrogate", date_unixtime="\ud800"),
                    tg(text="far later", date_unixtime="1704160800"),  # 26 h later: a new conversation
                    {"type": "service", "action": "pin_message", "text": "pinned"},
                    "not a message",
                ],
            }
        )
    )
    assert read_documents(path) == [
        "Ann: kept\nAnn: ab\nAnn: x\nsomeone: number name\nAnn: huge time\nAnn: odd "
        "digits\nAnn: lone surrogate\n<|endoftext|>",
        "Ann: far later\n<|endoftext|>",
    ]


async def test_exported_dataset_holds_no_ids_handles_or_profile_links(tmp_path):
    db = tmp_path / "botkit.db"
    texts = [
        "hi <@123456789012345678> and <@!223456789012345678>, ping <@&323456789012345678>",
        "my profile tg://user?id=55512345 and t.me/alice_handle or telegram.me/joinchat/AbCdEf",
        "ask @carol_handle",
    ]
    async with Store.open(db) as store:
        for (user_id, user_name), text in zip(
            [("55512345", "alice_handle"), ("66612345", "Bob Smith"), ("55512345", "alice_handle")], texts, strict=True
        ):
            await store.add_request(
                kind="chat",
                platform="telegram",
                chat_id="-100777",
                user_id=user_id,
                user_name=user_name,
                platform_message_id=None,
                text=text,
                prompt=text,
                params={},
            )
        await store.set_chat_settings("telegram", "-100777", {"dataset_opt_in": True})
    export_dataset(db, tmp_path / "data.jsonl")
    raw = (tmp_path / "data.jsonl").read_text()
    for private in (
        "1234567890",
        "2234567890",
        "3234567890",
        "55512345",
        "66612345",
        "alice_handle",
        "Bob Smith",
        "carol_handle",
        "AbCdEf",
        "777",
    ):
        assert private not in raw
    records = [json.loads(line) for line in raw.splitlines()[1:]]
    assert [r["speaker"] for r in records] == ["user1", "user2", "user1"]  # one pseudonym a person, per dataset
    assert records[2]["text"] == "ask @user"


def test_cleaning_a_very_long_message_takes_linear_time():
    started = time.perf_counter()
    assert normalise("a" * 160_000 + " mail me at ann@example.org") == "a" * 160_000 + " mail me at <email>"
    assert normalise("a." * 80_000) == "a." * 80_000
    assert time.perf_counter() - started < 5  # quadratic matching took 71 s; linear takes milliseconds


async def test_export_dataset_to_a_folder_is_one_sentence(tmp_path, capsys):
    async with Store.open(tmp_path / "botkit.db"):
        pass
    assert main(["export-dataset", "--db", str(tmp_path / "botkit.db"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "Traceback" not in err and err.count("\n") == 1
