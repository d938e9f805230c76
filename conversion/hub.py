"""Loading official ``parcae_lm`` checkpoints (Hub id or directory) through this package, explicitly.

Official checkpoints have no ``model_type`` in ``config.json`` and other weight names, so transformers' Auto classes
cannot read them, and this package does not change that: ``import modeling_parcae`` leaves every transformers class
as it is, nor any method of the classes it exports. The two explicit paths are :func:`from_pretrained_or_official`
(``modeling_parcae.from_pretrained_or_official``) and ``parcae convert``. Either recognises the official format,
converts it once into the Hub cache (``<HF_HUB_CACHE>/parcae-converted/<repo>--<commit>``) and loads the converted
directory. :func:`load_tokenizer` is the tokenizer counterpart. None of this is in the remote-code files saved next
to checkpoints, which hold the modeling code only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from modeling_parcae.conversion.checkpoint_folder import check_local_checkpoint
from modeling_parcae.conversion.convert import convert_official_to_transformers
from modeling_parcae.conversion.official_format import WEIGHT_FILES, is_official_config
from modeling_parcae.conversion.tokenizer import OFFICIAL_TOKENIZER_REPO, load_official_tokenizer


logger = logging.getLogger(__name__)

HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
CONVERTED_SUBDIR = "parcae-converted"
_HUB_ERRORS = (OSError, ValueError, HfHubHTTPError)


def maybe_convert_official(pretrained_model_name_or_path: str | Path, **hub_kwargs) -> str | None:
    """Directory of a converted copy of an official checkpoint, or ``None`` if the source is not official.

    Unknown sources (missing repo, no config.json) also give ``None`` so that transformers reports its usual error.
    """
    kwargs = _hub_kwargs(hub_kwargs)
    found = _official_source(pretrained_model_name_or_path, kwargs)
    if found is None:
        return None
    source_dir, cache_key, _ = found
    target = Path(kwargs.get("cache_dir") or constants.HF_HUB_CACHE) / CONVERTED_SUBDIR / cache_key
    if (target / "config.json").is_file():
        return str(target)
    logger.warning("parcae: %s is an official parcae_lm checkpoint; converting it once into %s",
                   pretrained_model_name_or_path, target)
    is_hub = not Path(pretrained_model_name_or_path).is_dir()
    if is_hub:
        _download_weights(str(pretrained_model_name_or_path), kwargs)
    tokenizer = default_tokenizer_source(pretrained_model_name_or_path, source_dir, **kwargs) if is_hub else None
    try:
        convert_official_to_transformers(source_dir, target, tokenizer_source=tokenizer,
                                         source_name=str(pretrained_model_name_or_path),
                                         tokenizer_hub_kwargs=_without_revision(kwargs))
    except OSError:
        if not (target / "config.json").is_file():  # unless another process finished the same conversion first
            raise
    return str(target)


def maybe_load_official_tokenizer(pretrained_model_name_or_path: str | Path, **hub_kwargs):
    """The tokenizer, with bos/eos/pad declared, of an official model (its own ``tokenizer.json``, else the official
    tokenizer repo; the weights are not downloaded) or of a bare official tokenizer (``tokenizer.json`` without
    ``tokenizer_config.json``, as ``tok_train.py`` writes it); ``None`` for anything else."""
    kwargs = _hub_kwargs(hub_kwargs)
    found = _official_source(pretrained_model_name_or_path, kwargs)
    if found is not None:
        source_dir, _, config = found
        source = default_tokenizer_source(pretrained_model_name_or_path, source_dir, **kwargs)
        if source is None:
            offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise FileNotFoundError(
                f"no tokenizer for {pretrained_model_name_or_path}: it holds no tokenizer.json and "
                f"{OFFICIAL_TOKENIZER_REPO} could not be fetched nor found in the local Hub cache{offline}; put the "
                "tokenizer's tokenizer.json next to the weights, or convert with `parcae convert SRC DST --tokenizer DIR`")
        return load_official_tokenizer(source, config.get("block_size"), **_without_revision(kwargs))
    bare = _bare_tokenizer_dir(pretrained_model_name_or_path, kwargs)
    if bare is None:
        return None
    try:
        return load_official_tokenizer(bare)
    except ValueError:  # a tokenizer.json without the Parcae special tokens is somebody else's
        return None


def from_pretrained_or_official(pretrained_model_name_or_path: str | Path, *model_args,
                                model_class: type[PreTrainedModel] | None = None, **kwargs) -> PreTrainedModel:
    """``model_class.from_pretrained`` (default ``ParcaeForCausalLM``) for a transformers-native Parcae checkpoint,
    and for an official ``parcae_lm`` one too: converted once into the Hub cache, then loaded from there.

    A function of the package, not a method of the model class: the class is also the remote code saved next to
    checkpoints, which must load the same wherever the converter is absent.
    """
    if model_class is None:
        from modeling_parcae.modeling_parcae import ParcaeForCausalLM as model_class
    converted = maybe_convert_official(pretrained_model_name_or_path, **kwargs)
    pretrained_model_name_or_path = converted or pretrained_model_name_or_path
    if not any(kwargs.get(name) is not None for name in ("gguf_file", "state_dict")):  # weights from elsewhere
        check_local_checkpoint(Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or ""))
    return model_class.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def load_tokenizer(pretrained_model_name_or_path: str | Path, **kwargs) -> PreTrainedTokenizerBase:
    """The tokenizer of any model: official checkpoints and bare official tokenizers get the official tokenizer with
    bos/eos/pad declared (:func:`maybe_load_official_tokenizer`), everything else ``AutoTokenizer.from_pretrained``."""
    official = maybe_load_official_tokenizer(pretrained_model_name_or_path, **kwargs)
    if official is not None:
        return official
    return AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)


def _hub_kwargs(kwargs: dict) -> dict:
    return {name: kwargs[name] for name in HUB_KWARGS if kwargs.get(name) is not None}


def _without_revision(kwargs: dict) -> dict:
    return {name: value for name, value in kwargs.items() if name != "revision"}


def _official_source(name: str | Path, kwargs: dict) -> tuple[Path, str, dict] | None:
    """(directory holding the official config, cache key, config) when ``name`` is an official checkpoint."""
    if not isinstance(name, (str, Path)):
        return None  # e.g. from_pretrained(None, config=..., state_dict=...)
    local = Path(name)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            return None
    else:
        try:
            config_path = Path(hf_hub_download(str(name), "config.json", **kwargs))
        except _HUB_ERRORS:
            return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict) or not is_official_config(config):
        return None
    if local.is_dir():
        return local, f"local--{_local_fingerprint(local)}", config
    # the snapshot folder is named after the commit, so a new upstream commit gets a new conversion
    return config_path.parent, f"{str(name).replace('/', '--')}--{config_path.parent.name}", config


def _bare_tokenizer_dir(name: str | Path, kwargs: dict) -> Path | None:
    """Directory of ``tokenizer.json`` when the source has no ``tokenizer_config.json`` next to it."""
    if not isinstance(name, (str, Path)):
        return None
    local = Path(name)
    if local.is_dir():
        bare = (local / "tokenizer.json").is_file() and not (local / "tokenizer_config.json").is_file()
        return local if bare else None
    try:
        tokenizer_json = Path(hf_hub_download(str(name), "tokenizer.json", **kwargs))
    except _HUB_ERRORS:
        return None
    try:
        hf_hub_download(str(name), "tokenizer_config.json", **kwargs)
        return None
    except _HUB_ERRORS:
        return tokenizer_json.parent


def _local_fingerprint(directory: Path) -> str:
    """Changes when the directory or its weights change, so a stale conversion is never reused."""
    parts = [str(directory.resolve())]
    for name in ("config.json", *WEIGHT_FILES):
        path = directory / name
        if path.is_file():
            stat = path.stat()
            parts.append(f"{name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def download_official(repo_id: str, **hub_kwargs) -> Path:
    """Fetch config.json and the first available official weights file; returns the snapshot directory."""
    kwargs = _hub_kwargs(hub_kwargs)
    config_path = Path(hf_hub_download(repo_id, "config.json", **kwargs))
    _download_weights(repo_id, kwargs)
    return config_path.parent


def _download_weights(repo_id: str, kwargs: dict) -> None:
    for name in WEIGHT_FILES:
        try:
            hf_hub_download(repo_id, name, **kwargs)
            return
        except _HUB_ERRORS:
            continue
    raise FileNotFoundError(f"{repo_id} holds none of the official weight files {', '.join(WEIGHT_FILES)}")


def default_tokenizer_source(name: str | Path, source_dir: Path, **hub_kwargs) -> str | Path | None:
    """The model's own ``tokenizer.json`` if it has one, else the official tokenizer repo if reachable."""
    kwargs = _hub_kwargs(hub_kwargs)
    if (source_dir / "tokenizer.json").is_file():
        return source_dir
    if not Path(name).is_dir():
        try:
            return Path(hf_hub_download(str(name), "tokenizer.json", **kwargs)).parent
        except _HUB_ERRORS:
            pass
    try:
        hf_hub_download(OFFICIAL_TOKENIZER_REPO, "tokenizer.json", **_without_revision(kwargs))
        return OFFICIAL_TOKENIZER_REPO
    except _HUB_ERRORS:
        logger.warning("parcae: no tokenizer found for %s (nor %s); loading the model only", name,
                       OFFICIAL_TOKENIZER_REPO)
        return None
