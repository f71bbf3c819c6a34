#!/usr/bin/env bash
# Install botkit into a fresh venv at the edges of its declared ranges and run the whole suite, so a
# maintainer sees a coming break before users do.
#
#   scripts/check_latest.sh            the newest releases pyproject.toml allows
#   scripts/check_latest.sh --oldest   every dependency at its declared lower bound
#   scripts/check_latest.sh --beyond   upper bounds dropped: may a bound be widened? (the newest on the registry)
#   scripts/check_latest.sh --lock     the newest allowed, with torch at the CPU wheel CI uses; when the
#                                      suite passes, requirements.lock is rewritten from that venv
#
# TORCH overrides the torch requirement (for example TORCH=torch==2.13.0: other torch releases are
# multi-GB CUDA builds on x86_64). The venv is left in $VENV (default: a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:---latest}"
VENV="${VENV:-$(mktemp -d)/venv}"

python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip

# The requirements of this mode, from pyproject.toml: constraints (lower bounds pinned) or plain ranges.
python3 - "$mode" > "$VENV/requirements.txt" <<'EOF'
import re, sys, tomllib
mode = sys.argv[1]
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name, spec = re.match(r"([\w.\-\[\],]+)(.*)", requirement).groups()
    if mode == "--oldest":
        spec = "==" + re.search(r">=([\w.]+)", spec)[1]
    elif mode == "--beyond":
        spec = ",".join(part for part in spec.split(",") if not part.startswith("<"))
    print(name + spec)
EOF
if [[ -n "${TORCH:-}" ]]; then
  sed -i "s/^torch[<>=].*/${TORCH}/" "$VENV/requirements.txt"
elif [[ "$mode" == "--lock" ]]; then
  sed -i "s/^torch[<>=].*/torch==2.13.0/" "$VENV/requirements.txt"
fi
echo "== installing:" $(cat "$VENV/requirements.txt")
pip install -q -r "$VENV/requirements.txt"
pip install -q --no-deps -e .
pip check
echo "== versions: $(pip freeze | grep -iE '^(torch|transformers|tokenizers|huggingface.hub|accelerate|aiosqlite|aiohttp|discord.py|python-telegram-bot|numpy)==' | tr '\n' ' ')"

ruff check .
HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider

if [[ "$mode" == "--lock" ]]; then
  {
    echo "# Exact versions CI installs (pip install -c requirements.lock ...), written by scripts/check_latest.sh --lock"
    echo "# after the whole suite passed on them. A pip constraints file: see README.md, Development."
    pip freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | sort -f
  } > requirements.lock
  echo "== wrote requirements.lock"
fi
