"""Parcae looped language models for Hugging Face transformers.

Importing this package registers ``model_type="parcae"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` (transformers' own registry; no transformers function and no method of the exported classes
is replaced), so ``ParcaeForCausalLM`` behaves the same imported from here and loaded as remote code. Official
``parcae_lm`` checkpoints load through :func:`from_pretrained_or_official` (converted once, then cached).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_parcae.bundled import demo_model_path, eval_tasks_path
from modeling_parcae.cache_parcae import ParcaeSharedLoopCache, ParcaeSlotMap
from modeling_parcae.configuration_parcae import ParcaeConfig
from modeling_parcae.conversion.hub import from_pretrained_or_official, load_tokenizer
from modeling_parcae.modeling_parcae import ParcaeForCausalLM, ParcaeModel, ParcaePreTrainedModel
from modeling_parcae.presets import list_presets, load_preset


AutoConfig.register("parcae", ParcaeConfig, exist_ok=True)
AutoModel.register(ParcaeConfig, ParcaeModel, exist_ok=True)
AutoModelForCausalLM.register(ParcaeConfig, ParcaeForCausalLM, exist_ok=True)
# save_pretrained writes `auto_map` and copies the remote-code files (modeling only) next to the weights
ParcaeConfig.register_for_auto_class()
ParcaeModel.register_for_auto_class("AutoModel")
ParcaeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "ParcaeConfig",
    "ParcaeForCausalLM",
    "ParcaeModel",
    "ParcaePreTrainedModel",
    "ParcaeSharedLoopCache",
    "ParcaeSlotMap",
    "demo_model_path",
    "eval_tasks_path",
    "from_pretrained_or_official",
    "list_presets",
    "load_preset",
    "load_tokenizer",
]
