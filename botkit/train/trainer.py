"""The fine-tuning loop behind `botkit.finetune`: exact resume, held-out loss, early stopping,
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoTokenizer, GPT2Config, get_scheduler

from botkit.engine.copy_index import write_index
from botkit.engine.training_texts import document_lines, write_texts
from botkit.errors import BotkitError, DatasetError, InputError
from botkit.model.loading import LoadedModel, load_model
from botkit.model.sources import folder_kind, resolve
from botkit.model.tokenizer import finish_tokenizer
from botkit.train import run_folder as checkpoints
from botkit.train.conversations import ConversationOptions
from botkit.train.data_summary import DataSummary
from botkit.train.encoding import DatasetReader, TokenStream, load_tokens, train_tokenizer
from botkit.train.options import SCRATCH, FinetuneOptions, FinetuneResult
from botkit.train.run_folder import LossLog, TrainerState

log = logging.getLogger("botkit")

DEFAULT_PATIENCE = 3  # early stopping with held-out data and no early_stopping given: evaluations without improvement
NUM_EVALUATIONS = 10  # held-out evaluations a run makes when val_every is 0 (unless saves come more often)
PLAIN_PROGRESS_EVERY_S = 10.0  # without a terminal, one plain progress line this often instead of a redrawn bar


@dataclass
class _Run:
    """What setup builds for the loop and finish. A dry run stops after the data: the rest stays None."""

    accelerator: Accelerator
    run_dir: Path
    lm: LoadedModel
    stream: TokenStream  # the whole dataset, as read
    train: TokenStream
    val: TokenStream | None
    block: int
    tokens_per_step: int
    summary: str
    early_stopping: int = 0
    net: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    sched: object = None
    state: TrainerState | None = None
    loss_log: LossLog | None = None  # main process only


def train(dataset: str, o: FinetuneOptions) -> FinetuneResult:
    """The training behind `botkit.finetune` (which documents the options `o`, checked when made)."""
    run = _setup(dataset, o)
    if o.dry_run:
        return FinetuneResult(run.lm, run.run_dir, 0, math.nan, None, None, "dry run", run.summary)
    stopped, val_loss = _loop(run, o)
    return _finish(run, o, stopped, val_loss)


def _setup(dataset: str, o: FinetuneOptions) -> _Run:
    """The run folder, the data and its summary, then (unless a dry run) the model, optimizer and trainer state."""
    accelerator = Accelerator(cpu=(o.device == "cpu"), mixed_precision=_precision(o.mixed_precision, o.device))
    run_dir = Path(o.checkpoint_dir) / o.run_name
    if o.dry_run:  # reads the data, writes nothing
        resume = o.restore_from == "latest" and checkpoints.has_checkpoint(run_dir)
    else:
        resume = _prepare_run_dir(run_dir, o.restore_from, o.overwrite, accelerator.is_main_process)
    chats = ConversationOptions.of(
        o.chat_format, o.conversation_gap_s, o.exclude_speakers, o.anonymize_speakers, o.command_prefixes
    )
    lm, base, stream = _model_and_data(
        dataset,
        o.model,
        resume,
        run_dir,
        o.run_name,
        o.seed,
        o.n_layer,
        o.n_embd,
        o.n_head,
        o.n_ctx,
        o.train_tokenizer,
        o.vocab_size,
        o.text_field,
        chats,
        o.lora,
    )
    block = o.block_size or lm.model.config.n_positions
    train, val, val_note = held_out(stream, o.val_fraction, block)
    tokens_per_step = o.batch_size * block * o.accumulate_gradients * accelerator.num_processes
    summary = (stream.summary or DataSummary()).report(
        len(train), len(val) if val is not None else 0, tokens_per_step, o.steps, val_note
    )
    try:
        _check_lengths(train, val, block, lm)
    except BotkitError as exc:
        if not o.dry_run:
            raise
        summary += f"\nTraining with these options would stop at once: {exc}"
    run = _Run(accelerator, run_dir, lm, stream, train, val, block, tokens_per_step, summary)
    if o.dry_run:
        return run
    if accelerator.is_main_process:
        log.info("The data of run %s:\n%s", o.run_name, summary)
    run.early_stopping = (
        o.early_stopping if o.early_stopping is not None else DEFAULT_PATIENCE if val is not None else 0
    )

    if o.lora > lm.model.config.n_embd:  # checked before peft allocates the adapters (7.5 GB for a huge rank)
        raise InputError(
            f"lora rank {o.lora} is above the model's width of {lm.model.config.n_embd}, where a rank "
            "stops adding anything: "
            "pass a smaller one such as 8."
        )
    net = lm.model.train()
    if o.lora:
        from botkit.model import lora

        torch.manual_seed(o.seed)  # the adapters' random A matrices
        net = (
            lora.load_adapter(net, run_dir, is_trainable=True)
            if resume
            else lora.add_lora(net, base, o.lora, o.lora_alpha, o.lora_dropout)
        )
    if o.gradient_checkpointing:
        net.config.use_cache = False
        # renamed in transformers 5
        (getattr(net, "activation_checkpointing_enable", None) or net.gradient_checkpointing_enable)()
    params = _trainable(net, o.only_train_transformer_layers)  # with LoRA: the adapters only
    opt = _optimizer(o.optimizer, params, o.learning_rate, o.weight_decay)
    run.sched = get_scheduler(o.lr_schedule, opt, num_warmup_steps=o.warmup_steps, num_training_steps=o.steps)
    # The scheduler stays unprepared: accelerate would step it once per process, but `steps` counts
    # optimizer steps of the whole run (each process draws its own batch).
    run.net, run.opt = accelerator.prepare(net, opt)

    if resume:
        run.state = checkpoints.load_trainer_state(run_dir, run.opt, run.sched, accelerator.scaler)
        log.info("Resuming %s at step %d of %d.", o.run_name, run.state.step, o.steps)
        if run.state.step >= o.steps:
            raise InputError(
                f"Run {o.run_name!r} has already trained {run.state.step} steps: pass a larger steps "
                "(--steps) to train it further."
            )
    else:
        run.state = TrainerState()
        torch.manual_seed(o.seed)  # dropout; a resumed run restores this RNG from the checkpoint instead
        if accelerator.is_main_process:
            lm.tokenizer.save_pretrained(run_dir)
            if stream.chat_format is not None:
                stream.chat_format.save(run_dir)  # serving and `botkit generate` read it back (LoadedModel.chat_format)
            write_index(run_dir, stream.tokens, lm.tokenizer.eos_token_id)  # for copying.check_copying: no parroting
            # no short text whole
            write_texts(run_dir, document_lines(stream.tokens, lm.tokenizer.eos_token_id, lm.tokenizer.decode))
    run.loss_log = LossLog.open(run_dir, run.state.step) if accelerator.is_main_process else None
    return run


def _loop(run: _Run, o: FinetuneOptions) -> tuple[str, float | None]:
    """Optimizer steps until `steps` (or stop_at_step), early stopping or Ctrl-C; returns why it
    stopped ("steps", "early stopping" or "interrupted") and the last step's held-out loss."""
    accelerator, net, state = run.accelerator, run.net, run.state
    val_every = o.val_every or min(o.save_every, max(1, o.steps // NUM_EVALUATIONS))
    last_stop = o.stop_at_step or o.steps
    bar = Progress(last_stop, state.step, o.progress and accelerator.is_main_process)
    stopped, val_loss, tokens_per_s, save_pending = "steps", None, None, False
    try:
        while state.step < last_stop:
            started, rng_state = time.perf_counter(), torch.get_rng_state()
            loss = _forward_backward(
                accelerator, net, run.train, run.block, o.batch_size, o.accumulate_gradients, o.seed, state.step
            )
            if not math.isfinite(loss):
                kept = (
                    f"the last good checkpoint (step {_saved_step(run.run_dir)}) is kept"
                    if checkpoints.has_checkpoint(run.run_dir)
                    else "no checkpoint was saved"
                )
                raise InputError(
                    f"The loss became {loss} at step {state.step + 1}, so training stopped and {kept}: "
                    f"lower learning_rate (now {o.learning_rate}) and train again."
                )
            if save_pending:  # saved only now that these weights gave a finite loss: a checkpoint is always a good one
                _save(run, o, rng_state)
                save_pending = False
            _optimizer_step(accelerator, net, run.opt, run.sched, o.max_grad_norm)
            state.step += 1
            state.num_tokens += run.tokens_per_step
            state.add_loss(loss)
            rate = run.tokens_per_step / (time.perf_counter() - started)
            tokens_per_s = rate if tokens_per_s is None else 0.9 * tokens_per_s + 0.1 * rate
            val_loss = None
            if run.val is not None and (state.step % val_every == 0 or state.step == o.steps):
                val_loss = evaluate_loss(accelerator.unwrap_model(net), run.val, run.block, o.batch_size, o.val_batches)
                net.train()
                if _improved(state, val_loss, run.early_stopping, accelerator, net, run.run_dir):
                    stopped = "early stopping"
            if run.loss_log is not None:
                run.loss_log.append(
                    step=state.step,
                    loss=loss,
                    avg_loss=state.avg_loss,
                    learning_rate=run.sched.get_last_lr()[0],
                    tokens_per_s=rate,
                    val_loss=val_loss,
                )
            if state.step % o.print_every == 0 or val_loss is not None:
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    avg=f"{state.avg_loss:.3f}",
                    tok_s=f"{tokens_per_s:,.0f}",
                    **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}),
                )
            bar.update(state.step)
            if o.sample_every and state.step % o.sample_every == 0 and accelerator.is_main_process:
                _write_samples(
                    run.lm,
                    accelerator.unwrap_model(net),
                    Path(o.sample_dir) / o.run_name,
                    state.step,
                    o.sample_num,
                    o.sample_length,
                    o.seed,
                )
                net.train()
            if stopped == "early stopping":
                log.info(
                    "Held-out loss has not improved for %d evaluations: stopping at step %d (best %.4f at step "
                    "%d, saved in %s).",
                    run.early_stopping,
                    state.step,
                    state.best_val_loss,
                    state.best_val_step,
                    run.run_dir / "best",
                )
                break
            save_pending = state.step % o.save_every == 0
    except KeyboardInterrupt:
        stopped = "interrupted"
        run.opt.zero_grad(set_to_none=True)  # drop a half-accumulated step; the checkpoint holds whole steps only
        log.warning("Interrupted at step %d: saving; continue with restore_from='latest'.", state.step)
    finally:
        bar.close()
    return stopped, val_loss


