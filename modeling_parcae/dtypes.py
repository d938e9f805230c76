"""The ``--dtype`` names the CLIs accept (``parcae generate``, ``parcae eval``) and the torch dtypes they mean."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for names outside :data:`DTYPES`."""
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]
