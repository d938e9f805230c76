"""The transformers side of tests/test_serving.py, run as its own process: greedy decoding with logprobs.

It must not share a process with vLLM: vLLM's Transformers backend replaces layer classes of the loaded model in place
(linear layers, norms), so a transformers model built after an engine would no longer be plain transformers.

    python -P tests/serving_reference.py SPEC.json OUT.json

SPEC: ``{"folder": ..., "prompts": [[ids]], "max_new_tokens": n, "top_k": k, "runs": {name: {"num_loops": N,
"dtype": "float32"|"bfloat16", "kv": "exact"|"shared-loop"}}}``. OUT: per run, per prompt, the generated tokens and
for each step the top-k logprobs ``{token: logprob}`` (raw, before any sampling processor, as vLLM reports them) and
the margin between the best and second-best logprob.
"""

from __future__ import annotations

import json
import sys

import torch

from modeling_parcae import ParcaeForCausalLM, ParcaeSharedLoopCache
from transformers import DynamicCache


def greedy_steps(model: ParcaeForCausalLM, prompt: list[int], max_new_tokens: int, top_k: int, kv: str) -> dict:
    """Prefill, then one token at a time through the cache: the same schedule as a serving engine's decode, and
    unlike ``generate`` it never stops at the end-of-text token (vLLM's ``ignore_eos``)."""
    cache = DynamicCache(config=model.config) if kv == "exact" else ParcaeSharedLoopCache()
    tokens, steps = [], []
    inputs = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=inputs, cache=cache, use_cache=True).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            best = torch.topk(logprobs, max(top_k, 2))
            token = int(best.indices[0])
            steps.append({"top": {str(int(i)): float(v) for i, v in zip(best.indices[:top_k], best.values[:top_k])},
                          "margin": float(best.values[0] - best.values[1])})
            tokens.append(token)
            inputs = torch.tensor([[token]])
    return {"tokens": tokens, "steps": steps}


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    results = {}
    for name, run in spec["runs"].items():
        model = ParcaeForCausalLM.from_pretrained(spec["folder"], num_loops=run["num_loops"],
                                                  dtype=getattr(torch, run["dtype"])).eval()
        results[name] = [greedy_steps(model, prompt, spec["max_new_tokens"], spec["top_k"], run["kv"])
                         for prompt in spec["prompts"]]
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
