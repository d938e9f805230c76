"""The three models the released-shape benchmarks compare, with random weights.

* ours: ``ParcaeForCausalLM`` built from a released preset;
* an unrolled transformers ``LlamaForCausalLM`` that executes as many blocks as ours at a loop count
  (prelude + loops * core + coda) with the same FLOPs per block: SwiGLU width 8d/3 (rounded up to a multiple of 64)
  against ReLU^2 width 4d, i.e. three d x 8d/3 matrices against two d x 4d; same vocabulary, heads and head_dim;
* the official ``parcae_lm`` model class (``receval.models.parcae.ModelingParcae``, the class its generation code
  uses), imported from the official source tree named by ``PARCAE_OFFICIAL_SRC`` and sharing our weight tensors.

Weights are N(0, 0.02) (norm gains 1): the official orthogonal initialisation takes minutes at these widths and does
not change the speed of a forward.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from modeling_parcae import ParcaeConfig, ParcaeForCausalLM, load_preset
from modeling_parcae.conversion.official_config import official_config_from_parcae
from modeling_parcae.conversion.state_dict import expected_hf_shapes, hf_to_official


OFFICIAL_SOURCE_VARIABLE = "PARCAE_OFFICIAL_SRC"


def _fill_random(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                parameter.fill_(1.0)


def build_parcae(preset: str, dtype: torch.dtype, seed: int = 0) -> ParcaeForCausalLM:
    """A released preset with random weights, in eval mode, cast to ``dtype``."""
    with no_init_weights():  # skips the orthogonal init; weights are filled below
        model = ParcaeForCausalLM(load_preset(preset))
    _fill_random(model, seed)
    model.tie_weights()
    return model.to(dtype).eval()


def llama_intermediate_size(hidden_size: int) -> int:
    """SwiGLU width with the FLOPs of a ReLU^2 MLP of width 4d: 8d/3, rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * hidden_size / 3 / 64)


def build_llama(config: ParcaeConfig, num_layers: int, dtype: torch.dtype, seed: int = 1) -> LlamaForCausalLM:
    """The unrolled Llama: ``num_layers`` blocks shaped like ours. Run fewer with :func:`set_llama_depth`."""
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=llama_intermediate_size(config.hidden_size), num_hidden_layers=num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters), tie_word_embeddings=True,
        attn_implementation=config._attn_implementation,
    )
    with no_init_weights():
        model = LlamaForCausalLM(llama_config)
    _fill_random(model, seed)
    model.tie_weights()
    return model.to(dtype).eval()


def set_llama_depth(model: LlamaForCausalLM, num_layers: int) -> None:
    """Llama runs ``layers[:config.num_hidden_layers]``, so one model serves every executed depth up to its own."""
    if num_layers > len(model.model.layers):
        raise ValueError(f"this Llama has {len(model.model.layers)} layers, asked to run {num_layers}")
    model.config.num_hidden_layers = num_layers


def executed_depth(config: ParcaeConfig, num_loops: int) -> int:
    from modeling_parcae import ParcaeSlotMap

    return ParcaeSlotMap.for_config(config, num_loops).num_slots


def import_official() -> tuple[type | None, str | None]:
    """The official model class, or None and the reason it is not available."""
    source = os.environ.get(OFFICIAL_SOURCE_VARIABLE)
    if not source:
        return None, (f"{OFFICIAL_SOURCE_VARIABLE} is not set (point it at an extracted checkout of the official "
                      "sandyresearch/parcae source)")
    if not (Path(source) / "parcae_lm").is_dir() or not (Path(source) / "receval").is_dir():
        return None, f"{OFFICIAL_SOURCE_VARIABLE}={source} has no parcae_lm/ and receval/ folders"
    if source not in sys.path:
        sys.path.insert(0, source)
    try:
        from receval.models.parcae import ModelingParcae
    except ImportError as error:
        return None, f"importing the official model from {source} failed: {error}"
    return ModelingParcae, None


def build_official(model_class: type, ours: ParcaeForCausalLM) -> nn.Module:
    """The official model holding the same weight tensors as ``ours`` (no copy), cast like its ``from_pretrained``."""
    from parcae_lm.models.config import RoPESettings
    from parcae_lm.models.parcae import ParcaeConfig as OfficialConfig

    config = ours.config
    fields = official_config_from_parcae(config, "benchmark")
    fields["rope_settings"] = RoPESettings(**fields["rope_settings"])
    fields.pop("_class_name", None)
    with torch.device("meta"):  # its own initialisation is skipped: every tensor comes from ours below
        official = model_class(OfficialConfig(**fields))
    state = hf_to_official(ours.state_dict(), config, expected_hf_shapes(config))
    official.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        official.lm_head.weight = official.transformer.wte.weight
    dtype = next(ours.parameters()).dtype
    return official.to(dtype).eval()  # the official from_pretrained casts every tensor, freqs_cis included
