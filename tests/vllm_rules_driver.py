"""Run by tests/test_vllm_rules.py with vLLM's venv's python (botkit installed beside it with
`pip install --no-deps --target`): feeds BotkitRules the batch changes vLLM's engine sends (requests
added, tokens appended to their live output lists, a swap, a removal), then saves what its `apply`
makes of the given logits. argv: a JSON file {"model_dir", "cases": [...], "logits", "out"}."""

import json
import sys
from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from botkit.engine.vllm_rules import BotkitRules


def main() -> None:
    spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
    config = SimpleNamespace(model_config=SimpleNamespace(model=spec["model_dir"], tokenizer=spec["model_dir"]))
    proc = BotkitRules(config, torch.device("cpu"), False)
    cases = spec["cases"]
    requests = [
        SamplingParams(
            temperature=c["temperature"],
            top_k=c["top_k"],
            max_tokens=c["max_tokens"],
            stop=c["stop"],
            extra_args=c["xargs"],
        )
        for c in cases
    ]
    refused = []
    for bad in spec["hostile"]:
        try:
            BotkitRules.validate_params(SamplingParams(max_tokens=16, extra_args=bad))
        except ValueError as exc:
            refused.append(str(exc))
    n = len(cases)
    outputs = [[] for _ in range(n + 1)]  # one more request, removed before the end
    added = [(i, requests[i], list(c["prompt_ids"]), outputs[i]) for i, c in enumerate(cases)]
    added.append((n, requests[0], [1, 2, 3], outputs[n]))
    proc.update_state(BatchUpdate(batch_size=n + 1, removed=[], added=added, moved=[]))
    # Batch index i holds case order[i]: cases 0 and 1 swap places halfway, the extra request leaves.
    order = list(range(n))
    longest = max(len(c["output_ids"]) for c in cases)
    for step in range(longest):
        for i, case in enumerate(cases):
            if step < len(case["output_ids"]):
                outputs[i].append(case["output_ids"][step])
        if step == longest // 2 and n >= 2:
            proc.update_state(BatchUpdate(batch_size=n, removed=[n], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
            order[0], order[1] = order[1], order[0]
        else:
            proc.update_state(None)
    logits = torch.load(spec["logits"])  # (n, vocab), row i for case i
    batch = logits[order].clone()
    result = proc.apply(batch)
    unswapped = torch.empty_like(result)
    unswapped[order] = result
    torch.save(unswapped, spec["out"])
    print(json.dumps({"refused": refused, "argmax_invariant": proc.is_argmax_invariant()}))


if __name__ == "__main__":
    main()
