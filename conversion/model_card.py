"""The README.md written next to converted weights: how to load the model and choose the loop count."""

from __future__ import annotations

from modeling_parcae.configuration_parcae import ParcaeConfig


# replaced by the repo id when `parcae push` publishes the card
REPO_PLACEHOLDER = "path/to/this/directory"


def render_model_card(config: ParcaeConfig, source: str) -> str:
    name = REPO_PLACEHOLDER
    kind = "Parcae looped language model" if config.looped else "fixed-depth Transformer baseline (Parcae paper)"
    loops = (
        f"The core blocks run `num_loops` times (default `mean_recurrence` = {config.mean_recurrence}); "
        "more loops spend more compute per token. Choose it per call or at load time:\n\n"
        "```python\n"
        "out = model(**inputs, num_loops=4)\n"
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True, num_loops=12)\n'
        "```\n"
        if config.looped else "This baseline has no loop; `num_loops` does not apply.\n"
    )
    state = " with a deterministic (zero) initial recurrent state" if config.looped else ""
    blocks = (f"prelude/core/coda blocks {config.num_prelude_layers}/{config.num_core_layers}/{config.num_coda_layers}"
              if config.looped else f"{config.num_prelude_layers} blocks")
    return f"""---
library_name: transformers
tags:
- parcae
- looped-language-model
license: mit
---

# {name}

A {kind}, converted from the official `parcae_lm` checkpoint `{source}` with `parcae convert`.
Weights are unchanged (the tied embedding is stored once); logits match the official implementation{state}.

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)   # reads the (remote-code) config
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True).eval()
inputs = tokenizer("The capital of France is", return_tensors="pt")
```

With `pip install parcae-transformers` and `import modeling_parcae`, `trust_remote_code` is not needed.

## Loop count

{loops}
## Tokenizer

`<|bos|>` = {config.bos_token_id}, `<|eos|>` = {config.eos_token_id}, `<|pad|>` = {config.pad_token_id}. Encoding adds no
special tokens (as the official tokenizer); prepend `tokenizer.bos_token_id` yourself where the official evaluation
does (CORE).

## Architecture

hidden size {config.hidden_size}, {config.num_attention_heads} heads, {blocks}, vocabulary {config.vocab_size}
(padded from {config.original_vocab_size}), context {config.max_position_embeddings} tokens.
"""
