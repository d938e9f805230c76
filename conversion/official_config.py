"""Config translation in both directions between ``ParcaeConfig`` and the official ``config.json``.

official -> transformers is ``key_map.official_config_to_kwargs``; this module adds the reverse: the full field set of
the official dataclasses (``parcae_lm/models/parcae/config.py``) so that ``parcae_lm.from_pretrained`` can rebuild
the model, plus ``_class_name`` so it does not fall back to GPT.
"""

from __future__ import annotations

from modeling_parcae.configuration_parcae import ParcaeConfig
from modeling_parcae.conversion.key_map import official_config_to_kwargs
from modeling_parcae.conversion.official_format import OfficialFormatError


# fields the conversion does not represent because every official model (``parcae_lm/configs/*/*.py``) uses these values
_SHARED_CONSTANTS = dict(
    hf_config={}, use_abacus=False, randomize_positions_from=None, block_class_name="TransformerPreNormBlock",
    norm_class_name="RMSNorm", attn_impl="flash", mlp_class_name="BaseMLP", nonlin_name="ReLU2", qk_bias=False,
    init_strategy="scaled-zero", init_orthogonal=True, skip_initialization=False, mup_model_scaling_factor=1,
    use_fused_head="pytorch", debias_attention=False, center_attention=False, clip_qkv=None, simple_ops=False,
    strategy="single",
)
_PARCAE_CONSTANTS = dict(activation_checkpoint_impl="per-iteration", lockstep_n=False, lockstep_k=False,
                         curriculum_target="forward", model_class_name="Parcae", _is_recurrent_block_config=False)
_GPT_CONSTANTS = dict(activation_checkpoint_impl="per-block")


def parcae_config_from_official(official: dict, architecture: str) -> ParcaeConfig:
    """Build the transformers config; ``architecture`` comes from ``detect_architecture``, never from a default."""
    has_parcae_fields = "n_layers_in_recurrent_block" in official
    if has_parcae_fields != (architecture == "parcae"):
        raise OfficialFormatError(f"config.json fields do not describe a {architecture} model")
    try:
        return ParcaeConfig(**official_config_to_kwargs(official))
    except KeyError as error:
        raise OfficialFormatError(f"config.json lacks the field {error.args[0]!r}") from error


def official_config_from_parcae(config: ParcaeConfig, name: str) -> dict:
    """The official ``config.json`` dict (``dataclasses.asdict`` field set plus ``_class_name``)."""
    common = dict(
        name=name,
        block_size=config.max_position_embeddings,
        n_embd=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        vocab_size=config.original_vocab_size,
        padding_multiple=config.padding_multiple,
        padded_vocab_size=config.vocab_size,
        rope_settings=dict(use_rope=True, rope_condense_ratio=1,
                           rope_base=_plain_number(config.rope_parameters["rope_theta"])),
        norm_eps=config.rms_norm_eps,
        bias=config.bias,
        qk_norm=config.qk_norm,
        logit_softcap=config.logit_softcap,
        tie_embeddings=config.tie_word_embeddings,
        **_SHARED_CONSTANTS,
    )
    if not config.looped:
        return {**common, **_GPT_CONSTANTS, "n_layer": config.num_prelude_layers, "_class_name": "GPTConfig"}
    return {
        **common,
        **_PARCAE_CONSTANTS,
        "injection_type": config.injection_type,
        "n_layers_in_recurrent_block": config.num_core_layers,
        "n_layers_in_prelude": config.num_prelude_layers,
        "n_layers_in_coda": config.num_coda_layers,
        "state_init": config.state_init,
        "recurrent_embedding_dimension": config.state_size,
        "recurrent_intermediation_embedding_dimension": config.core_intermediate_size,
        "recurrent_num_attention_heads": (None if config.core_num_attention_heads == config.num_attention_heads
                                          else config.core_num_attention_heads),
        "prelude_norm": config.prelude_norm,
        "sampling_scheme": config.sampling_scheme,
        "mean_recurrence": config.mean_recurrence,
        "mean_backprop_depth": config.mean_backprop_depth,
        "recurrent_iteration_method": config.recurrent_iteration_method,
        "_class_name": "ParcaeConfig",
    }


def _plain_number(value: float) -> int | float:
    """50000.0 -> 50000, as the official dataclass writes it."""
    return int(value) if float(value).is_integer() else value
