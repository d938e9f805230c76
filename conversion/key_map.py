"""The one place that knows how official ``parcae_lm`` names map onto this project's names.

Both directions (official -> transformers and back) are derived from the two tables below, so they cannot drift.
"""

import re

from modeling_parcae.configuration_parcae import ParcaeConfig


# official stage prefix -> transformers stage prefix (``transformer.h`` is the GPT baseline's single stack)
STAGE_PREFIXES = {
    "transformer.prelude.": "model.prelude.",
    "transformer.core_block.": "model.core.",
    "transformer.coda.": "model.coda.",
    "transformer.h.": "model.prelude.",
}

# official name inside a block -> transformers name inside a block
BLOCK_KEYS = {
    "norm_1.weight": "input_layernorm.weight",
    "attn.c_q.weight": "self_attn.q_proj.weight",
    "attn.c_k.weight": "self_attn.k_proj.weight",
    "attn.c_v.weight": "self_attn.v_proj.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "attn.c_q.bias": "self_attn.q_proj.bias",
    "attn.c_k.bias": "self_attn.k_proj.bias",
    "attn.c_v.bias": "self_attn.v_proj.bias",
    "attn.c_proj.bias": "self_attn.o_proj.bias",
    "attn.ve_gate.weight": "self_attn.ve_gate.weight",
    "norm_2.weight": "post_attention_layernorm.weight",
    "mlp.fc.weight": "mlp.up_proj.weight",
    "mlp.proj.weight": "mlp.down_proj.weight",
    "mlp.fc.bias": "mlp.up_proj.bias",
    "mlp.proj.bias": "mlp.down_proj.bias",
}

# official top-level name -> transformers name
TOP_LEVEL_KEYS = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.adapter.A_log": "model.injection.A_log",
    "transformer.adapter.dt_bias": "model.injection.dt_bias",
    "transformer.adapter.B": "model.injection.B",
    "transformer.adapter.adapter.weight": "model.injection.proj.weight",
    "transformer.adapter.adapter.bias": "model.injection.proj.bias",
    "transformer.C.weight": "model.state_readout.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.ln_prelude.weight": "model.prelude_norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# buffers the official state dict carries that this project recomputes (checked, never loaded)
DERIVED_OFFICIAL_KEYS = ("freqs_cis",)

_VALUE_EMBEDDING = re.compile(r"^value_embeds\.(\d+)\.weight$")


def official_to_hf_key(key: str, looped: bool = True) -> str | None:
    """Return the transformers name of an official tensor, or ``None`` if the name is unknown."""
    if key in TOP_LEVEL_KEYS:
        return TOP_LEVEL_KEYS[key]
    if match := _VALUE_EMBEDDING.match(key):
        return f"model.value_embeddings.{match.group(1)}.weight"
    for official_stage, hf_stage in STAGE_PREFIXES.items():
        if key.startswith(official_stage):
            if (official_stage == "transformer.h.") == looped:
                return None  # a GPT key in a Parcae checkpoint, or the reverse
            index, _, inner = key[len(official_stage):].partition(".")
            if index.isdigit() and inner in BLOCK_KEYS:
                return f"{hf_stage}{index}.{BLOCK_KEYS[inner]}"
            return None
    return None


def hf_to_official_key(key: str, looped: bool = True) -> str | None:
    """Inverse of :func:`official_to_hf_key`."""
    for official, hf in TOP_LEVEL_KEYS.items():
        if key == hf:
            return official
    if match := re.match(r"^model\.value_embeddings\.(\d+)\.weight$", key):
        return f"value_embeds.{match.group(1)}.weight"
    block_map = {hf: official for official, hf in BLOCK_KEYS.items()}
    for official_stage, hf_stage in STAGE_PREFIXES.items():
        if (official_stage == "transformer.h.") == looped:
            continue
        if key.startswith(hf_stage):
            index, _, inner = key[len(hf_stage):].partition(".")
            if index.isdigit() and inner in block_map:
                return f"{official_stage}{index}.{block_map[inner]}"
    return None


def official_config_to_kwargs(official: dict) -> dict:
    """Translate an official config dict (``parcae_lm`` ``ParcaeConfig`` or ``GPTConfig`` asdict) to ParcaeConfig kwargs.

    The caller decides whether the config is a GPT baseline (``looped``) because a missing ``_class_name`` must not
    silently mean GPT (as official ``parcae_lm/__init__.py`` reads it): see
    ``conversion.official_format.detect_architecture``.
    """
    looped = "n_layers_in_recurrent_block" in official
    rope = official.get("rope_settings") or {}
    vocab = official["vocab_size"]
    multiple = official.get("padding_multiple", 64)
    padded = official.get("padded_vocab_size") or _pad(vocab, multiple)
    kwargs = dict(
        vocab_size=padded,
        original_vocab_size=vocab,
        padding_multiple=multiple,
        hidden_size=official["n_embd"],
        intermediate_size=official["intermediate_size"],
        num_attention_heads=official["num_attention_heads"],
        num_key_value_heads=official.get("num_key_value_heads") or official["num_attention_heads"],
        max_position_embeddings=official.get("block_size", 2048),
        rms_norm_eps=official.get("norm_eps", 1e-5),
        qk_norm=official.get("qk_norm", True),
        logit_softcap=official.get("logit_softcap"),
        bias=official.get("bias", False),
        tie_word_embeddings=official.get("tie_embeddings", True),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("rope_base", 50000))},
    )
    if rope.get("rope_condense_ratio", 1) != 1 or rope.get("use_rope", True) is not True:
        raise ValueError(f"unsupported rope_settings {rope}: only use_rope=True with rope_condense_ratio=1")
    if not looped:
        kwargs.update(looped=False, num_prelude_layers=official["n_layer"], num_core_layers=0, num_coda_layers=0,
                      prelude_norm=False)
        return kwargs
    kwargs.update(
        looped=True,
        num_prelude_layers=official["n_layers_in_prelude"],
        num_core_layers=official["n_layers_in_recurrent_block"],
        num_coda_layers=official["n_layers_in_coda"],
        state_size=official.get("recurrent_embedding_dimension") or official["n_embd"],
        core_intermediate_size=official.get("recurrent_intermediation_embedding_dimension")
        or official["intermediate_size"],
        core_num_attention_heads=official.get("recurrent_num_attention_heads") or official["num_attention_heads"],
        injection_type=official.get("injection_type", "diagonal"),
        state_init=official.get("state_init", "like-init"),
        prelude_norm=official.get("prelude_norm", True),
        mean_recurrence=official["mean_recurrence"],
        mean_backprop_depth=official["mean_backprop_depth"],
        sampling_scheme=official.get("sampling_scheme", "poisson-truncated-full"),
        recurrent_iteration_method=official.get("recurrent_iteration_method", "per-sequence"),
    )
    return kwargs


def official_config_to_parcae_config(official: dict, **overrides) -> ParcaeConfig:
    return ParcaeConfig(**{**official_config_to_kwargs(official), **overrides})


def _pad(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple
