"""ImageReward (Xu et al., 2023) as a self-contained scorer: loading, tokenisation, preprocessing.

The 2023 ``image-reward`` package does not run on transformers 5 (nor without torchvision), so
snpo re-implements the model from the checkpoint alone (:mod:`snpo.scoring.blip`: a BLIP ViT
image encoder, a BLIP "MED" BERT text encoder whose every layer cross-attends to all image
tokens, and a 5-Linear head). This module turns images and prompts into its inputs as the
reference (THUDM/ImageReward 1.5, ``ImageReward/ImageReward.py``) does:

* image: its ``_transform`` -- ``Resize(224, BICUBIC)`` on the short side and ``CenterCrop(224)``
  on the PIL image *in its own mode*, then ``convert("RGB")``, ``ToTensor()``, ``Normalize`` with
  the CLIP mean/std (openai-CLIP's order, :func:`snpo.scoring.preprocess.clip_preprocess` with
  ``convert_rgb="after"``); RGBA/LA are resized with premultiplied alpha, palette images with
  NEAREST, 16-bit images at full depth and clipped at 255 by the conversion, as PIL does there;
* text: ``bert-base-uncased`` + ``[DEC]`` (bos) and ``[ENC]`` added as special tokens (ids 30522,
  30523; hence ``vocab_size`` 30524), ``padding="max_length", truncation=True, max_length=35``.
  The ids are fed as tokenised, i.e. the first token stays ``[CLS]``: ``ImageReward.score`` /
  ``inference_rank`` (and the training ``encode_data``) do **not** substitute
  ``tokenizer.enc_token_id`` (BLIP's ITM head does; ImageReward does not).

Checkpoint key mapping: the module tree mirrors the reference, so ``ImageReward.pt`` keys load
one to one (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.{0,2,4,6,7}.*``).
A ``module.`` prefix is stripped, a missing ``blip.`` prefix is added, a ``{"state_dict": ...}`` /
``{"model": ...}`` wrapper is opened, and ``blip.vision_proj``/``blip.text_proj``/``itm_head``
(unused by the reward) and the ``embeddings.position_ids`` buffer are ignored. Any other key
under the encoders or head that the re-implementation would not use is an error, so a checkpoint
variant with extra machinery can not be silently mis-scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from snpo.errors import ConfigError, UserError

from .base import (
    ImagesLike,
    as_pil_list,
    batches,
    cached_hub_file,
    load_tensor_file,
    missing,
    resolve_dir,
    resolve_file,
)
from .blip import IMAGE_REWARD_MEAN, IMAGE_REWARD_STD, ImageRewardConfig, ImageRewardModel
from .preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ClipImageConfig,
    clip_preprocess,
    clip_preprocess_tensor,
)

__all__ = [
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "MAX_LENGTH",
    "ImageRewardConfig",
    "ImageRewardModel",
    "load_image_reward_state_dict",
    "make_image_reward",
    "preprocess_pil",
    "preprocess_tensor",
]

MAX_LENGTH = 35
HUB_ID = "THUDM/ImageReward"
FLAG = "--image-reward"
TOKENIZER_FLAG = "--image-reward-tokenizer"
TOKENIZER_ID = "bert-base-uncased"
_TOKENIZER_HUB_IDS = (TOKENIZER_ID, "google-bert/bert-base-uncased")
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
_CKPT_NAMES = ("ImageReward.pt", "ImageReward.pth", "ImageReward.safetensors", "model.safetensors")
_DOWNLOAD = f"`ImageReward.pt` (and `med_config.json`) from the Hugging Face repo {HUB_ID}"
_TOKENIZER_DOWNLOAD = f"the `{TOKENIZER_ID}` tokenizer (vocab.txt, tokenizer_config.json)"
# Keys of ImageReward.pt that the reward does not use.
_IGNORED = re.compile(
    r"^blip\.(vision_proj|text_proj|itm_head)\.|^blip\.text_encoder\.embeddings\.position_ids$"
)
_USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_image_reward_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an ImageReward checkpoint (``.pt`` via ``weights_only=True``, or safetensors),
    with the key normalisation described in the module docstring."""
    path = Path(path)
    raw: object = load_tensor_file(path, what="ImageReward checkpoint")
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):  # pragma: no cover - load_tensor_file returns dicts
        raise UserError(f"{str(path)!r} does not hold a state dict (got {type(raw).__name__})")
    sd: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = str(key).removeprefix("module.")
        if k.startswith(("visual_encoder.", "text_encoder.")):
            k = "blip." + k
        if _IGNORED.search(k) or not k.startswith(_USED_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{str(path)!r}: {key!r} is a {type(value).__name__}, not a tensor")
        sd[k] = value
    return sd


def _build_model(sd: dict[str, torch.Tensor], med_config: Mapping | None) -> ImageRewardModel:
    cfg = ImageRewardConfig.from_state_dict(sd, med_config)
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    expected = set(model.state_dict())
    absent = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if absent or unexpected:
        raise UserError(
            "ImageReward checkpoint does not match the re-implemented architecture: "
            f"missing {absent[:5]}{'...' if len(absent) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval().requires_grad_(False)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _tokenizer_folder(tokenizer_path: str | Path | None, ckpt: Path) -> Path:
    """The bert-base-uncased folder: the given one, else next to the checkpoint, else the cache."""
    if tokenizer_path is not None:
        p = Path(tokenizer_path).expanduser()
        if not p.exists() and "/" not in str(tokenizer_path):  # a bare hub name, e.g. the default
            hit = cached_hub_file(str(tokenizer_path), _TOKENIZER_FILES)
            if hit is not None:
                return hit.parent
        folder = resolve_dir(
            tokenizer_path,
            what="ImageReward tokenizer",
            download=_TOKENIZER_DOWNLOAD,
            flag=TOKENIZER_FLAG,
        )
        if not _has_tokenizer(folder):
            raise missing(
                "ImageReward tokenizer",
                folder,
                _TOKENIZER_DOWNLOAD,
                TOKENIZER_FLAG,
                "no vocab.txt or tokenizer.json",
            )
        return folder
    for cand in (ckpt.parent / "tokenizer", ckpt.parent / TOKENIZER_ID, ckpt.parent):
        if _has_tokenizer(cand):
            return cand
    for repo in _TOKENIZER_HUB_IDS:
        hit = cached_hub_file(repo, _TOKENIZER_FILES)
        if hit is not None:
            return hit.parent
    raise missing(
        f"ImageReward tokenizer ({TOKENIZER_ID})",
        ckpt.parent,
        _TOKENIZER_DOWNLOAD,
        TOKENIZER_FLAG,
        "not next to the checkpoint nor in the local Hugging Face cache",
    )


def _load_tokenizer(folder: Path, vocab_size: int):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    # as BLIP's init_tokenizer(): the checkpoint's vocabulary has these two rows appended
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) > vocab_size:
        raise UserError(
            f"ImageReward tokenizer at {str(folder)!r} has {len(tok)} tokens but the checkpoint "
            f"only {vocab_size} embeddings; use {TOKENIZER_ID}"
        )
    return tok


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def _image_config(size: int) -> ClipImageConfig:
    """ImageReward's ``_transform(size)``: Resize(size, BICUBIC), CenterCrop(size), CLIP mean/std."""
    return ClipImageConfig(size=size, crop_size=(size, size), mean=CLIP_MEAN, std=CLIP_STD)


def preprocess_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Reference preprocessing of PIL images (any mode) -> (B,3,size,size) float32, normalised."""
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images, got {type(img).__name__}")
    return clip_preprocess(
        list(images), _image_config(size), crop_rounding="round", convert_rgb="after"
    )


def preprocess_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B,C,H,W) in [0,1] -> (B,3,size,size) normalised, differentiably.

    The PIL path's resize (two passes with the 8-bit clamp between them) without its roundings:
    within 2/255 per pixel (before normalisation) of :func:`preprocess_pil` on the same images
    saved as 8-bit, 0.5/255 when no resize is needed; see
    :func:`snpo.scoring.preprocess.clip_preprocess_tensor`.
    """
    return clip_preprocess_tensor(images, _image_config(size), crop_rounding="round")


# --------------------------------------------------------------------------------------------
# public factory
# --------------------------------------------------------------------------------------------


def make_image_reward(
    path: str | Path | None = HUB_ID,
    *,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
) -> Callable[[Sequence[Image.Image] | torch.Tensor, Sequence[str] | str], torch.Tensor]:
    """ImageReward scorer: ``fn(images, prompts) -> torch.Tensor (B,)`` (float32, on CPU).

    ``path``: ``ImageReward.pt`` / a ``.safetensors`` of the same keys, or a folder holding one
    (and optionally ``med_config.json``, and a ``tokenizer``/``bert-base-uncased`` subfolder),
    or a hub id whose files are already in the local Hugging Face cache (nothing is downloaded).
    ``tokenizer_path``: a local ``bert-base-uncased`` folder; by default looked for next to the
    checkpoint, then as ``bert-base-uncased`` in the local HF cache.

    ``images``: PIL images or a float tensor (B,3,H,W) in [0,1]; a tensor is quantised as a saved
    PNG (``round(x * 255)``) and then scored exactly like the PIL image, so both give the
    reference's number. ``prompts``: one string per image (or one string for all).

    The returned function also carries ``model``, ``tokenizer``, ``config``, ``tokenize``,
    ``preprocess`` and ``score_pixels(pixels, prompts)``: the differentiable score of already
    normalised pixels, e.g. from :func:`preprocess_tensor` (no quantisation; use outside
    ``torch.no_grad`` for reward gradients).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    ckpt = resolve_file(
        HUB_ID if path is None else path,
        filenames=_CKPT_NAMES,
        what="ImageReward weights",
        download=_DOWNLOAD,
        flag=FLAG,
    )
    med_path = ckpt.parent / "med_config.json"
    med = json.loads(med_path.read_text()) if med_path.is_file() else None
    model = _build_model(load_image_reward_state_dict(ckpt), med)
    cfg = model.config
    tokenizer = _load_tokenizer(_tokenizer_folder(tokenizer_path, ckpt), cfg.vocab_size)
    model.blip.to(device=device, dtype=dtype)
    model.mlp.to(device=device, dtype=torch.float32)  # as the reference: head on .float() input
    dev = torch.device(device)
    max_length = min(MAX_LENGTH, cfg.max_positions)

    def tokenize(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]

    def preprocess(images: ImagesLike) -> torch.Tensor:
        return preprocess_pil(as_pil_list(images, convert_rgb=False), cfg.image_size)

    def score_pixels(pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = tokenize(prompts)
        return model(pixels.to(device=dev, dtype=dtype), ids.to(dev), mask.to(dev))

    def score(images, prompts) -> torch.Tensor:
        images = as_pil_list(images, convert_rgb=False)
        n = len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for sl in batches(n, batch_size):
                out.append(score_pixels(preprocess(images[sl]), prompts[sl]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    score.model = model  # type: ignore[attr-defined]
    score.tokenizer = tokenizer  # type: ignore[attr-defined]
    score.config = cfg  # type: ignore[attr-defined]
    score.tokenize = tokenize  # type: ignore[attr-defined]
    score.preprocess = preprocess  # type: ignore[attr-defined]
    score.score_pixels = score_pixels  # type: ignore[attr-defined]
    return score
