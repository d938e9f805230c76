"""Peak resident memory added by one call, read from the kernel (Linux ``/proc/self/status``).

``tracemalloc`` does not see torch's allocations and torch keeps no statistics for its CPU allocator, so this measures
what the operating system sees: the process's peak resident set (``VmHWM``) during the call minus its resident set
(``VmRSS``) just before it, after resetting the peak (``/proc/self/clear_refs``).

glibc keeps freed blocks in its heap, which would hide a call's allocations behind memory freed by earlier calls. So
:func:`peak_bytes` switches glibc to one mapping per buffer of 64 KiB or more (returned to the kernel when freed) for
the measured call only, and :func:`enable` otherwise fixes glibc's thresholds at the values its own adaptive rule
settles at after the first large frees (mmap 32 MiB, trim 64 MiB): timed calls run with ordinary heap reuse, because
a page fault per new buffer would add a cost no user pays. Memory is therefore measured in its own call, not in the
timed ones.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, glibc malloc.h
_TIMING = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20}
_MEASURING = {_M_MMAP_THRESHOLD: 64 * 2**10, _M_TRIM_THRESHOLD: 128 * 2**10}
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_libc: ctypes.CDLL | None = None


def _apply(settings: dict[int, int]) -> bool:
    return all(_libc.mallopt(parameter, value) == 1 for parameter, value in settings.items())


def enable() -> str | None:
    """Prepare glibc for timing and peak measurement; returns why peak memory cannot be measured here, or None."""
    global _libc
    try:
        _libc = ctypes.CDLL("libc.so.6")
        if not _apply(_TIMING):
            raise OSError("mallopt refused the thresholds")
        _CLEAR_REFS.write_text("5")
        _status_bytes("VmHWM")
    except (OSError, AttributeError, RuntimeError) as error:
        _libc = None
        return f"no glibc mallopt / procfs peak-RSS reset on this system ({error})"
    return None


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from {_STATUS}")


def peak_bytes(call: Callable[[], Any]) -> int | None:
    """Run ``call`` once; the peak resident bytes it added over the resident size before it (None if unavailable)."""
    if _libc is None:
        call()
        return None
    _apply(_MEASURING)
    try:
        _libc.malloc_trim(0)
        before = _status_bytes("VmRSS")
        _CLEAR_REFS.write_text("5")  # peak := current
        result = call()
        peak = _status_bytes("VmHWM") - before
        del result
    finally:
        _apply(_TIMING)
        _libc.malloc_trim(0)
    return max(peak, 0)
