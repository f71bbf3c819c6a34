"""Rebuild botkit/assets/gpt2 (OpenAI's GPT-2 BPE files, MIT) from a package-registry source.

The `openai-whisper` sdist on PyPI ships `whisper/assets/gpt2.tiktoken`: base64 token bytes and their
ranks. The ranks are the merge order, so each merge is recovered by running BPE on a token's bytes
with only the lower-ranked merges allowed (the standard tiktoken -> HF conversion).

    python scripts/build_gpt2_tokenizer.py            # pip-downloads openai-whisper
    python scripts/build_gpt2_tokenizer.py FILE.tiktoken
"""

import base64
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "botkit" / "assets" / "gpt2"
# sha256 of OpenAI's published encoder.json / vocab.bpe (the values tiktoken pins).
SHA256 = {
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def whisper_tiktoken() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "openai-whisper==20250625", "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            return tar.extractfile(member).read()


def main() -> None:
    raw = Path(sys.argv[1]).read_bytes() if len(sys.argv) > 1 else whisper_tiktoken()
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    byte_map = bytes_to_unicode()
    to_str = lambda b: "".join(byte_map[x] for x in b)  # noqa: E731
    vocab = {to_str(tok): rank for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab["<|endoftext|>"] = len(vocab)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = bpe_split(ranks, tok, rank)
            merges.append(f"{to_str(left)} {to_str(right)}")
    OUT.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, separators=(", ", ": ")).encode(),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode(),
    }
    for name, data in files.items():
        (OUT / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        print(f"{name}: {len(data)} bytes, sha256 {digest}", "(matches OpenAI's)" if digest == SHA256[name] else "(differs from OpenAI's)")
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