def _finish(run: _Run, o: FinetuneOptions, stopped: str, val_loss: float | None) -> FinetuneResult:
    """Save the last step and hand back the trained model, ready to generate."""
    if stopped == "steps" and run.state.step < o.steps:
        stopped = "stop_at_step"
    _save(run, o)
    net = run.accelerator.unwrap_model(run.net).eval()
    if o.lora:
        from botkit.model import lora

        net = lora.merged(net)  # saved already: the result is the plain model with the adapter added in
    trained = LoadedModel(net, run.lm.tokenizer, o.run_name, run.stream.chat_format, run.run_dir)
    return FinetuneResult(
        trained,
        run.run_dir,
        run.state.step,
        run.state.avg_loss,
        val_loss,
        run.state.best_val_loss,
        stopped,
        run.summary,
    )


def _save(run: _Run, o: FinetuneOptions, rng_state=None) -> None:
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        checkpoints.save_checkpoint(
            run.run_dir,
            run.accelerator.unwrap_model(run.net),
            run.opt,
            run.sched,
            run.state,
            run.accelerator.scaler,
            o.max_checkpoints,
            rng_state,
        )
        run.loss_log.plot()


def _forward_backward(accelerator, net, train: TokenStream, block, batch_size, accumulate, seed, step) -> float:
    """Gradients of one optimizer step over `accumulate` micro-batches; returns the mean loss (nats/token)."""
    total = 0.0
    for micro in range(accumulate):
        x = batch_windows(train.tokens, block, batch_size, seed, step, micro, accelerator.process_index).to(
            accelerator.device
        )
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


