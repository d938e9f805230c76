"""Optional dependencies: which distributions of an extra (``[train]``, ``[eval]`` in pyproject.toml) are missing.

Read from the installed package's own metadata, so the list of an extra lives in pyproject.toml only; ``parcae train``
and ``parcae eval`` check it before doing any work and name the extra to install. The core install (loading,
converting, generating) needs none of them.
"""

from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTION = "parcae-transformers"


class MissingExtraError(ImportError):
    """An optional extra of this package is not installed."""


def missing_distributions(extra: str) -> list[str]:
    """Distributions listed under ``extra`` that are not installed (none when this package itself is not installed,
    e.g. a source tree on ``PYTHONPATH``: there is no metadata to check against)."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        specifier, _, marker = requirement.partition(";")
        name = re.match(r"[A-Za-z0-9._-]+", specifier.strip()).group(0)
        if f'extra == "{extra}"' not in marker or name == DISTRIBUTION:
            continue
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra when any of its distributions is missing."""
    missing = missing_distributions(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the [{extra}] extra ({', '.join(missing)} not installed): "
            f"pip install '{DISTRIBUTION}[{extra}]'"
        )
