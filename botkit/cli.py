"""`botkit` on the command line; `run` is the composition root that builds and owns everything."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path

from botkit.config import Config, load_config, override, secret
from botkit.errors import BotkitError
from botkit.model.sources import CLI_NAMES
from botkit.params import EXPECT_TEXT_MIN_TOKENS, SAMPLERS

log = logging.getLogger("botkit")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("botkit").setLevel(logging.INFO)
    # vLLM's own lines (backend = "vllm"): its warnings and errors, and with -v everything it says
    logging.getLogger("botkit.vllm.server").setLevel(
        logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    )
    # its INFO lines carry request URLs, and Telegram's hold the token
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # transformers' warnings speak to library authors (deprecations, a guessed loss type): errors only,
    # and no progress bars ("Loading weights" on every start), through their documented variables,
    # so that a command that fails early never pays for importing transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args) or 0
    except BotkitError as exc:
        print(f"botkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="botkit", description="Fine-tune a GPT-2 and serve it to Discord, Telegram and the web."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve the bot (with no config: a local web playground on the demo model)")
    run.add_argument("--config", help="a TOML file (see config.example.toml)")
    run.add_argument("--console", action="store_true", help="also chat in this terminal")
    run.add_argument("--port", type=int, help="web port (overrides [web] port)")
    _serve_model_args(run)
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=lambda a: _serve(a, console=a.console))

    chat = sub.add_parser("chat", help="chat with the model in this terminal")
    chat.add_argument("--config", help="a TOML file (see config.example.toml)")
    chat.add_argument("--port", type=int)
    _serve_model_args(chat)
    chat.set_defaults(func=lambda a: _serve(a, console=True, web=False))

    gen = sub.add_parser("generate", help="generate text, with gpt-2-simple's options")
    _model_args(gen)
    gen.add_argument(
        "--prefix", type=_unescape, default=None, help="text to continue (default: start from <|endoftext|>)"
    )
    gen.add_argument(
        "--truncate",
        type=_unescape,
        default=None,
        help="end each sample before this string (a run trained on chats: its chat format's; '' = none)",
    )
    gen.add_argument(
        "--include-prefix", action=argparse.BooleanOptionalAction, default=True, help="keep the prefix in the output"
    )
    gen.add_argument("--nsamples", type=int, default=1)
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--length", type=int, default=1023, help="new tokens per sample (may exceed the window)")
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument(
        "--unique", action="store_true", help="draw again a sample that copies the run's training text or the prefix"
    )
    gen.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this many tokens (0 = off)"
    )
    gen.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="drop tokens less likely than this share of the likeliest (0 = off; 0.05 is common)",
    )
    gen.add_argument("--typical-p", type=float, default=1.0, help="locally typical sampling's mass (1 = off)")
    gen.add_argument(
        "--presence-penalty", type=float, default=0.0, help="-2 to 2, OpenAI's: taken off tokens already in the sample"
    )
    gen.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.0,
        help="-2 to 2, OpenAI's: taken off a token per time it is in the sample",
    )
    gen.add_argument(
        "--dry-multiplier", type=float, default=0.0, help="DRY against verbatim loops (0 = off; 0.8 is common)"
    )
    gen.add_argument(
        "--dry-base", type=float, default=1.75, help="DRY: how fast its penalty grows with a repeat's length"
    )
    gen.add_argument("--dry-allowed-length", type=int, default=2, help="DRY: repeats of this many tokens are free")
    gen.add_argument(
        "--dry-sequence-breaker",
        dest="dry_sequence_breakers",
        type=_unescape,
        action="append",
        default=None,
        help="DRY: a repeat never runs across this string (repeat the flag; default: newline, colon, quote, asterisk)",
    )
    gen.add_argument(
        "--min-tokens",
        type=int,
        default=EXPECT_TEXT_MIN_TOKENS,
        help="no end of text and no --truncate string before this many new tokens (default 1: no empty "
        "sample; 0 = off)",
    )
    gen.add_argument("--destination-path", default=None, help="write the samples to this file instead of printing them")
    gen.add_argument("--sample-delim", type=_unescape, default="=" * 20 + "\n")
    gen.set_defaults(func=_generate)

    try:
        from botkit.train.finetune import add_cli
    except ImportError:  # fine-tuning not installed in this checkout
        pass
    else:
        add_cli(sub)
    from botkit.model.convert import add_cli as add_convert_cli

    add_convert_cli(sub)  # convert, download, export, import

    from botkit.train.export_dataset import add_cli as add_export_cli

    add_export_cli(sub)
    return parser


def _unescape(text: str) -> str:
    """`--truncate '\\n'` on a shell means a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="hub name, local folder, models/124M or checkpoint/run1 from "
        "gpt-2-simple (default: the bundled demo model)",
    )
    p.add_argument("--run-name", default=None, help="a run in --checkpoint-dir, from `botkit finetune`")
    p.add_argument("--checkpoint-dir", default="checkpoint")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16, or int8 (CPU only: int8 weights, faster on CPUs with AVX-512 VNNI)",
    )


