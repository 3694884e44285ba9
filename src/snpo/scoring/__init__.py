"""Reward/preference scorers of the text-to-image alignment literature.

Each scorer is built by a factory ``make_<name>(path_or_id, *, device, dtype, batch_size, ...)``
returning ``fn(images, prompts) -> torch.Tensor`` of shape ``(B,)`` (float32, CPU), where
``images`` is a list of PIL images or a float tensor ``(B, 3, H, W)`` in ``[0, 1]``.

==============  =====================================================  ======================
name            score                                                  typical (real models)
==============  =====================================================  ======================
pickscore       ``exp(logit_scale) * cos(text, image)``                ~20-22
hpsv2, hpsv2.1  ``100 * cos(image, text)``                             ~26-28 (v2.0)
aesthetic       ``MLP(image_emb / ||image_emb||)``                     ~1-10
clip_score      ``100 * max(cos(image, text), 0)``                     ~25-35 (ViT-L/14)
image_reward    ImageReward's BLIP reward head                         ~ -2..2
==============  =====================================================  ======================

Each returned function also carries ``preprocess(images) -> pixels`` (the original's image
pipeline, for every PIL mode) and ``score_pixels(pixels, prompts)`` (differentiable outside
inference mode), plus ``model`` (and ``tokenizer``).

Nothing is downloaded: paths are local files/folders or hub ids already in the HF cache; a
missing file raises :class:`ScorerWeightsMissing` with a one-line hint.  Factories are imported
lazily so that ``import snpo.scoring`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from snpo.errors import ConfigError

from .base import ScorerWeightsMissing

__all__ = ["SCORERS", "ScorerWeightsMissing", "make_scorer", "scorer_names"]


def _lazy(module: str, factory: str) -> Callable[..., Any]:
    """A factory that imports ``snpo.scoring.<module>.<factory>`` on first call."""

    def make(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"{__name__}.{module}"), factory)(*args, **kwargs)

    make.__name__ = factory
    make.__qualname__ = factory
    make.__doc__ = f"Lazy alias of :func:`snpo.scoring.{module}.{factory}`."
    return make


# name -> factory(path_or_id, **kwargs) -> fn(images, prompts) -> (B,) tensor
SCORERS: dict[str, Callable[..., Any]] = {
    "pickscore": _lazy("pickscore", "make_pickscore"),
    "hpsv2": _lazy("hpsv2", "make_hpsv2"),
    "hpsv2.1": _lazy("hpsv2", "make_hpsv2_1"),
    "aesthetic": _lazy("aesthetic", "make_aesthetic"),
    "clip_score": _lazy("clip_score", "make_clip_score"),
    "image_reward": _lazy("image_reward", "make_image_reward"),
}


def scorer_names() -> list[str]:
    """Registered scorer names."""
    return sorted(SCORERS)


def make_scorer(name: str, path: Any = None, **kwargs: Any) -> Callable[..., Any]:
    """Build the scorer ``name`` from ``path`` (file, folder or cached hub id).

    ``path=None`` uses the factory's default (its canonical hub id, which must be cached);
    keyword arguments (``device``, ``dtype``, ``batch_size``, scorer-specific paths such as
    ``processor=``/``tokenizer=``/``clip=``) are passed through.
    """
    try:
        factory = SCORERS[name]
    except KeyError:
        raise ConfigError(
            f"scorers: unknown scorer {name!r}; choose from {', '.join(scorer_names())}"
        ) from None
    return factory(**kwargs) if path is None else factory(path, **kwargs)
