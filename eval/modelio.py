"""Loading a model/tokenizer for evaluation and running one forward pass at a chosen loop depth.

Works for Parcae (``num_loops`` is passed per call, so one loaded model serves every depth) and for any other causal
LM such as the fixed-depth Transformer baselines (no ``num_loops``)."""

from __future__ import annotations

import inspect

import torch

from modeling_parcae.dtypes import torch_dtype
from modeling_parcae.modeling_parcae import naming_damaged_weights


def load_model_and_tokenizer(path: str, device: str = "cpu", dtype: str = "float32"):
    """``from_pretrained`` for a local directory or Hub id; importing ``modeling_parcae`` registers the Parcae classes
    with the Auto factories, and official ``parcae_lm`` checkpoints are converted once (explicitly, here)."""
    from transformers import AutoModelForCausalLM

    from modeling_parcae.conversion.hub import from_pretrained_or_official, load_tokenizer

    with naming_damaged_weights(path):  # for models other than Parcae's, whose from_pretrained names the file itself
        model = from_pretrained_or_official(path, model_class=AutoModelForCausalLM, dtype=torch_dtype(dtype))
    model = model.to(device).eval()
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def is_looped(model) -> bool:
    """True when the model's depth can be chosen per call (a looped Parcae model)."""
    config = model.config
    return getattr(config, "num_loops", None) is not None and getattr(config, "looped", True)


def supports_output_depths(model) -> bool:
    """True when one forward can return the logits of several depths (``output_depths``; checkpoints saved with older
    remote code lack it)."""
    return is_looped(model) and "output_depths" in inspect.signature(model.forward).parameters


def accepts_logits_to_keep(model) -> bool:
    """True when ``forward`` takes ``logits_to_keep`` (transformers' causal LMs: the head runs on the last positions
    only)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def max_length(model) -> int:
    """Context limit used for the official left-crop (Parcae's ``block_size`` = ``max_position_embeddings``)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    raise ValueError("cannot infer the model's maximum length; pass max_length explicitly")


def depth_kwargs(model, depths: list[int | None]) -> dict:
    """Forward kwargs for ``depths``: nothing (non-looped model or the default depth), ``num_loops`` (one depth) or
    ``output_depths`` (several: every depth from one pass)."""
    if not is_looped(model) or depths == [None]:
        return {}
    if len(depths) == 1:
        return {"num_loops": depths[0]}
    return {"output_depths": tuple(depths)}


def logits_at_depths(output, depths: list[int | None]) -> list[torch.Tensor]:
    """float32 logits per depth from a forward run with :func:`depth_kwargs` (a non-looped model: the same logits)."""
    if len(depths) > 1 and getattr(output, "depth_logits", None) is not None:
        return [logits.float() for logits in output.depth_logits]
    return [output.logits.float()] * len(depths)


@torch.inference_mode()
def forward_depth_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         depths: list[int | None]) -> list[torch.Tensor]:
    """float32 logits (B, T, V) at each of ``depths`` from one forward (depths are ignored for non-looped models)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, **depth_kwargs(model, depths))
    return logits_at_depths(out, depths)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   num_loops: int | None) -> torch.Tensor:
    """float32 logits (B, T, V) at ``num_loops`` loops (ignored for non-looped models)."""
    return forward_depth_logits(model, input_ids, attention_mask, [num_loops])[0]
