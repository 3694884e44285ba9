"""One vocabulary for precisions: ``fp32``, ``fp16``, ``bf16`` (accelerate's, which the
training configs use, with ``no`` for accelerate's full precision).

``mixed_precision`` (training) keeps accelerate's values ``no | fp16 | bf16``; ``dtype``
(sampling) takes ``fp32 | fp16 | bf16`` and accepts torch's spellings (``float32``,
``float16``, ``bfloat16``) that older configs used.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: other spellings a user may have written, and what they mean
DTYPE_SPELLINGS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "no": "fp32"}
#: how sample folders recorded the dtype before this vocabulary (kept: settings stay comparable)
LEGACY_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str) -> torch.dtype:
    """``fp16`` -> ``torch.float16``; any accepted spelling, and ``no`` (full precision)."""
    return DTYPES[DTYPE_SPELLINGS.get(name, name)]
