"""The options of `botkit.finetune` as one typed, frozen value, checked when it is made, and what a
run returns. Torch-free: `botkit --help` and `import botkit` stay fast, and both `finetune.py` (the
public function and the command line) and `trainer.py` (the loop) import it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from botkit.errors import InputError
from botkit.train.conversations import COMMAND_PREFIXES, ConversationOptions

if TYPE_CHECKING:
    from transformers import GPT2Config

    from botkit.chat_format import ChatFormat
    from botkit.model.loading import LoadedModel

SCRATCH = "scratch"  # model="scratch": a new randomly initialised GPT-2 built from n_layer/n_embd/n_head/n_ctx
OPTIMIZERS = ("adamw", "adam", "sgd")  # "adam" is gpt-2-simple's name; both mean AdamW (weight_decay=0 is Adam)
SCHEDULES = ("constant", "cosine", "linear")
RESTORE = ("latest", "fresh")


@dataclass
class FinetuneResult:
    lm: LoadedModel  # the trained model, in eval mode, ready for `botkit.generate`
    run_dir: Path
    step: int
    avg_loss: float
    val_loss: float | None
    best_val_loss: float | None
    stopped: str  # "steps" | "early stopping" | "stop_at_step" | "interrupted" | "dry run"
    summary: str = ""  # what the data became (printed before the first step; all a dry run does)


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of `botkit.finetune` but the dataset, with its defaults (documented there).
    A bad value is refused here, in one sentence, before any model or data is loaded."""

    model: str | GPT2Config | None = None
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    accumulate_gradients: int = 1
    run_name: str = "run1"
    checkpoint_dir: str = "checkpoint"
    sample_dir: str = "samples"
    sample_every: int = 100
    sample_length: int = 200
    sample_num: int = 1
    save_every: int = 500
    print_every: int = 1
    max_checkpoints: int = 1
    restore_from: str = ""
    overwrite: bool = False
    only_train_transformer_layers: bool = False
    optimizer: str = "adamw"
    seed: int = 0
    block_size: int = 0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    lora: int = 0
    lora_alpha: int = 0
    lora_dropout: float = 0.05
    val_fraction: float = 0.0
    val_every: int = 0
    val_batches: int = 40
    early_stopping: int | None = None
    mixed_precision: str = "auto"
    device: str = ""
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_ctx: int = 256
    train_tokenizer: bool = False
    vocab_size: int = 4096
    text_field: str = "text"
    chat_format: str | ChatFormat | None = None
    conversation_gap_s: float = 3600.0
    exclude_speakers: str = ""
    anonymize_speakers: bool = False
    command_prefixes: str = COMMAND_PREFIXES
    stop_at_step: int = 0
    dry_run: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        _check(vars(self))


def _check(args: dict) -> None:
    """The checks of FinetuneOptions, over its fields by name (one sentence per mistake)."""

    def positive(*names):
        for name in names:
            if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] <= 0:
                raise InputError(f"{name} must be a whole number above 0, not {args[name]!r}.")

    def at_least_zero(*names):
        for name in names:
            if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] < 0:
                raise InputError(f"{name} must be a whole number from 0 up, not {args[name]!r}.")

    def finite_at_least_zero(*names):
        for name in names:
            if not isinstance(args[name], int | float) or not 0 <= args[name] < math.inf:
                raise InputError(f"{name} must be a finite number from 0 up, not {args[name]!r}.")

    positive(
        "steps",
        "batch_size",
        "accumulate_gradients",
        "save_every",
        "print_every",
        "max_checkpoints",
        "sample_num",
        "sample_length",
        "val_batches",
        "n_layer",
        "n_embd",
        "n_head",
        "n_ctx",
        "vocab_size",
    )
    at_least_zero("sample_every", "block_size", "warmup_steps", "val_every", "stop_at_step")
    if args["early_stopping"] is not None:
        at_least_zero("early_stopping")
    finite_at_least_zero("weight_decay", "max_grad_norm")
    if not isinstance(args["seed"], int) or not 0 <= args["seed"] < 2**63:
        raise InputError(f"seed must be a whole number from 0 to 2^63 - 1, not {args['seed']!r}.")
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("lr_schedule", SCHEDULES),
        ("restore_from", ("", *RESTORE)),
        ("mixed_precision", ("auto", "no", "fp16", "bf16")),
        ("device", ("", "cpu", "cuda")),
    ):
        if args[name] not in allowed:
            raise InputError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, not {args[name]!r}.")
    if not 0 <= args["val_fraction"] < 1:
        raise InputError(f"val_fraction must be at least 0 and below 1, not {args['val_fraction']!r}.")
    if not 0 < args["learning_rate"] < math.inf:
        raise InputError(f"learning_rate must be a finite number above 0, not {args['learning_rate']!r}.")
    if args["early_stopping"] and not args["val_fraction"]:
        raise InputError("early_stopping needs held-out data: set val_fraction (for example 0.05).")
    if not args["run_name"] or any(c in args["run_name"] for c in "/\\") or args["run_name"].startswith("."):
        raise InputError(f"run_name must be a plain folder name, not {args['run_name']!r}.")
    for name in ("lora", "lora_alpha"):
        if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] < 0:
            raise InputError(
                f"{name} must be a whole number, 0 (off or default) or more such as 8, not {args[name]!r}."
            )
    if args["lora"] and (args["model"] == SCRATCH or not isinstance(args["model"], str | None)):
        raise InputError(
            "LoRA adapts a trained model: pass one as model (--model gpt2, a folder, or models/124M), not a new one."
        )
    if args["lora"] and args["only_train_transformer_layers"]:
        raise InputError(
            "lora already trains only the transformer layers (its adapters): drop only_train_transformer_layers."
        )
    if not 0 <= args["lora_dropout"] < 1:
        raise InputError(f"lora_dropout must be at least 0 and below 1, not {args['lora_dropout']!r}.")
    if args["n_embd"] % args["n_head"]:
        raise InputError(f"n_embd ({args['n_embd']}) must be divisible by n_head ({args['n_head']}).")
    for name in ("checkpoint_dir", "sample_dir"):
        if Path(args[name]).exists() and not Path(args[name]).is_dir():
            raise InputError(
                f"{name} {args[name]} is a file, not a folder: choose a folder for --{name.replace('_', '-')}."
            )
    gap = args["conversation_gap_s"]
    if isinstance(gap, bool) or not (isinstance(gap, int | float) and 0 < gap < math.inf):
        raise InputError(f"conversation_gap_s must be a number of seconds above 0, not {args['conversation_gap_s']!r}.")
    # fails now, not after loading
    ConversationOptions.of(
        args["chat_format"], gap, args["exclude_speakers"], command_prefixes=args["command_prefixes"]
    )