def batch_windows(
    tokens: np.ndarray, block: int, batch_size: int, seed: int, step: int, micro: int = 0, rank: int = 0
) -> torch.Tensor:
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
    losses = [
        model(input_ids=x.to(model.device), labels=x.to(model.device)).loss.item() * len(x)
        for x in windows.split(batch_size)
    ]
    return sum(losses) / num_blocks


def _improved(state: TrainerState, val_loss: float, patience: int, accelerator, net, run_dir: Path) -> bool:
    """Track the best held-out loss; save the best model when early stopping is on. True means stop."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_val_step, state.evals_without_improvement = val_loss, state.step, 0
        if patience and accelerator.is_main_process:
            checkpoints.save_model(accelerator.unwrap_model(net), run_dir / "best")
        return False
    state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience


def _write_samples(lm: LoadedModel, model, out_dir: Path, step: int, num: int, length: int, seed: int) -> None:
    from botkit.engine.generate import generate

    model.eval()
    with torch.random.fork_rng(devices=[]):  # sampling must not move the training RNG, or a resumed run would differ
        gpt2 = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: applied on the fly
        texts = generate(
            LoadedModel(gpt2, lm.tokenizer, lm.name),
            nsamples=num,
            batch_size=num,
            length=length,
            top_k=40,
            seed=seed + step,
            return_as_list=True,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    sep = "\n" + "=" * 20 + "\n"
    (out_dir / f"samples-{step}.txt").write_text(sep.join(texts), encoding="utf-8")
    log.info("======== SAMPLE at step %d ========\n%s", step, sep.join(texts))


def _saved_step(run_dir: Path) -> int:
    return json.loads((run_dir / checkpoints.STATE_JSON).read_text())["step"]


def _prepare_run_dir(run_dir: Path, restore_from: str, overwrite: bool, is_main: bool) -> bool:
    """Return True to resume. An existing run is never replaced or continued unless asked."""
    exists = checkpoints.has_checkpoint(run_dir)
    if not exists and folder_kind(run_dir) == "tf":
        raise InputError(
            f"{run_dir} holds a TensorFlow run (gpt-2-simple's): pass it as --model {run_dir} and choose "
            "another --run-name."
        )
    if restore_from == "latest" and exists:
        if not (run_dir / checkpoints.STATE_PT).is_file():
            raise InputError(
                f"{run_dir} has a model but no trainer state to resume from: pass it as --model instead, "
                "with a new --run-name."
            )
        return True
    if exists and not overwrite:
        raise InputError(
            f"Run {run_dir.name!r} already exists in {run_dir.parent}: pass restore_from='latest' "
            "(--restore-from latest) to continue it, overwrite=True (--overwrite) to start it over, or "
            "another run_name."
        )
    if exists and is_main:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _model_and_data(
    dataset,
    model,
    resume,
    run_dir,
    run_name,
    seed,
    n_layer,
    n_embd,
    n_head,
    n_ctx,
    new_tokenizer,
    vocab_size,
    text_field,
    chats,
    rank,
):
    """The model to train (for LoRA: its base, and the Source it came from) and the data as one token stream."""
    base = None
    if resume:
        lm = _resumed_model(run_dir, rank)
    elif model == SCRATCH or isinstance(model, GPT2Config):
        if new_tokenizer and str(dataset).endswith(".npz"):
            raise InputError("A tokenizer cannot be trained on an encoded .npz dataset: pass the text dataset.")
        segments = DatasetReader(dataset, text_field, chats).segments() if new_tokenizer else ()
        tokenizer = train_tokenizer((text for text, _ in segments), vocab_size) if new_tokenizer else None
        config = (
            model
            if isinstance(model, GPT2Config)
            else GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_ctx)
        )
        if tokenizer is not None:
            config.vocab_size = len(tokenizer)
            config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        lm = load_model(config, device="cpu", dtype="float32", seed=seed)
        lm = LoadedModel(lm.model, tokenizer or lm.tokenizer, run_name)
        if tokenizer is not None:
            tokenizer.model_max_length = config.n_positions
    else:
        if new_tokenizer:
            raise InputError(
                "train_tokenizer needs a new model (model='scratch'): a pretrained model only understands "
                "its own tokenizer."
            )
        base = resolve(model)
        lm = load_model(base, device="cpu", dtype="float32")
    return lm, base, load_tokens(dataset, lm.tokenizer, text_field, chats)


def _resumed_model(run_dir: Path, rank: int) -> LoadedModel:
    """The run's model to continue; for a LoRA run its base, unmerged (the adapter is loaded on it later)."""
    if folder_kind(run_dir) != "lora":
        if rank:
            raise InputError(
                f"Run {run_dir.name!r} trains every weight: continue it without --lora, or start a LoRA "
                "run under another --run-name."
            )
        return load_model(str(run_dir), device="cpu", dtype="float32")
    from botkit.model import lora

    saved = lora.read_adapter_config(run_dir)["r"]
    if rank != saved:
        raise InputError(f"Run {run_dir.name!r} is a LoRA run of rank {saved}: pass --lora {saved} to continue it.")
    base = load_model(lora.base_source(run_dir), device="cpu", dtype="float32")
    return LoadedModel(base.model, finish_tokenizer(AutoTokenizer.from_pretrained(run_dir)), run_dir.name)


