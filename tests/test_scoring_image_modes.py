"""Every scorer on RGBA, LA, palette, grayscale, bilevel and 16-bit images.

Each original pipeline handles image modes in its own order, and the order changes the pixels
(PIL resamples RGBA/LA with premultiplied alpha, palette and bilevel images with NEAREST, and
16-bit images at full depth, while ``convert("RGB")`` drops alpha and clips 16-bit values):

* openai-CLIP's ``preprocess`` (LAION aesthetic predictor) and ImageReward's ``_transform``:
  ``Resize(short side, BICUBIC)`` and ``CenterCrop`` on the image in its own mode, then
  ``convert("RGB")``, ``ToTensor``, ``Normalize``;
* HPSv2's ``preprocess_val``: ``convert("RGB")`` unless RGBA, ``ToTensor``, resize the longer
  side on the tensor, zero-pad, ``MaskAwareNormalize`` (an RGBA image keeps its alpha as a fourth
  channel, which the 3-channel ViT then refuses; snpo scores the first three channels);
* transformers' ``CLIPImageProcessor`` (PickScore, CLIP score): ``convert_to_rgb`` first --
  PIL's ``convert("RGB")`` in transformers 4, which the published numbers used.

The expected tensors below are derived here step by step in each original's order, with PIL,
numpy and torch calls written out, not with snpo's preprocessing functions.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from snpo.scoring.aesthetic import AestheticMLP, make_aesthetic
from snpo.scoring.clip_score import make_clip_score
from snpo.scoring.hpsv2 import make_hpsv2
from snpo.scoring.image_reward import make_image_reward
from snpo.scoring.pickscore import make_pickscore

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
SIZE = 32  # every tiny model here takes 32 x 32 pixels
W, H = 46, 37  # short side 37 -> 32, long side int(32 * 46 / 37) = 39: an odd crop margin of 7


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[:, :8] = 0  # fully transparent pixels whose colour must not bleed into the rest
    alpha[:, -8:] = 255
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 3
    return {
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, alpha]), "RGBA"),
        "LA": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
        "P": palette,
        "P+transparency": transparent_palette,
        "L": Image.fromarray(rgb[..., 1]),
        "1": Image.fromarray(rgb[..., 2] > 127),
        "I;16": Image.fromarray(rng.integers(0, 600, (H, W)).astype(np.uint16)),  # 16-bit PNG
        "I": Image.fromarray(
            rng.integers(0, 600, (H, W)).astype(np.int32)
        ),  # older Pillow's 16-bit
    }


IMAGES = _images()
NAMES = list(IMAGES)
# modes where resizing before or after the RGB conversion gives different pixels
ORDER_MATTERS = ("RGBA", "LA", "P", "P+transparency", "1", "I;16", "I")


def _normalise(arr: np.ndarray) -> torch.Tensor:
    """ToTensor (``/255``) + Normalize of an (H, W, 3) uint8 array -> (3, H, W) float64."""
    return torch.from_numpy((arr.astype(np.float64) / 255.0 - MEAN) / STD).permute(2, 0, 1)


def openai_clip_order(img: Image.Image, convert_first: bool = False) -> torch.Tensor:
    """openai-CLIP / ImageReward: Resize(32, BICUBIC) and CenterCrop(32) in the image's own mode
    (torchvision calls PIL's ``resize`` and ``crop``), then convert("RGB"), ToTensor, Normalize."""
    assert img.size == (W, H)
    if convert_first:  # the order snpo used before: only to show that the order matters
        img = img.convert("RGB")
    small = img.resize((39, SIZE), Image.Resampling.BICUBIC)
    left = int(round((39 - SIZE) / 2.0))  # torchvision CenterCrop: round(3.5) = 4
    assert left == 4
    crop = small.crop((left, 0, left + SIZE, SIZE))
    return _normalise(np.asarray(crop.convert("RGB")))


def hpsv2_order(img: Image.Image) -> torch.Tensor:
    """HPSv2 preprocess_val: RGB unless RGBA, ToTensor, ResizeMaxSize(32) on the tensor, pad,
    MaskAwareNormalize (mean/std on the first three channels); the first three channels."""
    if img.mode != "RGBA":  # _convert_to_rgb_or_rgba
        img = img.convert("RGB")
    x = torch.from_numpy(np.asarray(img).astype(np.float64) / 255.0).permute(2, 0, 1)
    scale = SIZE / max(H, W)
    nh, nw = round(H * scale), round(W * scale)  # 26 x 32
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    x = F.pad(
        x[0],
        (
            (SIZE - nw) // 2,
            SIZE - nw - (SIZE - nw) // 2,
            (SIZE - nh) // 2,
            SIZE - nh - (SIZE - nh) // 2,
        ),
    )
    rgb = (x[:3] - torch.from_numpy(MEAN).view(3, 1, 1)) / torch.from_numpy(STD).view(3, 1, 1)
    return rgb  # x[3] (alpha) is what the original then feeds to a 3-channel conv and fails on


def transformers4_order(img: Image.Image) -> torch.Tensor:
    """transformers 4's CLIPImageProcessor: convert_to_rgb = PIL ``convert("RGB")`` first, then
    resize the short side (bicubic, PIL), centre-crop with floor margins, rescale, normalise."""
    small = img.convert("RGB").resize((39, SIZE), Image.Resampling.BICUBIC)
    left = (39 - SIZE) // 2  # transformers: floor(3.5) = 3
    return _normalise(np.asarray(small)[:, left : left + SIZE])


# ---------------------------------------------------------------------------------------- assets


@pytest.fixture(scope="module")
def scorers(tmp_path_factory) -> dict:
    from test_image_reward import MED_CONFIG, VOCAB, _tiny_state_dict
    from test_scoring import OLD_STYLE_PREPROC, make_open_clip_sd, save_clip, write_tokenizer

    root = tmp_path_factory.mktemp("mode-scorers")
    save_clip(root / "clip", seed=1)
    save_clip(root / "pick", seed=2, logit_scale=math.log(80.0), with_processor=False)
    write_tokenizer(root / "proc")
    (root / "proc" / "preprocessor_config.json").write_text(json.dumps(OLD_STYLE_PREPROC))
    vocab = write_tokenizer(root / "tok")
    torch.save({"state_dict": make_open_clip_sd(5, vocab)}, root / "HPS_v2_compressed.pt")
    torch.manual_seed(0)
    torch.save(AestheticMLP(16).state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    ir = root / "ir"
    (ir / "tokenizer").mkdir(parents=True)
    torch.save(_tiny_state_dict(), ir / "ImageReward.pt")
    (ir / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (ir / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return {
        "pickscore": (make_pickscore(root / "pick", processor=root / "proc"), transformers4_order),
        "clip_score": (make_clip_score(root / "clip"), transformers4_order),
        "aesthetic": (
            make_aesthetic(root / "sac+logos+ava1-l14-linearMSE.pth", clip=root / "clip"),
            openai_clip_order,
        ),
        "hpsv2": (
            make_hpsv2(root, tokenizer=root / "tok", vision_heads=4, text_heads=2),
            hpsv2_order,
        ),
        "image_reward": (make_image_reward(ir / "ImageReward.pt"), openai_clip_order),
    }


SCORERS = ("pickscore", "clip_score", "aesthetic", "hpsv2", "image_reward")


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scorer_name", SCORERS)
def test_every_mode_is_preprocessed_in_the_originals_order(scorers, scorer_name):
    scorer, original = scorers[scorer_name]
    images = [IMAGES[n] for n in NAMES]
    got = scorer.preprocess(images).double()
    assert got.shape == (len(NAMES), 3, SIZE, SIZE)
    for name, pixels in zip(NAMES, got):
        want = original(IMAGES[name])
        torch.testing.assert_close(pixels, want, atol=1e-5, rtol=0, msg=f"{scorer_name} {name}")
    # the scores are the model on exactly those pixels, for every mode
    prompt = "a red cat"
    scores = scorer(images, prompt)
    assert scores.shape == (len(NAMES),) and torch.isfinite(scores).all()
    want_pixels = torch.stack([original(IMAGES[n]) for n in NAMES]).float()
    with torch.no_grad():
        want_scores = scorer.score_pixels(want_pixels, [prompt] * len(NAMES)).float().cpu()
    torch.testing.assert_close(scores, want_scores, atol=1e-4, rtol=0)


def test_the_order_matters_for_these_modes():
    """Guards the test above: converting first would fail it for every non-RGB/L mode."""
    for name in ORDER_MATTERS:
        diff = (openai_clip_order(IMAGES[name]) - openai_clip_order(IMAGES[name], True)).abs()
        assert diff.max() > 0.05, name
    for name in ("RGB", "L"):
        torch.testing.assert_close(
            openai_clip_order(IMAGES[name]),
            openai_clip_order(IMAGES[name], True),
            atol=1e-9,
            rtol=0,
        )


def test_transformers_processor_on_modes_without_alpha():
    """Our transformers-4 reference equals transformers' own PIL processor where transformers 5
    still converts plainly (no alpha, no transparency); transformers 5 composites transparent
    images onto white, transformers 4 (and snpo) drop the alpha."""
    from test_scoring import NEW_STYLE_PREPROC, _transformers_pil_processor

    proc = _transformers_pil_processor(NEW_STYLE_PREPROC)
    for name in ("RGB", "P", "L", "1", "I;16", "I"):
        img = IMAGES[name]
        want = torch.as_tensor(
            np.asarray(proc(images=[img], return_tensors="np")["pixel_values"][0])
        )
        torch.testing.assert_close(transformers4_order(img), want.double(), atol=1e-5, rtol=0)
    for name in ("RGBA", "LA"):  # transformers 4's convert_to_rgb == PIL convert("RGB")
        img = IMAGES[name].convert("RGB")
        want = torch.as_tensor(
            np.asarray(proc(images=[img], return_tensors="np")["pixel_values"][0])
        )
        torch.testing.assert_close(
            transformers4_order(IMAGES[name]), want.double(), atol=1e-5, rtol=0
        )


def test_hpsv2_rgba_is_the_originals_first_three_channels():
    """HPSv2 keeps RGBA as 4 channels; its RGB channels equal the RGB-converted image's."""
    rgba = IMAGES["RGBA"]
    torch.testing.assert_close(
        hpsv2_order(rgba), hpsv2_order(rgba.convert("RGB")), atol=1e-9, rtol=0
    )
