"""Image preprocessing of the reference scorers, re-implemented with PIL/numpy/torch.

torchvision cannot be imported here, and transformers v5 prefers a torchvision backend for
``CLIPImageProcessor`` (it falls back to a PIL backend with a warning).  The pipelines the
metrics were published with are short, so we implement them directly and read the numbers
(size, crop, mean, std, resample) from the model folder's ``preprocessor_config.json``:

* :func:`clip_preprocess` -- resize the *shorter* side to ``size`` with PIL bicubic on the 8-bit
  image, centre-crop, ``/255``, ``(x - mean) / std``, in one of two orders:

  - ``convert_rgb="before"``: transformers' ``CLIPImageProcessor`` (PickScore, CLIP score)
    converts to RGB first (``convert_to_rgb``, PIL's ``convert("RGB")`` in transformers 4, which
    the published numbers used) and splits an odd crop margin with floor;
  - ``convert_rgb="after"``: openai-CLIP's ``preprocess`` (aesthetic predictor) and ImageReward's
    ``_transform`` -- torchvision ``Resize(size, BICUBIC)`` and ``CenterCrop`` on the PIL image
    *in its own mode*, then ``convert("RGB")``, ``ToTensor``, ``Normalize``; the crop margin is
    rounded (``crop_rounding="round"``).  The order matters outside RGB: PIL resamples RGBA and
    LA with premultiplied alpha, palette (P) and 1-bit images with NEAREST whatever is asked,
    and 16-bit images (I;16, I) at full depth before ``convert("RGB")`` clips them at 255.

* :func:`clip_preprocess_tensor` -- the same resize + crop + normalise on a float tensor,
  differentiably, matching PIL's two-pass arithmetic (see its docstring for the bound).
* :func:`hps_preprocess` -- HPSv2's ``preprocess_val`` (``light_augmentation=True`` in
  ``hpsv2.score``): ``convert("RGB")`` first, ``ToTensor``, then ``ResizeMaxSize``: resize the
  *longer* side to ``image_size`` with bicubic interpolation on the float tensor, zero-pad
  (black, before normalisation) to a square, then normalise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# openai CLIP's normalisation constants (also open_clip's OPENAI_DATASET_MEAN/STD, used by HPSv2).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipImageConfig:
    """The subset of a ``CLIPImageProcessor`` config the scorers need.

    ``size`` is the target of the shorter side (``size={"shortest_edge": N}``); ``resize_to``
    instead resizes to an exact ``(height, width)`` when the config says so.
    """

    size: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_normalize: bool = True
    resize_to: tuple[int, int] | None = None  # (height, width) for non-shortest-edge configs

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ClipImageConfig:
        """Parse both the old (``size: 224``) and new (``size: {"shortest_edge": 224}``) formats."""
        size_raw = cfg.get("size", 224)
        size, resize_to = 224, None
        if isinstance(size_raw, int):
            size = size_raw
        elif isinstance(size_raw, dict):
            if "shortest_edge" in size_raw:
                size = int(size_raw["shortest_edge"])
            elif "height" in size_raw and "width" in size_raw:
                resize_to = (int(size_raw["height"]), int(size_raw["width"]))
                size = min(resize_to)
        crop_raw = cfg.get("crop_size", size)
        if isinstance(crop_raw, int):
            crop = (crop_raw, crop_raw)
        elif isinstance(crop_raw, dict):
            crop = (int(crop_raw["height"]), int(crop_raw["width"]))
        else:
            crop = (size, size)
        resample = cfg.get("resample", Image.Resampling.BICUBIC)
        return cls(
            size=size,
            crop_size=crop,
            mean=tuple(float(m) for m in cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(float(s) for s in cfg.get("image_std", CLIP_STD)),
            resample=int(resample) if isinstance(resample, int) else Image.Resampling.BICUBIC,
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            resize_to=resize_to,
        )

    @classmethod
    def from_folder(cls, folder: Path, default_size: int | None = None) -> ClipImageConfig:
        """Read ``preprocessor_config.json`` (or the ``image_processor`` block of
        ``processor_config.json``); fall back to the CLIP defaults at ``default_size``."""
        for name, key in (
            ("preprocessor_config.json", None),
            ("processor_config.json", "image_processor"),
        ):
            f = Path(folder) / name
            if f.is_file():
                cfg = json.loads(f.read_text())
                if key is not None:
                    cfg = cfg.get(key)
                if isinstance(cfg, dict):
                    return cls.from_dict(cfg)
        size = default_size or 224
        return cls(size=size, crop_size=(size, size))


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """New ``(width, height)`` with the shorter side at ``size``.

    Same arithmetic in transformers' ``get_resize_output_image_size(default_to_square=False)``
    and torchvision's ``Resize(int)``: ``long = int(size * long / short)`` (truncation).
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_or_pad(
    arr: np.ndarray, crop_hw: tuple[int, int], rounding: Literal["floor", "round"]
) -> np.ndarray:
    """Centre crop of an ``(H, W, C)`` array; pads with zeros when the image is smaller."""
    h, w = arr.shape[:2]
    ch, cw = crop_hw
    if h < ch or w < cw:  # only reachable with odd configs; both references pad with zeros
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        arr = np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = _crop_box(h, w, crop_hw, rounding)
    return arr[top : top + ch, left : left + cw]