def _serve_model_args(p: argparse.ArgumentParser) -> None:
    """`botkit run` / `botkit chat` talk to a model without a config file; these override [model]."""
    p.add_argument("--model", default=None, help="hub name or local folder (overrides [model] source)")
    p.add_argument(
        "--run-name",
        default=None,
        help="a run in --checkpoint-dir, from `botkit finetune` (overrides [model] run_name)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where `botkit finetune` saved the run (overrides [model] checkpoint_dir)",
    )


def route_transformers_logs() -> None:
    """Once transformers is loaded anyway: its (error) lines go through botkit's logging and format."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _generate(args) -> None:
    from botkit.engine.generate import check_destination, check_sampling
    from botkit.model.sources import resolve

    # Options, the output folder and the model's path first: one sentence at once, not after loading.
    samplers = {name: getattr(args, name) for name in SAMPLERS if getattr(args, name) is not None}
    check_sampling(
        length=args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        truncate=args.truncate,
        seed=args.seed,
        nsamples=args.nsamples,
        unique=args.unique,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        **samplers,
    )
    check_destination(args.destination_path)
    source = resolve(args.model, args.run_name, args.checkpoint_dir)  # a bad path or no hub: one sentence, at once
    from botkit.engine.generate import generate
    from botkit.model.loading import load_model

    lm = load_model(source, device=args.device, dtype=args.dtype)
    route_transformers_logs()
    generate(
        lm,
        prefix=args.prefix,
        truncate=args.truncate,
        include_prefix=args.include_prefix,
        nsamples=args.nsamples,
        batch_size=args.batch_size,
        length=args.length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        unique=args.unique,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        destination_path=args.destination_path,
        sample_delim=args.sample_delim,
        **samplers,
    )


def _serve(args, console: bool, web: bool = True) -> None:
    config = load_config(args.config)
    if args.port is not None:
        config = override(config, "--port", "web", port=args.port)
    if not web:
        config = _replace(config, "web", enabled=False)
    config, names = _model_flags(config, args)
    asyncio.run(serve(config, console=console or config.console.enabled, source_names=names))


def _model_flags(config: Config, args) -> tuple[Config, dict[str, str]]:
    """`config` with --model / --run-name / --checkpoint-dir applied, and what errors call each value:
    the flag that set it, or its key in the config file."""
    if args.model is not None and args.run_name is not None:
        raise BotkitError(
            "Pass --model or --run-name, not both: --model names a model, --run-name a run of `botkit finetune`."
        )
    # resolve()'s names -> [model] keys
    keys = {"model": "source", "run_name": "run_name", "checkpoint_dir": "checkpoint_dir"}
    names = {name: f"model.{key} in {args.config}" if args.config else CLI_NAMES[name] for name, key in keys.items()}
    for name, key in keys.items():
        value = getattr(args, name)
        if value is not None:
            config = _replace(config, "model", **{key: value})  # text, as a flag always is
            names[name] = CLI_NAMES[name]
    if args.model is not None:
        config = _replace(config, "model", run_name="")  # --model wins over the file's run
    if args.run_name is not None:
        config = _replace(config, "model", source="")  # the run is used only when source is ""
    return config, names


def _replace(config: Config, section: str, **changes) -> Config:
    import dataclasses

    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


async def serve(
    config: Config, console: bool = False, stop: asyncio.Event | None = None, source_names: dict[str, str] | None = None
) -> None:
    """Run the core and every enabled adapter around one model until `stop` is set (by default: until
    SIGINT/SIGTERM) or the console chat ends. `source_names`: what model errors call [model]'s keys."""
    from botkit.chat.chats import Chats
    from botkit.serve.core import Core
    from botkit.serve.retention import Retention
    from botkit.serve.store import Store

    # Secrets first: a missing token should fail before minutes of model loading.
    tokens = {
        "web": secret(config.web.api_key_env, "The web API key ([web] api_key_env)")
        if config.web.api_key_env
        else None,
        "discord": secret(config.discord.token_env, "Discord ([discord] token_env)")
        if config.discord.enabled
        else None,
        "telegram": secret(config.telegram.token_env, "Telegram ([telegram] token_env)")
        if config.telegram.enabled
        else None,
    }
    if config.web.enabled and config.web.port:
        _check_port_free(config.web.host, config.web.port)  # before the store: a failed start changes no records
    source = None
    if config.model.backend in ("local", "vllm"):
        from botkit.model.sources import resolve

        source = resolve(
            config.model.source or None, config.model.run_name or None, config.model.checkpoint_dir, source_names
        )
    with ThreadPoolExecutor(1) as loader:  # a thread that exits: see backends.LocalBackend on OpenMP teams
        backend = await asyncio.get_running_loop().run_in_executor(loader, _make_backend, config, source)
    run_format = run_chat_format(backend)  # None: not a chat run
    config = with_run_chat_format(config, run_format)
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store.open(config.store.path))
        await stack.enter_async_context(Retention(store, config.store))
        await stack.enter_async_context(backend)
        core = await stack.enter_async_context(Core(backend, store, config))
        chats = Chats(core, store, config)  # the chat layer: what Discord, Telegram and the console talk to
        print(f"botkit keeps its prompts and replies in {Path(config.store.path).resolve()}", flush=True)
        if config.web.enabled:
            from botkit.adapters.web_adapter import WebAdapter

            web = await stack.enter_async_context(WebAdapter(core, config.web, tokens["web"], run_format))
            print(f"botkit is serving {backend.name}: open {web.url}", flush=True)
        if config.discord.enabled:
            from botkit.adapters.discord_adapter import DiscordAdapter

            await stack.enter_async_context(DiscordAdapter(chats, config.discord, tokens["discord"]))
        if config.telegram.enabled:
            from botkit.adapters.telegram_adapter import TelegramAdapter

            await stack.enter_async_context(TelegramAdapter(chats, config.telegram, tokens["telegram"]))
        if console:
            from botkit.adapters.console_adapter import ConsoleAdapter

            chat = await stack.enter_async_context(ConsoleAdapter(chats, config.console))
            done = asyncio.create_task(chat.run())
            await asyncio.wait([done, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        else:
            print("Press Ctrl-C to stop.", flush=True)
            await stop.wait()


def with_run_chat_format(config: Config, chat_format) -> Config:
    """A run fine-tuned on chats speaks the format it was trained on: unless the config sets its own
    template, truncate string or context, chats read the room (`context = "channel"`) in the run's
    lines, each message under its author's display name and the bot's under its own name, as the
    model saw its speakers in training (the "bot" context's template, "user: ...", is the fallback)."""
    from botkit.params import ChatSettings

    default = ChatSettings()
    chosen = (config.chat.template, config.chat.truncate, config.chat.context)
    if chat_format is None or chosen != (default.template, default.truncate, default.context):
        return config
    chat = config.chat.replace(**chat_format.chat_settings("bot"), chat_format=chat_format.as_line(), context="channel")
    log.info("Chats read the room in the run's chat format: %r.", chat.chat_format)
    return _replace(config, "chat", **{k: getattr(chat, k) for k in ("template", "truncate", "chat_format", "context")})


def run_chat_format(backend):
    """The chat format the served run was trained with (its chat_format.json), or None."""
    if getattr(backend, "lm", None) is not None:
        return backend.lm.chat_format
    if getattr(backend, "run_dir", None):
        from botkit.chat_format import ChatFormat

        return ChatFormat.load(backend.run_dir)
    return None


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host.strip("[]"), port), family=socket.AF_INET6 if ":" in host else socket.AF_INET):
            pass
    except OSError as exc:
        raise BotkitError(
            f"The web adapter cannot listen on {host}:{port} ({exc.strerror}): stop the program using it "
            "(another botkit?), or set web.port (or --port) to a free port."
        ) from None


def _make_backend(config: Config, source):
    if config.model.backend == "remote":
        from botkit.serve.remote import RemoteBackend

        return RemoteBackend.from_config(config)
    if config.model.backend == "vllm":
        from botkit.serve.vllm_backend import VllmBackend

        return VllmBackend.from_config(config, source)
    if config.model.backend != "local":
        raise BotkitError(f'model.backend must be "local", "remote" or "vllm", not {config.model.backend!r}.')
    from botkit.model.loading import load_model
    from botkit.serve.backends import LocalBackend

    route_transformers_logs()
    lm = load_model(source, device=config.model.device or None, dtype=config.model.dtype or None)
    cache_mb = None if config.batch.cache_mb < 0 else config.batch.cache_mb
    return LocalBackend(lm, max_batch_size=config.batch.max_size, cache_mb=cache_mb, prepack=config.batch.prepack)


if __name__ == "__main__":
    sys.exit(main())
