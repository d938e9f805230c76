"""The names that differ between the transformers releases this model supports (5.16.1 to 5.25), bridged here alone.

transformers 5.24 renamed the KV cache everywhere: the ``forward`` argument ``past_key_values`` became ``cache``, so
did the field of the output dataclasses (which ``generate`` reads the next step's cache from) and the argument of
``create_causal_mask``. The model speaks of ``cache`` and goes through this module wherever transformers reads or
passes the name; nothing else in the model asks which release is installed.

This file is part of the remote code copied next to saved checkpoints: it imports only torch/transformers.
"""

import functools
import warnings
from collections.abc import Callable

from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast


# the newest release line the code is tested on (pyproject's ``transformers<5.26``; .ci/transformers_lane.py)
NEWEST_SUPPORTED_TRANSFORMERS = (5, 25)
# the name the installed release gives the KV cache: ``cache`` from 5.24, ``past_key_values`` before
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def causal_mask(*, cache, **kwargs):
    """``create_causal_mask`` with the cache under the installed release's argument name."""
    return create_causal_mask(**kwargs, **{CACHE_NAME: cache})


def cache_field(cache) -> dict:
    """The keyword that puts ``cache`` into an output dataclass of the installed release."""
    return {CACHE_NAME: cache}


def cache_of(output):
    """The KV cache an output (a model's or ``generate``'s) carries, under either release's field name."""
    return getattr(output, CACHE_NAME, None)


def accepts_either_cache_name(forward: Callable) -> Callable:
    """Let ``forward(..., cache=)`` also take ``past_key_values=``: the name transformers before 5.24 passes from
    ``generate``, deprecated from 5.24 on (with Llama's warning there). Both at once is an error: two caches, and
    no way to tell which one the caller meant."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            legacy = kwargs.pop("past_key_values")
            if CACHE_NAME == "cache":
                warnings.warn("`past_key_values` is deprecated since transformers 5.24: pass the KV cache as `cache`",
                              FutureWarning, stacklevel=2)
            if kwargs.get("cache") is not None and legacy is not None:
                raise TypeError("pass the KV cache once: as `cache` or as `past_key_values`, not both")
            kwargs["cache"] = kwargs.get("cache") if legacy is None else legacy
        return forward(*args, **kwargs)

    return wrapper


__all__ = ["CACHE_NAME", "NEWEST_SUPPORTED_TRANSFORMERS", "accepts_either_cache_name", "cache_field", "cache_of",
           "causal_mask"]
