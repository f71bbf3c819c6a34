"""A fine-tuning run's folder: the Hugging Face model at its top level, the trainer state beside it
(so a resumed run is the same run), the loss log and its plot.

    checkpoint/<run_name>/
        config.json, model.safetensors, generation_config.json, tokenizer files   <- from_pretrained()
          (a LoRA run: adapter_config.json, adapter_model.safetensors instead: the adapter alone)
        trainer_state.json   step, average loss, best held-out loss (readable)
        trainer_state.pt     optimizer, scheduler, RNG and grad-scaler state
        loss.csv, loss.png   one row per step; the curve, refreshed while training
        best/                the model with the lowest held-out loss (with early stopping)
        checkpoint-<step>/   the previous max_checkpoints - 1 models (with their tokenizer)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
LOSS_COLUMNS = ("step", "loss", "avg_loss", "learning_rate", "tokens_per_s", "val_loss")


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimizer to continue exactly."""

    step: int = 0
    avg_loss_sum: float = 0.0  # gpt-2-simple's decaying average: sum and weight, both *0.99 per step
    avg_loss_weight: float = 0.0
    best_val_loss: float | None = None
    best_val_step: int | None = None
    evals_without_improvement: int = 0
    num_tokens: int = 0

    @property
    def avg_loss(self) -> float:
        return self.avg_loss_sum / self.avg_loss_weight if self.avg_loss_weight else float("nan")

    def add_loss(self, loss: float) -> None:
        self.avg_loss_sum = self.avg_loss_sum * 0.99 + loss
        self.avg_loss_weight = self.avg_loss_weight * 0.99 + 1.0


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / STATE_JSON).is_file() or (run_dir / "config.json").is_file()


def save_checkpoint(
    run_dir: Path,
    model,
    optimizer,
    scheduler,
    state: TrainerState,
    scaler=None,
    max_checkpoints: int = 1,
    rng_state=None,
) -> None:
    """Write the model (Hugging Face format) and the trainer state. Files are written to a temporary
    folder first and moved into place, so a crash mid-save leaves the previous checkpoint readable.
    `rng_state` is the torch RNG as it was when `state.step` ended (default: as it is now)."""
    if max_checkpoints > 1 and (run_dir / STATE_JSON).is_file():
        _archive_previous(run_dir, max_checkpoints - 1)
    tmp = run_dir / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "torch_rng": torch.get_rng_state() if rng_state is None else rng_state,
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        tmp / STATE_PT,
    )
    (tmp / STATE_JSON).write_text(json.dumps(asdict(state), indent=2))
    for path in sorted(tmp.iterdir(), key=lambda p: p.name == STATE_JSON):  # the step file last: it marks completion
        os.replace(path, run_dir / path.name)
    tmp.rmdir()


def save_model(model, folder: Path) -> None:
    """save_pretrained; a LoRA model (peft's) saves its adapter alone, without peft's hub look-up of the base's
    vocabulary size."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder)


MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def _archive_previous(run_dir: Path, num_copies: int) -> None:
    """Copy the model about to be replaced to checkpoint-<step>/ (copied, not moved, so the top level
    stays loadable throughout), keeping the newest `num_copies` of them."""
    step = json.loads((run_dir / STATE_JSON).read_text())["step"]
    dest = run_dir / f"checkpoint-{step}"
    dest.mkdir(exist_ok=True)
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, dest / name)
    copies = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in copies[:-num_copies]:
        shutil.rmtree(old)


def load_trainer_state(run_dir: Path, optimizer, scheduler, scaler=None) -> TrainerState:
    """Restore optimizer, scheduler, scaler and RNG into the given objects; return the loop state."""
    state = TrainerState(**json.loads((run_dir / STATE_JSON).read_text()))
    saved = torch.load(run_dir / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    return state


@dataclass
class LossLog:
    """loss.csv (one row per step) and loss.png. On resume, rows after the checkpoint's step are dropped
    so the log continues exactly where the weights do."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, run_dir: Path, resume_step: int) -> LossLog:
        log = cls(run_dir / LOSS_CSV)
        if resume_step and log.path.is_file():
            with log.path.open(newline="") as f:
                log.rows = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with log.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(log.rows)
        return log

    def append(self, **row) -> None:
        row = {key: _fmt(row.get(key)) for key in LOSS_COLUMNS}
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, LOSS_COLUMNS, lineterminator="\n").writerow(row)

    def plot(self) -> Path:
        """Draw loss.png: training loss, its running average and held-out loss against the step."""
        steps = [int(r["step"]) for r in self.rows]
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)  # a canvas of its own: no pyplot global state, safe in any thread
        ax = fig.add_subplot()
        ax.plot(steps, [float(r["loss"]) for r in self.rows], lw=0.6, alpha=0.4, label="loss")
        ax.plot(steps, [float(r["avg_loss"]) for r in self.rows], lw=1.5, label="average loss")
        val = [(int(r["step"]), float(r["val_loss"])) for r in self.rows if r["val_loss"]]
        if val:
            ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.path.with_name(LOSS_PNG)
        fig.savefig(out)
        return out


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
