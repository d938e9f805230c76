"""Strict translation of state dicts between the official names and this project's names.

The official loaders use ``strict=False`` and silently keep random weights for any tensor they cannot place; here
every tensor is accounted for: each official tensor maps to exactly one target, or is the allow-listed derived
``freqs_cis`` buffer (checked against the recomputed table), and anything else is reported in one error.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from modeling_parcae.configuration_parcae import ParcaeConfig
from modeling_parcae.conversion.key_map import DERIVED_OFFICIAL_KEYS, hf_to_official_key, official_to_hf_key
from modeling_parcae.conversion.rope import freqs_cis_problem, official_freqs_cis


TIED_HF_KEY = "lm_head.weight"
EMBEDDING_HF_KEY = "model.embed_tokens.weight"


class KeyAccountingError(ValueError):
    """Missing, unexpected or mis-shaped tensors; the message lists all of them."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), problems=()):
        self.missing, self.unexpected, self.mismatched, self.problems = (
            sorted(missing), sorted(unexpected), list(mismatched), list(problems))
        lines = ["state dict does not match the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, found, expected in self.mismatched:
            lines.append(f"  shape mismatch: {key} has {tuple(found)}, the model expects {tuple(expected)}")
        lines.extend(f"  {problem}" for problem in self.problems)
        super().__init__("\n".join(lines))


def expected_hf_shapes(config: ParcaeConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model saves, from a model built on the meta device (no memory)."""
    from modeling_parcae.modeling_parcae import ParcaeForCausalLM

    with torch.device("meta"):
        model = ParcaeForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def official_to_hf(state: dict[str, torch.Tensor], config: ParcaeConfig,
                   expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Rename an (unprefixed) official state dict; raises :class:`KeyAccountingError` unless it fits exactly."""
    converted: dict[str, torch.Tensor] = {}
    unexpected, problems = [], []
    for key, tensor in state.items():
        if key in DERIVED_OFFICIAL_KEYS:
            problem = freqs_cis_problem(tensor, config.head_dim, config.max_position_embeddings,
                                        config.rope_parameters["rope_theta"])
            if problem:
                problems.append(problem)
            continue
        target = official_to_hf_key(key, looped=config.looped)
        if target is None or target not in expected:
            unexpected.append(key)
        else:
            converted[target] = tensor
    if config.tie_word_embeddings:
        if TIED_HF_KEY not in converted and EMBEDDING_HF_KEY in converted:
            converted[TIED_HF_KEY] = converted[EMBEDDING_HF_KEY]  # a saver that dropped the tied duplicate
        _check_tied(converted, problems)
    missing = [key for key in expected if key not in converted]
    _raise_if_wrong(converted, expected, missing, unexpected, problems)
    return converted


def hf_to_official(state: dict[str, torch.Tensor], config: ParcaeConfig,
                   expected: dict[str, tuple[int, ...]]) -> OrderedDict[str, torch.Tensor]:
    """The official state dict (key order of the official ``Parcae`` module in
    ``parcae_lm/models/parcae/parcae.py``, ``freqs_cis`` first, tied head sharing the embedding's storage)."""
    state = dict(state)
    if config.tie_word_embeddings and TIED_HF_KEY not in state and EMBEDDING_HF_KEY in state:
        state[TIED_HF_KEY] = state[EMBEDDING_HF_KEY]  # safetensors stores the tied tensor once
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected or hf_to_official_key(key, config.looped) is None]
    problems = []
    if config.tie_word_embeddings:
        _check_tied(state, problems)
    _raise_if_wrong(state, expected, missing, unexpected, problems)
    official = {hf_to_official_key(key, config.looped): tensor for key, tensor in state.items()}
    if config.tie_word_embeddings:
        official["lm_head.weight"] = official["transformer.wte.weight"]
    official["freqs_cis"] = official_freqs_cis(config.head_dim, config.max_position_embeddings,
                                               config.rope_parameters["rope_theta"])
    return OrderedDict(sorted(official.items(), key=lambda item: _official_rank(item[0])))


def _check_tied(state: dict[str, torch.Tensor], problems: list[str]) -> None:
    head, embedding = state.get(TIED_HF_KEY), state.get(EMBEDDING_HF_KEY)
    if head is None or embedding is None or head is embedding:
        return
    if head.shape != embedding.shape or not torch.equal(head, embedding):
        problems.append("tie_embeddings is set but lm_head.weight differs from the token embedding")


def _raise_if_wrong(state, expected, missing, unexpected, problems) -> None:
    mismatched = [(key, tensor.shape, expected[key]) for key, tensor in state.items()
                  if key in expected and tuple(tensor.shape) != expected[key]]
    if missing or unexpected or mismatched or problems:
        raise KeyAccountingError(missing, unexpected, mismatched, problems)


_STAGE_ORDER = ("transformer.wte.", "transformer.prelude.", "transformer.h.", "transformer.adapter.",
                "transformer.core_block.", "transformer.C.", "transformer.coda.", "transformer.ln_f.",
                "transformer.ln_prelude.", "value_embeds.", "lm_head.")
_BLOCK_ORDER = ("norm_1.", "attn.c_q.", "attn.c_k.", "attn.c_v.", "attn.c_proj.", "attn.ve_gate.", "norm_2.",
                "mlp.fc.", "mlp.proj.")

_ADAPTER_ORDER = ("A_log", "dt_bias", "B")


def _official_rank(key: str) -> tuple:
    """Sort key reproducing ``state_dict()`` order of the official modules (module registration order)."""
    if key == "freqs_cis":
        return (-1,)
    stage = next(i for i, prefix in enumerate(_STAGE_ORDER) if key.startswith(prefix))
    rest = key[len(_STAGE_ORDER[stage]):]
    index, _, inner = rest.partition(".")
    if index.isdigit():
        position = next((i for i, prefix in enumerate(_BLOCK_ORDER) if inner.startswith(prefix)), len(_BLOCK_ORDER))
        return (stage, int(index), position, inner)
    return (stage, 0, _ADAPTER_ORDER.index(rest) if rest in _ADAPTER_ORDER else 0, rest)
