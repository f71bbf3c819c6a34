"""`botkit.finetune`: gpt-2-simple's `finetune` with exact resume, held-out loss, early stopping,
progress, loss plots, from-scratch models and several GPUs (through accelerate).

This module holds the public function and the command line; it imports nothing heavy, so
`botkit --help` stays fast. The options and their checks are in `options.py`, the loop in `trainer.py`.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from botkit.train.conversations import COMMAND_PREFIXES, ConversationOptions
from botkit.train.options import FinetuneOptions, FinetuneResult

if TYPE_CHECKING:
    from transformers import GPT2Config

    from botkit.chat_format import ChatFormat


def finetune(
    dataset: str,
    *,
    model: str | GPT2Config | None = None,
    steps: int = 1000,
    batch_size: int = 1,
    learning_rate: float = 1e-4,
    accumulate_gradients: int = 1,
    run_name: str = "run1",
    checkpoint_dir: str = "checkpoint",
    sample_dir: str = "samples",
    sample_every: int = 100,
    sample_length: int = 200,
    sample_num: int = 1,
    save_every: int = 500,
    print_every: int = 1,
    max_checkpoints: int = 1,
    restore_from: str = "",
    overwrite: bool = False,
    only_train_transformer_layers: bool = False,
    optimizer: str = "adamw",
    seed: int = 0,
    block_size: int = 0,
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    gradient_checkpointing: bool = False,
    lora: int = 0,
    lora_alpha: int = 0,
    lora_dropout: float = 0.05,
    val_fraction: float = 0.0,
    val_every: int = 0,
    val_batches: int = 40,
    early_stopping: int | None = None,
    mixed_precision: str = "auto",
    device: str = "",
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_ctx: int = 256,
    train_tokenizer: bool = False,
    vocab_size: int = 4096,
    text_field: str = "text",
    chat_format: str | ChatFormat | None = None,
    conversation_gap_s: float = 3600.0,
    exclude_speakers: str = "",
    anonymize_speakers: bool = False,
    command_prefixes: str = COMMAND_PREFIXES,
    stop_at_step: int = 0,
    dry_run: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune `model` on `dataset`; checkpoints go to `checkpoint_dir/run_name/`.

    `model`: hub name, local folder (OpenAI's or gpt-2-simple's TensorFlow folders too), GPT2Config, "scratch" (a new
    model from n_layer/n_embd/n_head/n_ctx,
    optionally with a byte-level BPE tokenizer of `vocab_size` trained on the data), or None for the
    bundled demo model. `steps` is the run's total: the learning-rate schedule spans it, and a run
    resumed with `restore_from="latest"` trains until its step count reaches `steps` (pass a larger
    `steps` to train further). `stop_at_step` stops and saves early without changing the schedule.
    `block_size` 0 means the model's context. Held-out loss: the last `val_fraction` of the tokens
    (at least one block; data too small for that trains without, and says so), every `val_every`
    steps (0: ten times a run, or at each save if that is more often); `early_stopping` N stops after
    N evaluations without improvement and keeps the best model in `run_name/best/` (None: 3 when there
    is held-out data, else off). `lora` R > 0 trains rank-R LoRA
    adapters on the attention and MLP projections instead of every weight (`lora_alpha` 0 means 2R);
    checkpoints then hold the adapter alone, and loading the run merges it into the base model.

    Chat exports (DiscordChatExporter JSON/CSV, Telegram Desktop result.json, `botkit export-dataset`
    JSONL) become conversations, split after `conversation_gap_s` seconds of silence, rendered with
    `chat_format` (a ChatFormat, its JSON, or a chat_format.json path; default "{name}: {message}"
    lines); `exclude_speakers` (comma-separated) drops bots an export does not mark;
    `anonymize_speakers` names speakers user1, user2, ... (CSV exports name people by username);
    messages that are bot commands (one of `command_prefixes`, then a word: "!rank") are dropped with
    their bot's answer. The run folder then holds chat_format.json, and every run gets an n-gram index
    of its text (botkit.engine.copy_index).

    Every run first logs a summary of its data (messages kept and dropped by reason, speakers,
    conversations, tokens, epochs at `steps`, three conversations as the model sees them);
    `dry_run=True` builds only that (`FinetuneResult.summary`), trains nothing and writes nothing.
    """
    # Every keyword argument is a FinetuneOptions field of the same name and default (a test holds them
    # equal); the signature stays spelled out because it is gpt-2-simple's and what `help()` shows.
    options = FinetuneOptions(**{name: value for name, value in locals().items() if name != "dataset"})
    from botkit.train.trainer import train

    return train(dataset, options)


# ---- command line: `botkit finetune` and `botkit encode` -------------------------------------------

