"""The demo model's corpus: Debian's `fortunes`, filtered, one fortune per document.

Usage: python scripts/fortunes_corpus.py [WORKDIR]   (default /tmp/botkit-demo; writes WORKDIR/fortunes.txt)

Fetches the packages with `apt-get download fortunes fortunes-min` (no root needed; `fortunes-min`
holds the fortunes, literature and riddles files) unless WORKDIR already holds them unpacked, keeps the categories
below (no ethnic, men-women, politics, drugs, ascii-art, cookie) and
drops any fortune matching a word list, backspace-overstruck text, or lines wider than 100 columns.
scripts/train_demo.sh trains on this file; benchmarks/int8.py measures held-out loss on its last 5 %.
Licence: see /usr/share/doc/fortunes/copyright in the package (BSD for fortune-mod; the quotations are
distributed by Debian in main).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CATEGORIES = [
    "computers",
    "people",
    "science",
    "work",
    "wisdom",
    "humorists",
    "literature",
    "fortunes",
    "linux",
    "education",
    "art",
    "riddles",
    "platitudes",
]
BLOCKED = re.compile(r"\b(fuck|shit|cunt|nigger|fag|rape|whore|bitch|slut|retard|nazi|hitler)", re.I)


def fetch(work: Path) -> Path:
    """The unpacked quotation files in `work` (downloaded and unpacked if missing)."""
    src = work / "root/usr/share/games/fortunes"
    for package, file in (("fortunes", "computers"), ("fortunes-min", "literature")):
        if not (src / file).is_file():
            work.mkdir(parents=True, exist_ok=True)
            subprocess.run(["apt-get", "download", package], cwd=work, check=True)
            deb = sorted(work.glob(f"{package}_*.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", deb.name, "root"], cwd=work, check=True)
    return src


def build(src: Path) -> tuple[str, int, int]:
    """The corpus text (fortunes joined by <|endoftext|>), fortunes kept, fortunes dropped."""
    kept, dropped = [], 0
    for cat in CATEGORIES:
        for text in (src / cat).read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = text.strip("%\n")
            if not text.strip():
                continue
            if BLOCKED.search(text) or "\b" in text or "\ufffd" in text or max(map(len, text.splitlines())) > 100:
                dropped += 1
                continue
            kept.append(text)
    return "<|endoftext|>\n".join(kept) + "<|endoftext|>\n", len(kept), dropped


def main(work: Path) -> Path:
    text, num_kept, num_dropped = build(fetch(work))
    out = work / "fortunes.txt"
    out.write_text(text, encoding="utf-8")
    print(f"kept {num_kept} fortunes ({len(text.encode()):,} bytes), dropped {num_dropped}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/botkit-demo").resolve())
