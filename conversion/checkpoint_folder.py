"""What a transformers checkpoint folder must hold, checked where this package loads or publishes one.

transformers' own messages for a folder that lost a file are generic ("Error no file named model.safetensors, or
pytorch_model.bin, found in directory ...", "No such file or directory: .../cache_parcae.py" at import time, and only
where the folder is loaded with ``trust_remote_code=True``); these name the file and say what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from modeling_parcae.inputs import read_json_file

logger = logging.getLogger(__name__)

WEIGHT_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
REMEDY = "copy the missing file back, or write the folder again (save_pretrained, or `parcae convert`)"


def has_weights(directory: Path) -> bool:
    return any((directory / name).is_file() for name in WEIGHT_NAMES)


def missing_remote_code(directory: Path) -> list[str]:
    """The remote-code files the folder lacks: those ``auto_map`` in its config.json names and, recursively, the
    siblings they import (``cache_parcae.py (imported by modeling_parcae.py)``)."""
    from transformers.dynamic_module_utils import get_relative_imports

    auto_map = read_json_file(directory / "config.json", "config").get("auto_map") or {}
    pending = [(f"{reference.split('.')[0]}.py", "config.json's auto_map") for reference in auto_map.values()
               if isinstance(reference, str) and "--" not in reference]  # "repo--module.Class": code of another repo
    seen, missing = set(), []
    while pending:
        name, needed_by = pending.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if not (directory / name).is_file():
            missing.append(f"{name} (needed by {needed_by})")
            continue
        pending += [(f"{module}.py", name) for module in get_relative_imports(str(directory / name))]
    return missing


def check_local_checkpoint(directory: str | Path) -> None:
    """Before ``from_pretrained`` of a local transformers folder: no weights file is an error naming the file names
    looked for; missing remote code is a warning (this package loads the folder with its own code, but
    ``trust_remote_code=True`` without the package would fail)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        return
    if not has_weights(directory):
        raise FileNotFoundError(f"{directory} holds a config.json but no weights ({', '.join(WEIGHT_NAMES)}): the "
                                f"checkpoint folder is incomplete; {REMEDY}")
    missing = missing_remote_code(directory)
    if missing:
        logger.warning("parcae: %s lacks remote code %s: it loads with this package, but not with "
                       "trust_remote_code=True where the package is not installed; %s", directory,
                       ", ".join(missing), REMEDY)
