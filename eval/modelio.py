"""Loading a model/tokenizer for evaluation and running one forward pass at a chosen loop depth.

Works for Parcae (``num_loops`` is passed per call, so one loaded model serves every depth) and for any other causal
LM such as the fixed-depth Transformer baselines (no ``num_loops``)."""

from __future__ import annotations

import torch

from modeling_parcae.dtypes import torch_dtype


def load_model_and_tokenizer(path: str, device: str = "cpu", dtype: str = "float32"):
    """``from_pretrained`` for a local directory or Hub id; importing ``modeling_parcae`` registers the Parcae classes
    with the Auto factories."""
    import modeling_parcae  # noqa: F401  (registers ParcaeConfig / ParcaeForCausalLM)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def is_looped(model) -> bool:
    """True when the model's depth can be chosen per call (a looped Parcae model)."""
    config = model.config
    return getattr(config, "num_loops", None) is not None and getattr(config, "looped", True)


def max_length(model) -> int:
    """Context limit used for the official left-crop (Parcae's ``block_size`` = ``max_position_embeddings``)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    raise ValueError("cannot infer the model's maximum length; pass max_length explicitly")


@torch.inference_mode()
def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   num_loops: int | None) -> torch.Tensor:
    """float32 logits (B, T, V) at ``num_loops`` loops (ignored for non-looped models)."""
    kwargs = {"num_loops": num_loops} if num_loops is not None and is_looped(model) else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.logits.float()