def held_out(stream: TokenStream, val_fraction: float, block: int) -> tuple[TokenStream, TokenStream | None, str]:
    """The training part, the held-out tail (`val_fraction` of the tokens, at least one block) and a
    sentence for the summary. Data too small to hold out a block and keep most of it trains without."""
    if val_fraction <= 0:
        return stream, None, ""
    num_val = max(math.ceil(len(stream) * val_fraction), block)
    if num_val > len(stream) // 2:
        note = (
            f"No held-out part: {len(stream):,} tokens are too few to hold out a block of {block} and train on the "
            "rest "
            "(add text or lower block_size to get held-out loss and early stopping)."
        )
        log.warning(note)
        return stream, None, note
    train, val = stream.split(num_val / len(stream))
    note = (
        f"Held out: the last {len(val):,} tokens{' (one block, more than val_fraction)' if len(val) <= block else ''}."
    )
    return train, val, note


def _check_lengths(train: TokenStream, val: TokenStream | None, block: int, lm: LoadedModel) -> None:
    if block > lm.model.config.n_positions:
        raise InputError(
            f"block_size {block} is longer than the model's context of {lm.model.config.n_positions} tokens: lower it."
        )
    if len(train) < block:
        raise DatasetError(
            f"The dataset has {len(train)} training tokens, fewer than one block of {block}: add text "
            "or lower block_size."
        )
    if int(train.tokens.max()) >= lm.model.config.vocab_size:
        raise DatasetError(
            f"{train.source} has token ids beyond this model's vocabulary: it was encoded for another model."
        )


