"""Parcae looped language models for Hugging Face transformers.

Importing this package registers ``model_type="parcae"`` with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from modeling_parcae.cache_parcae import ParcaeCache
from modeling_parcae.configuration_parcae import ParcaeConfig
from modeling_parcae.modeling_parcae import ParcaeForCausalLM, ParcaeModel, ParcaePreTrainedModel
from modeling_parcae.presets import list_presets, load_preset


AutoConfig.register("parcae", ParcaeConfig, exist_ok=True)
AutoModelForCausalLM.register(ParcaeConfig, ParcaeForCausalLM, exist_ok=True)
# save_pretrained writes `auto_map` and copies the remote-code files next to the weights
ParcaeConfig.register_for_auto_class()
ParcaeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "ParcaeCache",
    "ParcaeConfig",
    "ParcaeForCausalLM",
    "ParcaeModel",
    "ParcaePreTrainedModel",
    "list_presets",
    "load_preset",
]

# Official-format checkpoints (no `model_type` in config.json) load through the Auto classes too: the hook converts
# them on the fly and passes everything else through untouched.
from modeling_parcae.conversion.hub import install_auto_hooks  # noqa: E402

install_auto_hooks()
