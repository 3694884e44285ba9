"""Paired image transforms: the same crop and flip for both images of a preference pair.

A pair must stay comparable: if the chosen image were flipped and the rejected one not, the
model could learn "flipped = preferred". One random draw per pair decides the flip and a
*relative* crop offset ``(u_top, u_left)`` in [0, 1); each image is then cropped at
``floor(u * (size - R + 1))`` of its own resized size. The two images of a pair may differ in
size (Pick-a-Pic mixes resolutions): equal sizes give identical pixel offsets, different sizes
give the same relative position.

Order of operations (as diffusers' SDXL training script): resize the shorter side to ``R``,
flip, crop. ``crop_top_left`` is in the coordinates of the resized (and flipped) image and
``original_size`` is the ``(height, width)`` before resizing, which is what SDXL's
micro-conditioning expects.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
}


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


class PairedTransform:
    """Resize, crop and optionally flip both images of a pair with one random draw.

    Args:
        resolution: output side ``R``; outputs are ``(3, R, R)``.
        center_crop: centre crop (deterministic) or a random crop.
        random_flip: flip the pair horizontally with probability 1/2.
        resample: ``"bicubic"`` (default), ``"lanczos"`` or ``"bilinear"``.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = True,
        random_flip: bool = False,
        resample: str = "bicubic",
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, not {resolution}")
        if resample not in RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, not {resample!r}")
        self.resolution = int(resolution)
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = resample

    def __repr__(self) -> str:
        return (
            f"PairedTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip}, resample={self.resample!r})"
        )

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, float, bool]:
        """The per-pair random draw: ``(u_top, u_left, flip)``.

        Always draws three numbers, whatever the options, so that a generator's stream does
        not depend on them.
        """
        u = torch.rand(3, generator=generator).tolist()
        u_top, u_left = (0.5, 0.5) if self.center_crop else (u[0], u[1])
        return u_top, u_left, self.random_flip and u[2] < 0.5

    def apply(
        self, image: Image.Image, u_top: float, u_left: float, flip: bool
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """One image -> ``(pixels, original_size (h, w), crop_top_left (top, left))``."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        width, height = image.size
        r = self.resolution
        scale = r / min(width, height)
        # the short side is exactly R; rounding must not make the long side shorter than R
        new_w = r if width <= height else max(r, round(width * scale))
        new_h = r if height < width else max(r, round(height * scale))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), RESAMPLE[self.resample])
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top = _offset(u_top, new_h - r, self.center_crop)
        left = _offset(u_left, new_w - r, self.center_crop)
        image = image.crop((left, top, left + r, top + r))
        return to_tensor(image), (height, width), (top, left)

    def __call__(
        self,
        chosen: Image.Image,
        rejected: Image.Image,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Transform a pair; keys ``{chosen,rejected}_{pixels,original_size,crop_top_left}``.

        ``generator`` makes the draw reproducible (``PreferencePairDataset`` seeds one per
        item); without it the global torch RNG is used.
        """
        u_top, u_left, flip = self.sample(generator)
        out: dict[str, torch.Tensor] = {}
        for name, image in (("chosen", chosen), ("rejected", rejected)):
            pixels, original_size, crop_top_left = self.apply(image, u_top, u_left, flip)
            out[f"{name}_pixels"] = pixels
            out[f"{name}_original_size"] = torch.tensor(original_size, dtype=torch.long)
            out[f"{name}_crop_top_left"] = torch.tensor(crop_top_left, dtype=torch.long)
        return out


def _offset(u: float, slack: int, center: bool) -> int:
    """Crop offset in [0, slack] for relative position ``u``."""
    if slack <= 0:
        return 0
    if center:  # round((size - R) / 2), as diffusers' SDXL script
        return int(round(slack / 2.0))
    # floor(u * (slack + 1)) is uniform over the slack + 1 possible offsets
    return min(int(u * (slack + 1)), slack)
