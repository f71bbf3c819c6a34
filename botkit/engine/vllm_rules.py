"""botkit's per-token rules (rules.py) as a vLLM V1 logits processor.

    V/bin/pip install --no-deps botkit          # beside vLLM, in its own venv (torch, numpy, transformers are there)
    BOTKIT_RUN_DIR=runs/run1 V/bin/python -m vllm.entrypoints.openai.api_server --model runs/run1 \\
        --logits-processors botkit.engine.vllm_rules:BotkitRules

A request opts in with `vllm_xargs = botkit.engine.rule_args.to_xargs(params)` (botkit's remote backend
sends it); a request without botkit's marker is left alone. The copy index of `unique` is the one in
BOTKIT_RUN_DIR (default: the served model's folder); the UTF-8 table is the served model's tokenizer's.
vLLM calls `update_state` before each step with the batch's changes and `apply` with the step's raw
logits (before temperature), where the rules write, as in botkit's own engine.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from botkit.engine.copy_index import CopyIndex
from botkit.engine.rule_args import XARGS_MARKER, from_xargs
from botkit.engine.rules import RowRules, RuleContext, apply_rules
from botkit.engine.token_bytes import TokenBytes
from botkit.errors import InputError
from botkit.params import MAX_NEW_TOKENS

RUN_DIR_ENV = "BOTKIT_RUN_DIR"


class _Row:
    """One request's rules and vLLM's live list of its output tokens (a reference vLLM appends to)."""

    def __init__(self, rules: RowRules, output_ids: list[int]):
        self.rules, self.output_ids, self.num_seen = rules, output_ids, 0

    def catch_up(self, eos: int) -> None:
        for token in self.output_ids[self.num_seen :]:
            if token != eos:  # end of text ends the request; it never joins the reply
                self.rules.append(token)
        self.num_seen = len(self.output_ids)


class BotkitRules(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """A hostile or mistaken `vllm_xargs` is refused with botkit's sentence (HTTP 400)."""
        if (sampling_params.extra_args or {}).get(XARGS_MARKER) is None:
            return  # not botkit's request
        try:
            _params_of(sampling_params)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from transformers import AutoTokenizer  # vLLM's venv has it; botkit's rules do not import it

        model_config = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(getattr(model_config, "tokenizer", None) or model_config.model)
        run_dir = os.environ.get(RUN_DIR_ENV) or model_config.model
        self.ctx = RuleContext(TokenBytes.of(tokenizer), tokenizer.eos_token_id, CopyIndex.load(run_dir))
        self.rows: dict[int, _Row] = {}  # batch index -> row, for botkit's requests only

    def is_argmax_invariant(self) -> bool:
        return False  # the UTF-8 mask, the bans and the penalties change greedy picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, prompt_ids, output_ids in batch_update.added:
                self.rows.pop(index, None)
                if (params.extra_args or {}).get(XARGS_MARKER) is not None:
                    self.rows[index] = _Row(RowRules(self.ctx, _params_of(params), list(prompt_ids or [])), output_ids)
            for a, b, direction in batch_update.moved:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_a is not None:
                    self.rows[b] = row_a
                if row_b is not None and direction == MoveDirectionality.SWAP:
                    self.rows[a] = row_b
        for row in self.rows.values():
            row.catch_up(self.ctx.eos)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = [self.rows[i].rules if i in self.rows else None for i in range(logits.shape[0])]
            apply_rules(self.ctx, rows, logits, candidates=True)
        return logits


def _params_of(vllm_params):
    """botkit's SamplingParams for a vLLM request: the rules' fields from its extra_args, the rest from vLLM's own."""
    max_tokens = min(vllm_params.max_tokens or MAX_NEW_TOKENS, MAX_NEW_TOKENS)
    return from_xargs(
        vllm_params.extra_args,
        temperature=float(vllm_params.temperature),
        top_k=max(0, vllm_params.top_k or 0),
        stop=tuple(vllm_params.stop or ()),
        max_new_tokens=max_tokens,
    )