HELP = {
    "dataset": ".txt file, folder or glob, one-column .csv, .jsonl, a chat export (DiscordChatExporter .json/.csv, "
    "Telegram result.json, `botkit export-dataset`), or a .npz from `botkit encode`",
    "model": "hub name (gpt2, or gpt-2-simple's 124M/355M/774M/1558M), local folder (also OpenAI's models/124M or a "
    "gpt-2-simple checkpoint/run1), 'scratch' for a new model, or empty for the bundled demo model",
    "steps": "total optimizer steps of the run (the schedule spans them; resuming continues up to this)",
    "accumulate_gradients": "micro-batches per optimizer step (gpt-2-simple's default was 5; here 1)",
    "restore_from": "'latest' continues the run in checkpoint_dir/run_name; '' or 'fresh' starts from --model",
    "block_size": "tokens per training window; 0 = the model's context",
    "val_every": "steps between held-out evaluations; 0 = ten times a run (or at every save, if more often)",
    "early_stopping": "stop after this many held-out evaluations without improvement (0 = off; default 3 with "
    "--val-fraction, else off)",
    "n_layer": "layers of a new model (--model scratch); also --n-embd, --n-head, --n-ctx",
    "train_tokenizer": "train a byte-level BPE tokenizer of --vocab-size on the data (--model scratch only)",
    "stop_at_step": "stop and save at this step without shortening the schedule (0 = run to --steps)",
    "mixed_precision": "auto (bf16/fp16 on GPU, none on CPU), no, fp16 or bf16",
    "lora": "train rank-R LoRA adapters (peft) instead of every weight; 0 = full fine-tuning",
    "lora_alpha": "LoRA scale numerator (0 = twice the rank)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, about a third slower",
    "chat_format": 'how chat exports become text: a chat_format.json or JSON such as \'{"speaker": "<{name}> '
    '{message}"}\' (default "{name}: {message}" lines)',
    "conversation_gap_s": "in chat exports, a silence longer than this (seconds) starts a new conversation",
    "exclude_speakers": "comma-separated names whose messages are dropped (bots a Telegram or CSV export does not "
    "mark)",
    "anonymize_speakers": "in chat exports, name speakers user1, user2, ... (a Discord CSV names people by their "
    "username)",
    "command_prefixes": "in chat exports, a message of one of these characters then a word is a bot command: dropped "
    "with its bot's answer ('' = keep)",
    "dry_run": "print what the data becomes (kept and dropped messages, speakers, tokens, epochs, sample "
    "conversations) and stop",
}
CLI_TYPES = {"early_stopping": int}  # defaults of None
CLI_SKIP = ("dataset", "progress")


def add_cli(subparsers) -> None:
    """Register `finetune` and `encode` on the CLI's subparsers; defaults come from `finetune`'s signature."""
    p = subparsers.add_parser("finetune", help="fine-tune a GPT-2 (or train one from scratch) on your text")
    p.add_argument("--dataset", required=True, help=HELP["dataset"])
    for name, param in inspect.signature(finetune).parameters.items():
        if name in CLI_SKIP:
            continue
        flag, default = "--" + name.replace("_", "-"), param.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=HELP.get(name))
        else:
            kind = CLI_TYPES.get(name, str if default is None else type(default))
            p.add_argument(flag, type=kind, default=default, help=HELP.get(name, f"(default: {default!r})"))
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_finetune)

    e = subparsers.add_parser("encode", help="pre-tokenize a dataset into a .npz cache so fine-tuning starts fast")
    e.add_argument("dataset", help=HELP["dataset"])
    e.add_argument("--out", default="text_encoded.npz", help="the cache file to write (.npz)")
    e.add_argument("--model", default=None, help="whose tokenizer to use: " + HELP["model"])
    e.add_argument("--run-name", default=None, help="use the tokenizer of this run in --checkpoint-dir")
    e.add_argument("--checkpoint-dir", default="checkpoint")
    e.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    for name in ("chat_format", "conversation_gap_s", "exclude_speakers", "command_prefixes"):
        default = inspect.signature(finetune).parameters[name].default
        e.add_argument(
            "--" + name.replace("_", "-"),
            type=float if isinstance(default, float) else str,
            default=default,
            help=HELP[name],
        )
    e.add_argument("--anonymize-speakers", action="store_true", help=HELP["anonymize_speakers"])
    e.set_defaults(func=_run_encode)


def _run_finetune(args) -> None:
    names = [n for n in inspect.signature(finetune).parameters if n != "dataset"]
    kwargs = {n: getattr(args, n) for n in names}
    kwargs["model"] = kwargs["model"] or None
    result = finetune(args.dataset, **kwargs)
    if result.stopped == "dry run":
        print(result.summary)
        print("That was a dry run: nothing was trained or written. Train with the same options without --dry-run.")
        return
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(
        f"Trained {result.run_dir} to step {result.step} (average loss {result.avg_loss:.4f}{val}); stopped by "
        f"{result.stopped}."
    )


def _run_encode(args) -> None:
    from botkit.model.loading import load_model
    from botkit.train.encoding import encode_dataset

    lm = load_model(args.model, run_name=args.run_name, checkpoint_dir=args.checkpoint_dir, device="cpu")
    chats = ConversationOptions.of(
        args.chat_format, args.conversation_gap_s, args.exclude_speakers, args.anonymize_speakers, args.command_prefixes
    )
    stream = encode_dataset(args.dataset, lm.tokenizer, args.out, args.text_field, chats)
    kind = " (chat conversations)" if stream.chat_format else ""
    print(f"Wrote {len(stream):,} tokens of {args.dataset}{kind} to {args.out} (tokenizer of {lm.name}).")
