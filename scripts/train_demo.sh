#!/usr/bin/env bash
# Trains botkit's bundled demo model (botkit/assets/demo/) from scratch on CPU, exactly as shipped.
#
# Data: Debian's `fortunes` and `fortunes-min` packages (bookworm, 1:1.99.1-7.3, section "main"), the
# BSD fortune-mod quotation files (scripts/fortunes_corpus.py fetches and filters them). Licence: see /usr/share/doc/fortunes/copyright in the package: the program is under
# the BSD licence; the quotations are a collection of short quotes from many sources, distributed by
# Debian in main. The offensive collection (fortunes-off) is not used; of the rest we keep the
# categories below (no ethnic, men-women, politics, drugs, ascii-art, cookie) and drop any fortune
# matching a word list, backspace-overstruck text, or lines wider than 100 columns.
#
# Usage: scripts/train_demo.sh [WORKDIR]   (about 25-50 minutes on 2 CPU cores)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-/tmp/botkit-demo}"
mkdir -p "$WORK" && cd "$WORK"

# 1-2. Fetch the corpus with apt (`apt-get download fortunes fortunes-min`, no root needed), unpack it
#      and filter it: one fortune per document, separated by <|endoftext|>, in $WORK/fortunes.txt.
python "$REPO/scripts/fortunes_corpus.py" "$WORK"

# 3. Train from scratch: byte-level BPE of 4,096 tokens trained on the corpus, GPT-2 architecture with
#    4 layers, width 256, 4 heads, 256-token context (4.3M parameters), batches of 4 x 256 tokens,
#    AdamW at 1e-3 with 100 warmup steps and cosine decay, 5 % of the tokens held out.
#    The shipped model was trained in two phases because the shared CPU ran at ~0.3 steps/s: 250 steps
#    of a 2,000-step schedule, then resumed with the schedule shortened to 1,500 steps (`steps` is the
#    run's total; the cosine decay is recomputed over it from step 250 on). Training is deterministic
#    for a given thread count (we ran with OMP_NUM_THREADS=1).
BOTKIT="${BOTKIT:-python -m botkit}"
COMMON=(--dataset fortunes.txt --run-name demo --seed 0 --device cpu --print-every 10
        --batch-size 4 --learning-rate 1e-3 --lr-schedule cosine --warmup-steps 100
        --val-fraction 0.05 --val-every 250 --save-every 250 --sample-every 250 --sample-length 60)
$BOTKIT finetune "${COMMON[@]}" --overwrite --steps 2000 --stop-at-step 250 \
  --model scratch --train-tokenizer --vocab-size 4096 \
  --n-layer 4 --n-embd 256 --n-head 4 --n-ctx 256 --block-size 256
$BOTKIT finetune "${COMMON[@]}" --restore-from latest --steps 1500 --block-size 256

# 4. Ship it: float16 weights, the tokenizer, into botkit/assets/demo/ (the model card is written by hand).
python - "$REPO/botkit/assets/demo" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained("checkpoint/demo", dtype=torch.float16)
model.save_pretrained(out)
tokenizer = AutoTokenizer.from_pretrained("checkpoint/demo")
tokenizer.model_max_length = model.config.n_positions  # the run was saved before botkit set this itself
tokenizer.save_pretrained(out)
PY

# 5. Held-out loss and bits per byte of the shipped (float16) model vs an untrained model of the
#    same shape, on the same held-out 5 % (every full 256-token block of it).
python - "$REPO/botkit/assets/demo" <<'PY'
import json, math, sys
import torch
from transformers import GPT2LMHeadModel
from botkit.train.encoding import load_tokens
from botkit.train.finetune import evaluate_loss
from botkit.model.loading import load_model

lm = load_model(sys.argv[1], device="cpu", dtype="float32")
_, held_out = load_tokens("fortunes.txt", lm.tokenizer).split(0.05)
block = 256
num_blocks = len(held_out) // block
windows = held_out.tokens[: num_blocks * block].reshape(num_blocks, block)
predicted_bytes = sum(len(lm.tokenizer.decode(w[1:]).encode()) for w in windows)  # token 0 of a block is context only
torch.manual_seed(0)
untrained = GPT2LMHeadModel(lm.model.config)  # same shape, random init
report = {"held_out_tokens": int(num_blocks * block), "held_out_bytes": predicted_bytes}
for name, model in (("trained", lm.model), ("untrained", untrained)):
    loss = evaluate_loss(model, held_out, block, batch_size=8, max_batches=10**6)
    report[name] = {"loss_nats_per_token": round(loss, 4),
                    "bits_per_byte": round(loss * num_blocks * (block - 1) / math.log(2) / predicted_bytes, 3)}
print(json.dumps(report))
PY