def _trainable(net, only_transformer_layers: bool) -> list[torch.nn.Parameter]:
    if only_transformer_layers:  # gpt-2-simple: train the blocks, freeze embeddings and the final norm
        for name, param in net.named_parameters():
            param.requires_grad = ".h." in f".{name}"
    return [p for p in net.parameters() if p.requires_grad]


def _optimizer(name: str, params, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    # one kernel per step, not one per tensor
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, fused=True)


def _precision(mixed_precision: str, device: str) -> str:
    if mixed_precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise InputError("mixed_precision='fp16' needs a CUDA GPU: use 'bf16' or 'no' on CPU.")
    if mixed_precision != "auto":
        return mixed_precision
    if device == "cpu" or not torch.cuda.is_available():
        return "no"  # CPU half-precision matmuls are slower than float32
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class Progress:
    """A tqdm bar on a terminal, with log lines (samples) printed above it, never glued to it; without
    a terminal (a log file, systemd, `docker logs`) a plain line every PLAIN_PROGRESS_EVERY_S instead
    of one carriage-return frame per step."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.is_plain = enabled and not sys.stderr.isatty()
        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled or self.is_plain, unit="step", dynamic_ncols=True
        )
        self.postfix: dict[str, str] = {}
        self.last_line_at = time.monotonic()
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def set_postfix(self, **postfix: str) -> None:
        self.postfix = postfix
        self.bar.set_postfix(postfix, refresh=False)

    def update(self, step: int) -> None:
        self.bar.update(1)
        now = time.monotonic()
        if self.is_plain and (now - self.last_line_at >= PLAIN_PROGRESS_EVERY_S or step == self.total):
            self.last_line_at = now
            print(
                f"step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in self.postfix.items()),
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()
        self._redirect.__exit__(None, None, None)
