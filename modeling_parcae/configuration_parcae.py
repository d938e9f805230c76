"""Parcae model configuration.

Field names follow transformers conventions (``hidden_size``, ``rms_norm_eps``, ...); the docstring of each
field names the official ``parcae_lm`` field it mirrors, so conversion is a plain rename (see ``conversion/``).

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import __version__ as TRANSFORMERS_VERSION
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils import logging

from .transformers_compat import CACHE_NAME, NEWEST_SUPPORTED_TRANSFORMERS


logger = logging.get_logger(__name__)

# keys of a config.json that are no field here yet load silently: transformers' own (its base class consumes or keeps
# them; ``from_pretrained`` reads ``quantization_config``) and the name the converter keeps for the way back
BOOKKEEPING_KEYS = frozenset({"auto_map", "model_type", "_name_or_path", "name_or_path", "_commit_hash", "torch_dtype",
                              "attn_implementation", "experts_implementation", "output_attentions", "num_labels",
                              "quantization_config", "official_name"})


def _alternate_ending_on_last(index: int, count: int) -> bool:
    """The official value-embedding rule ``has_ve``: every other layer, always including the last one."""
    return index % 2 == (count - 1) % 2


@strict(accept_kwargs=True)
class ParcaeConfig(PreTrainedConfig):
    r"""
    Configuration of a Parcae looped language model (prelude -> core looped ``num_loops`` times -> coda), or of the
    paper's fixed-depth Transformer baseline (``looped=False``: the prelude blocks alone).

    Args:
        vocab_size: embedding rows, the *padded* vocabulary (official ``padded_vocab_size``).
        hidden_size: model width (official ``n_embd``).
        intermediate_size: MLP width of prelude and coda blocks.
        num_attention_heads / num_key_value_heads: attention heads of prelude and coda blocks (kv heads default to
            the heads; GQA when fewer).
        num_prelude_layers / num_core_layers / num_coda_layers: official ``n_layers_in_prelude`` /
            ``n_layers_in_recurrent_block`` / ``n_layers_in_coda``.
        state_size: width of the recurrent state (official ``recurrent_embedding_dimension``, default hidden_size).
        core_intermediate_size / core_num_attention_heads: the core blocks' MLP width and heads (official
            ``recurrent_intermediation_embedding_dimension`` / ``recurrent_num_attention_heads``).
        injection_type: how the prelude output ``e`` enters each loop: ``diagonal`` (Parcae,
            ``h*exp(-dt*A) + dt*(e B^T)``), ``linear`` (``W [h; e]``, prior looped models) or ``add`` (``h + e``).
        state_init: initial recurrent state in training (official semantics: ``like-init`` truncated normal with the
            embedding std, ``zero``, ``normal``, ``embed``, ``unit``).
        inference_state_init: initial state outside training: ``zero`` (deterministic, the default of this project)
            or ``config`` (use ``state_init``, the official behaviour, random for the released models).
        prelude_norm: RMSNorm on the prelude output before it is injected.
        qk_norm: weightless RMSNorm (float32-epsilon) on queries and keys after RoPE.
        value_embedding_gate_channels: input channels of the value-embedding gate (official: 32).
        rope_parameters: ``{"rope_type": "default", "rope_theta": 50000.0}``; RoPE rotates interleaved pairs.
        max_position_embeddings: official ``block_size``.
        rms_norm_eps: official ``norm_eps``.
        logit_softcap: ``softcap * tanh(logits / softcap)`` when set.
        bias: bias on every linear layer (official ``bias``).
        mean_recurrence / mean_backprop_depth: training depth mean and truncated-backprop depth; both also shape the
            value-embedding gate rule, so they are architecture fields.
        sampling_scheme / recurrent_iteration_method: how training samples the depth (and whether per batch,
            sequence or token).
        depth_sampling_seed: base seed of the depth sampler (official 514229, offset by the training step).
        num_loops: test-time loop count, default ``mean_recurrence``; ``from_pretrained(path, num_loops=N)`` sets it
            (under vLLM: ``hf_overrides={"num_loops": N}``, fixed per engine).
        vllm_kv_layout: serving with vLLM (docs/serving.md): ``exact`` gives every executed block its own KV, as
            transformers' cache; ``shared-loop`` one KV per physical block, every loop overwriting it (bounded
            memory, the approximation of ``ParcaeSharedLoopCache``).
        train_num_loops: fixed training depth instead of sampling (``None``: sample per ``sampling_scheme``).
        looped: ``False`` builds the paper's Transformer baseline (official GPT class).
        original_vocab_size / padding_multiple: the official unpadded vocabulary and padding, kept for conversion.
    """

    model_type = "parcae"
    # output fields Trainer's evaluation leaves out of the predictions (which are then the logits alone, as for Llama)
    keys_to_ignore_at_inference = [CACHE_NAME, "num_loops"]
    # Tensor parallelism shards the MLPs of every stage (transformers matches ``<stage>.<digit>.`` as ``<stage>.*.``).
    # Attention stays replicated: value embeddings are added to ``v`` per kv head, and transformers' embedding styles
    # gather an embedding's output to every rank, so a head-sharded ``v_proj`` would meet a full-width value
    # embedding. Sharding attention needs an embedding style whose output stays sharded by head.
    base_model_tp_plan = {
        "prelude.*.mlp.up_proj": "colwise",
        "prelude.*.mlp.down_proj": "rowwise",
        "core.*.mlp.up_proj": "colwise",
        "core.*.mlp.down_proj": "rowwise",
        "coda.*.mlp.up_proj": "colwise",
        "coda.*.mlp.down_proj": "rowwise",
    }

    # a RoPE given without its theta (``{"rope_type": "linear", "factor": 2.0}``, as Llama users write a scaling) keeps
    # the model's: the official 50000 at construction (transformers' own default would be 10000), the current one after
    default_theta = 50000.0

    vocab_size: int = 32768
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    num_prelude_layers: int = 2
    num_core_layers: int = 2
    num_coda_layers: int = 2
    state_size: int | None = None
    core_intermediate_size: int | None = None
    core_num_attention_heads: int | None = None
    injection_type: Literal["diagonal", "linear", "add"] = "diagonal"
    state_init: Literal["like-init", "zero", "normal", "embed", "unit"] = "like-init"
    inference_state_init: Literal["zero", "config"] = "zero"
    prelude_norm: bool = True
    qk_norm: bool = True
    value_embedding_gate_channels: int = 32
    rope_parameters: dict | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    logit_softcap: float | None = None
    bias: bool = False
    tie_word_embeddings: bool = True
    mean_recurrence: int = 8
    mean_backprop_depth: int = 4
    sampling_scheme: Literal["poisson-truncated-full", "poisson-full", "fixed"] = "poisson-truncated-full"
    recurrent_iteration_method: Literal["per-batch", "per-sequence", "per-token"] = "per-sequence"
    depth_sampling_seed: int = 514229
    num_loops: int | None = None
    vllm_kv_layout: Literal["exact", "shared-loop"] = "exact"
    train_num_loops: int | None = None
    looped: bool = True
    original_vocab_size: int | None = None
    padding_multiple: int = 64
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 2

    def __post_init__(self, **kwargs):
        _refuse_misspelt_fields(self, kwargs)
        _warn_unknown_keys(self, kwargs)
        _warn_if_written_by_newer_transformers(self.transformers_version)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.state_size is None:
            self.state_size = self.hidden_size
        if self.core_intermediate_size is None:
            self.core_intermediate_size = self.intermediate_size
        if self.core_num_attention_heads is None:
            self.core_num_attention_heads = self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
        if self.num_loops is None:
            self.num_loops = self.mean_recurrence
        if self.original_vocab_size is None:
            self.original_vocab_size = self.vocab_size
        super().__post_init__(**kwargs)

    def __setattr__(self, name, value):
        if name == "rope_parameters" and isinstance(value, dict) and "rope_theta" not in value:
            current = getattr(self, "rope_parameters", None) or {}
            value = {**value, "rope_theta": current.get("rope_theta", self.default_theta)}
        super().__setattr__(name, value)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Validate again once ``from_pretrained(path, num_loops=0)``-style overrides are applied: transformers sets
        them as plain attributes after construction, past the class validators, and a bad value would otherwise
        surface only in ``save_pretrained``, after it has written part of the directory. An override that matches no
        field but nearly one (``num_loop=4``) is refused as the constructor refuses it: transformers would hand it on
        to the model's ``__init__``, a bare ``TypeError``."""
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_dict(config_dict, return_unused_kwargs=True, **kwargs)
        _refuse_misspelt_fields(config, unused)
        config.validate()
        return (config, unused) if return_unused_kwargs else config

    # ----------------------------------------------------------------------------------------------------------
    # validation (called by @strict after __post_init__)
    # ----------------------------------------------------------------------------------------------------------
    def validate_architecture(self):
        """Reject configurations the model cannot build, naming the offending field."""
        _check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                        "num_key_value_heads", "num_prelude_layers", "max_position_embeddings", "mean_recurrence")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = hidden_size / num_attention_heads = {self.head_dim} must be even for RoPE")
        if self.value_embedding_gate_channels > self.hidden_size:
            raise ValueError(
                f"value_embedding_gate_channels ({self.value_embedding_gate_channels}) exceeds hidden_size "
                f"({self.hidden_size})"
            )
        validate_num_loops(self.num_loops, "num_loops")
        if self.train_num_loops is not None:
            validate_num_loops(self.train_num_loops, "train_num_loops")
        if not self.looped:
            if self.num_core_layers or self.num_coda_layers:
                raise ValueError(
                    "looped=False (Transformer baseline) needs num_core_layers=0 and num_coda_layers=0, got "
                    f"{self.num_core_layers} and {self.num_coda_layers}"
                )
            return
        _check_positive(self, "num_core_layers", "state_size", "core_intermediate_size", "core_num_attention_heads",
                        "mean_backprop_depth")
        # the official code only ever trains state_size == hidden_size (value-embedding gates, the shared RoPE table
        # and the additive injection assume it): other widths are refused, not guessed
        if self.state_size != self.hidden_size:
            raise ValueError(f"state_size ({self.state_size}) different from hidden_size ({self.hidden_size}) is not "
                             "supported")
        if self.core_num_attention_heads != self.num_attention_heads:
            raise ValueError(f"core blocks share the RoPE table (head_dim) of the main blocks: core_num_attention_heads "
                             f"({self.core_num_attention_heads}) must equal num_attention_heads "
                             f"({self.num_attention_heads})")

    # ----------------------------------------------------------------------------------------------------------
    # derived quantities
    # ----------------------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_physical_layers(self) -> int:
        """Physical (parameter-owning) blocks: prelude + core + coda."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def num_hidden_layers(self) -> int:
        """The physical blocks; under vLLM (``attn_implementation="vllm"``) the KV cache layers it must allocate,
        one per *executed* block (prelude + num_loops x core + coda), or per physical block with
        ``vllm_kv_layout="shared-loop"``. vLLM sizes its paged KV cache from this number."""
        if getattr(self, "_attn_implementation", None) == "vllm":
            return self.vllm_kv_layer(self.num_prelude_layers + self.num_loops * self.num_core_layers
                                      + self.num_coda_layers - 1) + 1
        return self.num_physical_layers

    def vllm_kv_layer(self, slot: int) -> int:
        """vLLM's KV layer of the cache slot ``slot`` (``ParcaeSlotMap`` numbering at ``num_loops``): the slot itself
        (exact), or with ``vllm_kv_layout="shared-loop"`` its physical block, whose one KV every loop overwrites (the
        bounded approximation of ``ParcaeSharedLoopCache``: exact prefill, approximate decoding)."""
        if self.vllm_kv_layout == "exact":
            return slot
        first_coda = self.num_prelude_layers + self.num_loops * self.num_core_layers
        if slot < self.num_prelude_layers:
            return slot
        if slot >= first_coda:
            return slot - first_coda + self.num_prelude_layers + self.num_core_layers
        return self.num_prelude_layers + (slot - self.num_prelude_layers) % self.num_core_layers

    @property
    def initializer_range(self) -> float:
        """The official "scaled-zero" std sqrt(2 / (5 d)), also the std of the like-init state."""
        return math.sqrt(2.0 / (5.0 * self.hidden_size))

    def block_specs(self, stage: str, count: int) -> list["BlockSpec"]:
        """What each block of ``stage`` is, in the official numbering (``model.py``): its value-embedding table (tables
        sit on every other block of prelude + core + coda, ending on the last) and whether it owns a gate (``has_ve``:
        looped models test ``layer_id`` = prelude ``i``, core ``P + j``, coda ``P + R * mean_recurrence + i`` against
        ``num_core_layers * mean_backprop_depth`` blocks; the baseline tests ``i`` against its own depth)."""
        prelude, core = self.num_prelude_layers, self.num_core_layers
        table_offset = {"prelude": 0, "core": prelude, "coda": prelude + core}[stage]
        gate_offset = {"prelude": 0, "core": prelude, "coda": prelude + core * self.mean_recurrence}[stage]
        gate_depth = core * self.mean_backprop_depth if self.looped else prelude
        specs = []
        for index in range(count):
            has_gate = _alternate_ending_on_last(gate_offset + index, gate_depth)
            table = table_offset + index
            has_table = _alternate_ending_on_last(table, self.num_physical_layers)
            specs.append(BlockSpec(stage, index, has_gate, str(table) if has_gate and has_table else None))
        return specs

    def value_embedding_table_indices(self) -> list[int]:
        """Block indices among prelude + core + coda that own a value-embedding table."""
        total = self.num_physical_layers
        return [index for index in range(total) if _alternate_ending_on_last(index, total)]


@dataclass(frozen=True)
class BlockSpec:
    """A block's identity, fixed at construction: its stage (``prelude`` | ``core`` | ``coda``), its index there,
    whether it owns a value-embedding gate, and the key of the table it mixes in (``None``: no value embedding)."""

    stage: str
    index: int
    has_value_embedding_gate: bool
    value_embedding_key: str | None


def validate_num_loops(value, name: str = "num_loops") -> None:
    """A loop count is a positive integer (bools and floats are rejected, even 4.0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _refuse_misspelt_fields(config, extra: dict) -> None:
    """Extra keyword arguments are how transformers carries keys it does not model, so they are accepted, except a
    near-miss of one of this config's fields (``mean_recurence``): that one would be dropped silently."""
    names = [field.name for field in dataclasses.fields(config)]
    for key in extra:
        meant = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
        if meant and not hasattr(PreTrainedConfig, key):
            raise ValueError(f"unknown config field {key!r}: did you mean {meant[0]!r}?")


def _warn_unknown_keys(config, extra: dict) -> None:
    """Keys this version does not read (``"loop_schedule": "cosine"`` from a newer release) are kept as attributes, as
    transformers keeps them, but named: the checkpoint may mean a model that this code would run differently."""
    unknown = sorted(key for key in extra if key not in BOOKKEEPING_KEYS and not hasattr(PreTrainedConfig, key))
    if unknown:
        logger.warning(f"{type(config).__name__}: unknown config key(s) {', '.join(map(repr, unknown))}, kept but not "
                       "used by this version of the model; if they come from a newer release, upgrade "
                       "parcae-transformers (or load the checkpoint with trust_remote_code=True and its own code)")


def _warn_if_written_by_newer_transformers(written_by: str | None) -> None:
    """A config saved by a transformers newer than every release this code supports may rely on behaviour it lacks.
    Within the supported range a config means the same on each release (the version lane checks it), so a checkpoint
    saved on 5.25 loads on 5.16 without a word."""
    if written_by and _release(written_by)[:2] > NEWEST_SUPPORTED_TRANSFORMERS:
        newest = ".".join(map(str, NEWEST_SUPPORTED_TRANSFORMERS))
        logger.warning(f"this config was written by transformers {written_by}, newer than every release this model's "
                       f"code supports (up to {newest}; installed: {TRANSFORMERS_VERSION}): settings it relies on may "
                       "be ignored; upgrade parcae-transformers if the model misbehaves")


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the release numbers, enough to order transformers versions."""
    return tuple(int(number) for number in re.findall(r"\d+", version)[:3])


def _check_positive(config, *names):
    for name in names:
        value = getattr(config, name)
        if value is None or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["ParcaeConfig"]
