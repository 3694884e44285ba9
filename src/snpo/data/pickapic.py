"""Pick-a-Pic v2 columns and label rules.

Each row holds a caption, two generated images (``jpg_0``, ``jpg_1``, JPEG bytes) and the
labels ``label_0``, ``label_1``: 1/0 when image 0 won, 0/1 when image 1 won, 0.5/0.5 for a tie.
As in the original Diffusion-DPO code, only rows with ``label_0`` in {0, 1} are used by
default; ties can be kept with ``drop_ties=False`` (image 0 then goes first, arbitrarily).
"""

from __future__ import annotations

import math
from typing import Any

from snpo.data.skips import BAD_LABEL, TIE
from snpo.data.source import Schema

VALID_LABELS = (0.0, 0.5, 1.0)


def classify_labels(label_0: Any, label_1: Any, drop_ties: bool) -> tuple[str | None, bool]:
    """``(skip_kind or None, image_1_won)`` for one row's labels.

    A label outside {0, 0.5, 1}, NaN, missing, or a pair not summing to 1 is ``bad_label``:
    such a row is ambiguous, and guessing a winner would train on noise.
    """
    try:
        a, b = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return BAD_LABEL, False
    if not (math.isfinite(a) and math.isfinite(b)):
        return BAD_LABEL, False
    if a not in VALID_LABELS or b not in VALID_LABELS or a + b != 1.0:
        return BAD_LABEL, False
    if a == 0.5:
        return (TIE if drop_ties else None), False
    return None, a == 0.0


PICKAPIC = Schema(
    name="Pick-a-Pic",
    prompt="caption",
    images=("jpg_0", "jpg_1"),
    labels=("label_0", "label_1"),
    ids=("image_0_uid", "image_1_uid"),
    classify=classify_labels,
)
