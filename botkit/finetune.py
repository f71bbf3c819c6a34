"""`botkit finetune`: gpt-2-simple's `finetune` with exact resume, held-out loss, early stopping,
progress, loss plots, from-scratch models and several GPUs (through accelerate).

Several GPUs or mixed precision: `accelerate launch -m botkit finetune --dataset data.txt ...`
(run `accelerate config` once). Each process draws its own batches; the checkpoint is written by
the main process.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import GPT2Config, get_scheduler

from . import checkpoints
from .checkpoints import LossLog, TrainerState
from .datasets import TokenStream, load_tokens, read_documents, train_tokenizer
from .errors import DatasetError, InputError
from .models import LoadedModel, load_model

log = logging.getLogger("botkit")

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
    stopped: str  # "steps" | "early stopping" | "stop_at_step" | "interrupted"


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
    val_fraction: float = 0.0,
    val_every: int = 0,
    val_batches: int = 40,
    early_stopping: int = 0,
    mixed_precision: str = "auto",
    device: str = "",
    n_layer: int = 4,
    n_embd: int = 256,
    n_head: int = 4,
    n_ctx: int = 256,
    train_tokenizer: bool = False,
    vocab_size: int = 4096,
    text_field: str = "text",
    stop_at_step: int = 0,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune `model` on `dataset`; checkpoints go to `checkpoint_dir/run_name/`.

    `model`: hub name, local folder, GPT2Config, "scratch" (a new model from n_layer/n_embd/n_head/n_ctx,
    optionally with a byte-level BPE tokenizer of `vocab_size` trained on the data), or None for the
    bundled demo model. `steps` is the run's total: the learning-rate schedule spans it, and a run
    resumed with `restore_from="latest"` trains until its step count reaches `steps` (pass a larger
    `steps` to train further). `stop_at_step` stops and saves early without changing the schedule.
    `block_size` 0 means the model's context. Held-out loss: the last `val_fraction` of the tokens,
    every `val_every` steps (0: at each save); `early_stopping` N stops after N evaluations without
    improvement and keeps the best model in `run_name/best/`.
    """
    _check_args(locals())
    accelerator = Accelerator(cpu=(device == "cpu"), mixed_precision=_precision(mixed_precision, device))
    run_dir = Path(checkpoint_dir) / run_name
    resume = _prepare_run_dir(run_dir, restore_from, overwrite, accelerator.is_main_process)
    lm, train, val = _model_and_data(dataset, model, resume, run_dir, run_name, seed, n_layer, n_embd, n_head, n_ctx, train_tokenizer, vocab_size, text_field, val_fraction)
    block = block_size or lm.model.config.n_positions
    _check_lengths(train, val, block, lm)

    net = lm.model.train()
    if gradient_checkpointing:
        net.config.use_cache = False
        (getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable)()  # renamed in transformers 5
    params = _trainable(net, only_train_transformer_layers)
    opt = _optimizer(optimizer, params, learning_rate, weight_decay)
    sched = get_scheduler(lr_schedule, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)
    # The scheduler stays unprepared: accelerate would step it once per process, but `steps` counts
    # optimizer steps of the whole run (each process draws its own batch).
    net, opt = accelerator.prepare(net, opt)

    if resume:
        state = checkpoints.load_trainer_state(run_dir, opt, sched, accelerator.scaler)
        log.info("Resuming %s at step %d of %d.", run_name, state.step, steps)
        if state.step >= steps:
            raise InputError(f"Run {run_name!r} has already trained {state.step} steps: pass a larger steps (--steps) to train it further.")
    else:
        state = TrainerState()
        torch.manual_seed(seed)  # dropout; a resumed run restores this RNG from the checkpoint instead
        if accelerator.is_main_process:
            lm.tokenizer.save_pretrained(run_dir)
    loss_log = LossLog.open(run_dir, state.step) if accelerator.is_main_process else None

    def save(rng_state=None) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoints.save_checkpoint(run_dir, accelerator.unwrap_model(net), opt, sched, state, accelerator.scaler, max_checkpoints, rng_state)
            loss_log.plot()

    val_every = val_every or save_every
    last_stop = stop_at_step or steps
    tokens_per_step = batch_size * block * accumulate_gradients * accelerator.num_processes
    bar = tqdm(total=last_stop, initial=state.step, disable=not progress or not accelerator.is_main_process, unit="step", dynamic_ncols=True)
    stopped, val_loss, tokens_per_s, save_pending = "steps", None, None, False
    try:
        while state.step < last_stop:
            started, rng_state = time.perf_counter(), torch.get_rng_state()
            loss = _forward_backward(accelerator, net, train, block, batch_size, accumulate_gradients, seed, state.step)
            if not math.isfinite(loss):
                kept = f"the last good checkpoint (step {_saved_step(run_dir)}) is kept" if checkpoints.has_checkpoint(run_dir) else "no checkpoint was saved"
                raise InputError(f"The loss became {loss} at step {state.step + 1}, so training stopped and {kept}: lower learning_rate (now {learning_rate}) and train again.")
            if save_pending:  # saved only now that these weights gave a finite loss: a checkpoint is always a good one
                save(rng_state)
                save_pending = False
            _optimizer_step(accelerator, net, opt, sched, max_grad_norm)
            state.step += 1
            state.num_tokens += tokens_per_step
            state.add_loss(loss)
            rate = tokens_per_step / (time.perf_counter() - started)
            tokens_per_s = rate if tokens_per_s is None else 0.9 * tokens_per_s + 0.1 * rate
            val_loss = None
            if val is not None and (state.step % val_every == 0 or state.step == steps):
                val_loss = evaluate_loss(accelerator.unwrap_model(net), val, block, batch_size, val_batches)
                net.train()
                if _improved(state, val_loss, early_stopping, accelerator, net, run_dir):
                    stopped = "early stopping"
            if loss_log is not None:
                loss_log.append(step=state.step, loss=loss, avg_loss=state.avg_loss, learning_rate=sched.get_last_lr()[0], tokens_per_s=rate, val_loss=val_loss)
            bar.update(1)
            if state.step % print_every == 0 or val_loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}", avg=f"{state.avg_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            if sample_every and state.step % sample_every == 0 and accelerator.is_main_process:
                _write_samples(lm, accelerator.unwrap_model(net), Path(sample_dir) / run_name, state.step, sample_num, sample_length, seed)
                net.train()
            if stopped == "early stopping":
                log.info("Held-out loss has not improved for %d evaluations: stopping at step %d (best %.4f at step %d, saved in %s).",
                         early_stopping, state.step, state.best_val_loss, state.best_val_step, run_dir / "best")
                break
            save_pending = state.step % save_every == 0
    except KeyboardInterrupt:
        stopped = "interrupted"
        opt.zero_grad(set_to_none=True)  # drop a half-accumulated step; the checkpoint holds whole steps only
        log.warning("Interrupted at step %d: saving; continue with restore_from='latest'.", state.step)
    finally:
        bar.close()
    if stopped == "steps" and state.step < steps:
        stopped = "stop_at_step"
    save()
    net = accelerator.unwrap_model(net).eval()
    return FinetuneResult(LoadedModel(net, lm.tokenizer, run_name), run_dir, state.step, state.avg_loss, val_loss, state.best_val_loss, stopped)


def _forward_backward(accelerator, net, train: TokenStream, block, batch_size, accumulate, seed, step) -> float:
    """Gradients of one optimizer step over `accumulate` micro-batches; returns the mean loss (nats/token)."""
    total = 0.0
    for micro in range(accumulate):
        x = batch_windows(train.tokens, block, batch_size, seed, step, micro, accelerator.process_index).to(accelerator.device)
        loss = net(input_ids=x, labels=x).loss / accumulate  # (B, T) in; labels are shifted inside the model
        accelerator.backward(loss)
        total += loss.item()
    return accelerator.reduce(torch.tensor(total, device=accelerator.device), "mean").item()


def _optimizer_step(accelerator, net, opt, sched, max_grad_norm: float) -> None:
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(net.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def batch_windows(tokens: np.ndarray, block: int, batch_size: int, seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Tensor:
    """(batch_size, block) random windows of the token stream, a pure function of (seed, step, micro,
    rank): a resumed run draws exactly the batches the uninterrupted run would have drawn."""
    rng = np.random.default_rng([seed, step, micro, rank])
    starts = rng.integers(0, len(tokens) - block + 1, size=batch_size)
    return torch.from_numpy(tokens[starts[:, None] + np.arange(block)].astype(np.int64))


@torch.no_grad()
def evaluate_loss(model, stream: TokenStream, block: int, batch_size: int, max_batches: int = 40) -> float:
    """Mean loss (nats/token) over consecutive, non-overlapping blocks of `stream` (the same ones every time)."""
    model.eval()
    num_blocks = min(len(stream) // block, max(1, max_batches) * batch_size)
    windows = torch.from_numpy(stream.tokens[: num_blocks * block].astype(np.int64)).view(num_blocks, block)
    losses = [model(input_ids=x.to(model.device), labels=x.to(model.device)).loss.item() * len(x) for x in windows.split(batch_size)]
    return sum(losses) / num_blocks


def _improved(state: TrainerState, val_loss: float, patience: int, accelerator, net, run_dir: Path) -> bool:
    """Track the best held-out loss; save the best model when early stopping is on. True means stop."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_val_step, state.evals_without_improvement = val_loss, state.step, 0
        if patience and accelerator.is_main_process:
            accelerator.unwrap_model(net).save_pretrained(run_dir / "best")
        return False
    state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience


def _write_samples(lm: LoadedModel, model, out_dir: Path, step: int, num: int, length: int, seed: int) -> None:
    from .generate import generate

    model.eval()
    with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG, or a resumed run would differ
        texts = generate(LoadedModel(model, lm.tokenizer, lm.name), nsamples=num, batch_size=num, length=length, top_k=40, seed=seed + step, return_as_list=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    sep = "\n" + "=" * 20 + "\n"
    (out_dir / f"samples-{step}.txt").write_text(sep.join(texts), encoding="utf-8")
    log.info("======== SAMPLE at step %d ========\n%s", step, sep.join(texts))


def _saved_step(run_dir: Path) -> int:
    return json.loads((run_dir / checkpoints.STATE_JSON).read_text())["step"]


def _prepare_run_dir(run_dir: Path, restore_from: str, overwrite: bool, is_main: bool) -> bool:
    """Return True to resume. An existing run is never replaced or continued unless asked."""
    exists = checkpoints.has_checkpoint(run_dir)
    if restore_from == "latest" and exists:
        if not (run_dir / checkpoints.STATE_PT).is_file():
            raise InputError(f"{run_dir} has a model but no trainer state to resume from: pass it as --model instead, with a new --run-name.")
        return True
    if exists and not overwrite:
        raise InputError(f"Run {run_dir.name!r} already exists in {run_dir.parent}: pass restore_from='latest' (--restore-from latest) to continue it, overwrite=True (--overwrite) to start it over, or another run_name.")
    if exists and is_main:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _model_and_data(dataset, model, resume, run_dir, run_name, seed, n_layer, n_embd, n_head, n_ctx, new_tokenizer, vocab_size, text_field, val_fraction):
    if resume:
        lm = load_model(str(run_dir), device="cpu", dtype="float32")
    elif model == SCRATCH or isinstance(model, GPT2Config):
        if new_tokenizer and str(dataset).endswith(".npz"):
            raise InputError("A tokenizer cannot be trained on an encoded .npz dataset: pass the text dataset.")
        tokenizer = train_tokenizer(read_documents(dataset, text_field), vocab_size) if new_tokenizer else None
        config = model if isinstance(model, GPT2Config) else GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_ctx)
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
            config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        lm = load_model(config, device="cpu", dtype="float32", seed=seed)
        lm = LoadedModel(lm.model, tokenizer or lm.tokenizer, run_name)
        if tokenizer is not None:
            tokenizer.model_max_length = config.n_positions
    else:
        if new_tokenizer:
            raise InputError("train_tokenizer needs a new model (model='scratch'): a pretrained model only understands its own tokenizer.")
        lm = load_model(model, device="cpu", dtype="float32")
    train, val = load_tokens(dataset, lm.tokenizer, text_field).split(val_fraction)
    return lm, train, val


def _check_lengths(train: TokenStream, val: TokenStream | None, block: int, lm: LoadedModel) -> None:
    if block > lm.model.config.n_positions:
        raise InputError(f"block_size {block} is longer than the model's context of {lm.model.config.n_positions} tokens: lower it.")
    if len(train) < block:
        raise DatasetError(f"The dataset has {len(train)} training tokens, fewer than one block of {block}: add text or lower block_size.")
    if val is not None and len(val) < block:
        raise DatasetError(f"The held-out part has {len(val)} tokens, fewer than one block of {block}: raise val_fraction, add text or lower block_size.")
    if int(train.tokens.max()) >= lm.model.config.vocab_size:
        raise DatasetError(f"{train.source} has token ids beyond this model's vocabulary: it was encoded for another model.")


def _trainable(net, only_transformer_layers: bool) -> list[torch.nn.Parameter]:
    if only_transformer_layers:  # gpt-2-simple: train the blocks, freeze embeddings and the final norm
        for name, param in net.named_parameters():
            param.requires_grad = ".h." in f".{name}"
    return [p for p in net.parameters() if p.requires_grad]


def _optimizer(name: str, params, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)  # one kernel per step, not one per tensor


def _precision(mixed_precision: str, device: str) -> str:
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cpu" or not torch.cuda.is_available():
        return "no"  # CPU half-precision matmuls are slower than float32
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _check_args(args: dict) -> None:
    def positive(*names):
        for name in names:
            if not isinstance(args[name], int) or isinstance(args[name], bool) or args[name] <= 0:
                raise InputError(f"{name} must be a whole number above 0, not {args[name]!r}.")

    positive("steps", "batch_size", "accumulate_gradients", "save_every", "print_every", "max_checkpoints", "sample_num", "sample_length")
    for name, allowed in (("optimizer", OPTIMIZERS), ("lr_schedule", SCHEDULES), ("restore_from", ("", *RESTORE)),
                          ("mixed_precision", ("auto", "no", "fp16", "bf16")), ("device", ("", "cpu", "cuda"))):
        if args[name] not in allowed:
            raise InputError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, not {args[name]!r}.")
    if not 0 <= args["val_fraction"] < 1:
        raise InputError(f"val_fraction must be at least 0 and below 1, not {args['val_fraction']!r}.")
    if not (args["learning_rate"] > 0):
        raise InputError(f"learning_rate must be above 0, not {args['learning_rate']!r}.")
    if args["mixed_precision"] == "fp16" and (args["device"] == "cpu" or not torch.cuda.is_available()):
        raise InputError("mixed_precision='fp16' needs a CUDA GPU: use 'bf16' or 'no' on CPU.")
    if args["early_stopping"] and not args["val_fraction"]:
        raise InputError("early_stopping needs held-out data: set val_fraction (for example 0.05).")
    if not args["run_name"] or any(c in args["run_name"] for c in "/\\") or args["run_name"].startswith("."):
        raise InputError(f"run_name must be a plain folder name, not {args['run_name']!r}.")
    if args["n_embd"] % args["n_head"]:
        raise InputError(f"n_embd ({args['n_embd']}) must be divisible by n_head ({args['n_head']}).")




# ---- command line: `botkit finetune` and `botkit encode` -------------------------------------------

HELP = {
    "dataset": ".txt file, folder or glob of .txt files, one-column .csv, .jsonl, or a .npz from `botkit encode`",
    "model": "hub name (gpt2), local folder, 'scratch' for a new model, or empty for the bundled demo model",
    "steps": "total optimizer steps of the run (the schedule spans them; resuming continues up to this)",
    "accumulate_gradients": "micro-batches per optimizer step (gpt-2-simple's default was 5; here 1)",
    "restore_from": "'latest' continues the run in checkpoint_dir/run_name; '' or 'fresh' starts from --model",
    "block_size": "tokens per training window; 0 = the model's context",
    "val_every": "steps between held-out evaluations; 0 = at every save",
    "early_stopping": "stop after this many held-out evaluations without improvement (0 = off)",
    "n_layer": "layers of a new model (--model scratch); also --n-embd, --n-head, --n-ctx",
    "train_tokenizer": "train a byte-level BPE tokenizer of --vocab-size on the data (--model scratch only)",
    "stop_at_step": "stop and save at this step without shortening the schedule (0 = run to --steps)",
    "mixed_precision": "auto (bf16/fp16 on GPU, none on CPU), no, fp16 or bf16",
}
CLI_SKIP = ("dataset", "progress")


def add_cli(subparsers) -> None:
    """Register `finetune` and `encode` on the CLI's subparsers; defaults come from `finetune`'s signature."""
    import inspect

    p = subparsers.add_parser("finetune", help="fine-tune a GPT-2 (or train one from scratch) on your text")
    p.add_argument("--dataset", required=True, help=HELP["dataset"])
    for name, param in inspect.signature(finetune).parameters.items():
        if name in CLI_SKIP:
            continue
        flag, default = "--" + name.replace("_", "-"), param.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default, help=HELP.get(name))
        else:
            kind = str if default is None else type(default)
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
    e.set_defaults(func=_run_encode)


def _run_finetune(args) -> None:
    names = [n for n in __import__("inspect").signature(finetune).parameters if n != "dataset"]
    kwargs = {n: getattr(args, n) for n in names}
    kwargs["model"] = kwargs["model"] or None
    result = finetune(args.dataset, **kwargs)
    val = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"Trained {result.run_dir} to step {result.step} (average loss {result.avg_loss:.4f}{val}); stopped by {result.stopped}.")


def _run_encode(args) -> None:
    from .datasets import encode_dataset

    lm = load_model(args.model, run_name=args.run_name, checkpoint_dir=args.checkpoint_dir, device="cpu")
    stream = encode_dataset(args.dataset, lm.tokenizer, args.out, args.text_field)
    print(f"Wrote {len(stream):,} tokens of {args.dataset} to {args.out} (tokenizer of {lm.name}).")