def _crop_box(
    h: int, w: int, crop_hw: tuple[int, int], rounding: Literal["floor", "round"]
) -> tuple[int, int]:
    """Centre-crop ``(top, left)``; negative where the image is smaller than the crop, which
    PIL's ``crop`` fills with zeros as torchvision's pad-then-crop does."""
    ch, cw = crop_hw

    def start(n: int, c: int) -> int:
        if n < c:
            return -((c - n) // 2)
        # transformers: (n - c) // 2; torchvision CenterCrop: int(round((n - c) / 2))
        return (n - c) // 2 if rounding == "floor" else int(round((n - c) / 2.0))

    return start(h, ch), start(w, cw)


def _resized_wh(im: Image.Image, cfg: ClipImageConfig) -> tuple[int, int]:
    if cfg.resize_to is not None:
        return cfg.resize_to[1], cfg.resize_to[0]
    return shortest_edge_size(im.width, im.height, cfg.size)


def clip_preprocess(
    images: Sequence[Image.Image],
    cfg: ClipImageConfig,
    *,
    crop_rounding: Literal["floor", "round"] = "floor",
    convert_rgb: Literal["before", "after"] = "before",
) -> torch.Tensor:
    """CLIP preprocessing of PIL images (any mode) -> float32 ``(B, 3, crop_h, crop_w)``.

    pixel = ((uint8 RGB after PIL resize + centre crop) * rescale_factor - mean) / std, with the
    conversion to RGB before the resize (transformers) or after the crop (openai-CLIP,
    ImageReward); see the module docstring.
    """
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    out = []
    for im in images:
        if convert_rgb == "before":
            im = im.convert("RGB")
        if cfg.do_resize:
            # Resize the 8-bit PIL image, as every reference pipeline does (rounding included).
            im = im.resize(_resized_wh(im, cfg), resample=cfg.resample)
        if convert_rgb == "after":
            if cfg.do_center_crop:
                top, left = _crop_box(im.height, im.width, cfg.crop_size, crop_rounding)
                ch, cw = cfg.crop_size
                im = im.crop((left, top, left + cw, top + ch))
            arr = np.asarray(im.convert("RGB"))
        else:
            arr = np.asarray(im)
            if cfg.do_center_crop:
                arr = _crop_or_pad(arr, cfg.crop_size, crop_rounding)
        x = arr.astype(np.float32) * np.float32(cfg.rescale_factor)
        if cfg.do_normalize:
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out)


