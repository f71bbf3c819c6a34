"""`botkit convert`, `download`, `export` and `import`: bring a model or a run in, or take it away.

    botkit convert models/124M gpt2-hf          OpenAI's TensorFlow download -> a Hugging Face folder
    botkit convert checkpoint/run1 run1-hf      a gpt-2-simple run, the same way
    botkit convert checkpoint/lora1 out --merge a LoRA run -> its base with the adapter merged in
    botkit download 355M                        gpt-2-simple's download_gpt2 (models/355M)
    botkit export run1 run1.tar.gz              a run as one file with checksums ...
    botkit import run1.tar.gz                   ... and back, on another machine

The output of `convert` is what `from_pretrained`, vLLM and `botkit run` load: config.json,
model.safetensors (float32, the output head tied to the token embeddings) and tokenizer files.
Light at import: torch loads only when a model does.
"""

from __future__ import annotations

from pathlib import Path

from botkit.errors import InputError
from botkit.model.sources import resolve


def convert(src: str, dst: str, *, merge: bool = False, checkpoint_dir: str = "checkpoint") -> Path:
    """Write the model `src` (any source botkit loads, or a run name in `checkpoint_dir`) to the new
    folder `dst` in Hugging Face's format."""
    path = Path(src)
    if not path.exists() and (Path(checkpoint_dir) / src).is_dir():
        path = Path(checkpoint_dir) / src  # a run name, as gpt-2-simple users say it
    source = resolve(path if path.exists() else src)
    if source.kind == "lora" and not merge:
        raise InputError(
            f"{src} is a LoRA run (the adapter alone, which is already peft's format): pass --merge to "
            "write its base model with the adapter merged in."
        )
    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not an empty folder: choose a new folder.")
    from botkit.model.loading import load_model

    lm = load_model(source, device="cpu", dtype="float32")
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    return out


def add_cli(subparsers) -> None:
    c = subparsers.add_parser(
        "convert", help="write any model botkit loads (TensorFlow GPT-2, LoRA run) as a Hugging Face folder"
    )
    c.add_argument(
        "src", help="models/124M (OpenAI), checkpoint/run1 (gpt-2-simple or botkit), a hub name, or a run name"
    )
    c.add_argument("dst", help="the new folder to write (config.json, model.safetensors, tokenizer)")
    c.add_argument("--merge", action="store_true", help="a LoRA run: merge its adapter into the base model's weights")
    c.add_argument("--checkpoint-dir", default="checkpoint", help="where run names are looked up")
    c.set_defaults(
        func=lambda a: print(f"Wrote {convert(a.src, a.dst, merge=a.merge, checkpoint_dir=a.checkpoint_dir)}.")
    )

    d = subparsers.add_parser(
        "download", help="gpt-2-simple's download_gpt2: put 124M, 355M, 774M or 1558M in --model-dir"
    )
    d.add_argument("model_name", help="124M (gpt2), 355M (gpt2-medium), 774M (gpt2-large) or 1558M (gpt2-xl)")
    d.add_argument("--model-dir", default="models")
    d.set_defaults(func=_download)

    e = subparsers.add_parser(
        "export", help="write a run to one .tar.gz with checksums (gpt-2-simple's copy_checkpoint_to_gdrive)"
    )
    e.add_argument("run", help="a run name in --checkpoint-dir, or a run folder")
    e.add_argument("archive", help="the file to write, such as run1.tar.gz")
    e.add_argument("--checkpoint-dir", default="checkpoint")
    e.set_defaults(func=_export)

    i = subparsers.add_parser(
        "import", help="unpack a run from `botkit export` into --checkpoint-dir, checking every file"
    )
    i.add_argument("archive")
    i.add_argument("--checkpoint-dir", default="checkpoint")
    i.add_argument("--run-name", default=None, help="import under this name instead of the exported one")
    i.set_defaults(func=_import)


def _download(args) -> None:
    from botkit.model.gpt2_simple import download_gpt2

    print(f"GPT-2 {args.model_name} is in {download_gpt2(args.model_dir, args.model_name)}.")


def _export(args) -> None:
    from botkit.model.run_archive import export_run

    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.checkpoint_dir) / args.run
    count = export_run(run_dir, Path(args.archive))
    print(
        f"Wrote {count} files of {run_dir} to {args.archive}; on the other machine: botkit import "
        f"{Path(args.archive).name}"
    )


def _import(args) -> None:
    from botkit.model.run_archive import import_run

    run_dir = import_run(Path(args.archive), Path(args.checkpoint_dir), args.run_name)
    print(f"Imported {run_dir}: use it with --run-name {run_dir.name} (--checkpoint-dir {args.checkpoint_dir}).")