def resize_like_pil(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """PIL's bicubic ``resize`` of 8-bit images, on float ``(B, C, H, W)`` in ``[0, 1]``, differentiably.

    PIL resamples in two passes -- horizontal, then vertical, each skipped when that side keeps
    its length -- with the antialiased a = -0.5 cubic (what ``F.interpolate(..., antialias=True)``
    computes per axis) and stores the intermediate as 8-bit, i.e. *clamped to [0, 255]* and
    rounded. The clamp matters at saturated edges (the overshoot of the cubic is cut before the
    second pass sees it), so it is reproduced here; the rounding is not (it has no gradient).
    """
    h, w = x.shape[-2:]
    nh, nw = size_hw
    if nw != w:
        x = F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    if nh != h:
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    return x


def clip_preprocess_tensor(
    images: torch.Tensor,
    cfg: ClipImageConfig,
    *,
    crop_rounding: Literal["floor", "round"] = "floor",
) -> torch.Tensor:
    """:func:`clip_preprocess` of float images ``(B, 3 or 1, H, W)`` in ``[0, 1]``, differentiably.

    Resize as PIL does (:func:`resize_like_pil`), centre-crop, normalise. Against the PIL path
    on the same images saved as 8-bit (``round(x * 255)``) it differs only by PIL's roundings:
    of the input, of the intermediate pass and of the output (each at most 0.5 / 255; the
    clamps do not enlarge differences). The weights of one pass sum in absolute value to at most
    1.27 (the largest over all sizes up to 260), so the difference is below
    ``((0.5 * 1.27 + 0.5) * 1.27 + 0.5) / 255 < 2 / 255`` per pixel before normalisation, and
    0.5 / 255 when no resize is needed; measured up to 1.6 / 255 on binary noise and stripes
    (without the clamp between the passes: up to 70 / 255). Values outside ``[0, 1]`` are
    clamped first, as the 8-bit conversion does.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if cfg.resample != Image.Resampling.BICUBIC:
        raise ValueError(
            f"only bicubic resizing is differentiable here, got resample={cfg.resample}"
        )
    x = images.float().clamp(0.0, 1.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if cfg.do_resize:
        if cfg.resize_to is not None:
            nh, nw = cfg.resize_to
        else:
            nw, nh = shortest_edge_size(w, h, cfg.size)
        x = resize_like_pil(x, (nh, nw))
    if cfg.do_center_crop:
        ch, cw = cfg.crop_size
        if x.shape[-2] < ch or x.shape[-1] < cw:
            ph, pw = max(ch - x.shape[-2], 0), max(cw - x.shape[-1], 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        top, left = _crop_box(x.shape[-2], x.shape[-1], cfg.crop_size, crop_rounding)
        x = x[..., top : top + ch, left : left + cw]
    if cfg.do_normalize:
        mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def hps_preprocess(
    images: Sequence[Image.Image],
    image_size: int,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    antialias: bool = True,
) -> torch.Tensor:
    """HPSv2 ``preprocess_val``: RGB -> ToTensor -> ResizeMaxSize(image_size, fill=0) -> Normalize.

    Images of any mode are converted with PIL's ``convert("RGB")`` first, as HPSv2's
    ``_convert_to_rgb_or_rgba`` does for every mode but RGBA. An RGBA image it keeps as RGBA,
    carries through ToTensor, resize, pad and ``MaskAwareNormalize`` as a fourth channel, and
    then fails in the 3-channel ViT; here it is scored by its RGB channels, which are exactly
    the first three channels of the original's tensor (PIL's RGBA -> RGB drops alpha without
    compositing, and every later step works per channel).

    The longer side is scaled to ``image_size`` (new dims ``round(dim * scale)``, Python rounding
    as in the reference) with bicubic interpolation on the float tensor (no clamping, as
    torchvision's tensor resize), then the short side is zero-padded symmetrically
    (``pad // 2`` before, the rest after).  Nothing happens when the longer side already equals
    ``image_size``.  ``antialias=True`` is torchvision >= 0.17's default for tensor resizes; older
    torchvision (what HPSv2 was released with) did not antialias tensors -- pass ``False`` to
    reproduce that.
    """
    m = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    out = []
    for im in images:
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        x = x.permute(2, 0, 1).to(torch.float32).div(255.0)  # ToTensor
        h, w = x.shape[1:]
        scale = image_size / float(max(h, w))
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            x = F.interpolate(
                x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias
            )[0]
        # The reference pads only after a resize; a non-square image whose longer side is already
        # ``image_size`` would then crash its ViT, so we pad in that case too.
        ph, pw = image_size - x.shape[1], image_size - x.shape[2]
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        out.append((x - m) / s)
    return torch.stack(out)
