"""HPSv2 / HPSv2.1: Human Preference Score v2 (Wu et al., 2023).

An open_clip ViT-H-14 fine-tuned on human preferences; the checkpoints ``HPS_v2_compressed.pt``
and ``HPS_v2.1_compressed.pt`` (hub repo ``xswu/HPSv2``) hold ``{"state_dict": <open_clip keys>}``.
Both versions share the architecture and differ only in weights.

    HPS(image, prompt) = 100 * cos(E_img(image), E_txt(prompt))

The reference ``hpsv2.score`` returns the bare cosine (``image_features @ text_features.T`` of
unit vectors, ~0.27); papers report it x100 (~27), which is what this scorer returns.

Preprocessing is HPSv2's ``preprocess_val`` (see :func:`snpo.scoring.preprocess.hps_preprocess`):
convert to RGB, longer side -> 224 bicubic, zero-pad to square, OpenAI mean/std.  The tokenizer
is open_clip's (``get_tokenizer('ViT-H-14')``: ftfy + HTML-unescape cleaning, CLIP BPE, context
77), re-implemented in :mod:`snpo.scoring.open_clip_tokenizer` and read from a folder with the
CLIP tokenizer files (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) or open_clip's
``bpe_simple_vocab_16e6.txt.gz``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from snpo.errors import ConfigError, UserError

from .base import (
    ImagesLike,
    PromptsLike,
    Scorer,
    as_pil_list,
    as_prompt_list,
    batches,
    clip_image_embeds,
    clip_text_embeds,
    load_tensor_file,
    missing,
    normalize,
    resolve_dir,
    resolve_file,
)
from .open_clip_convert import open_clip_to_hf
from .open_clip_tokenizer import VOCAB_GZ, load_open_clip_tokenizer
from .preprocess import CLIP_MEAN, CLIP_STD, hps_preprocess

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
TOKENIZER_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLAGS = {"v2.0": "--hpsv2", "v2.1": "--hpsv2.1"}
TOKENIZER_FLAG = "--hps-tokenizer"


def _checkpoint_names(version: str) -> list[str]:
    stem = HPS_FILES[version].removesuffix(".pt")
    return [HPS_FILES[version], stem + ".safetensors"]


def load_hps_state_dict(path: Path) -> dict[str, Any]:
    """The open_clip state dict of an HPS checkpoint (``.pt`` via weights_only, or ``.safetensors``)."""
    obj = load_tensor_file(path, what="HPSv2 checkpoint")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"HPSv2 checkpoint {str(path)!r}: 'state_dict' is not a dict of tensors")
    return sd


def make_hpsv2(
    path_or_id: str | Path | None = HPS_REPO,
    *,
    version: str = "v2.0",
    tokenizer: str | Path | None = TOKENIZER_ID,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    antialias: bool = True,
) -> Scorer:
    """Build the HPSv2 scorer ``fn(images, prompts) -> (B,) float32``.

    Args:
        path_or_id: the ``.pt``/``.safetensors`` checkpoint, a folder holding it, or ``xswu/HPSv2``
            (only if already in the local HF cache).
        version: ``"v2.0"`` or ``"v2.1"`` -- which file to pick from a folder / the hub cache.
        tokenizer: folder (or cached hub id) with the CLIP tokenizer files, or open_clip's
            ``bpe_simple_vocab_16e6.txt.gz``.
        vision_heads, text_heads: attention heads; default to open_clip's ViT-H-14 layout
            (16 and 16) read off the widths, see :func:`~snpo.scoring.open_clip_convert.default_heads`.
        antialias: antialias the bicubic down-scale (torchvision >= 0.17 behaviour).
    """
    if version not in HPS_FILES:
        raise ConfigError(
            f"version: unknown HPS version {version!r}; expected one of {sorted(HPS_FILES)}"
        )
    name = "HPSv2" if version == "v2.0" else "HPSv2.1"
    ckpt = resolve_file(
        path_or_id,
        filenames=_checkpoint_names(version),
        what=f"{name} checkpoint",
        download=f"{HPS_FILES[version]} from {HPS_REPO}",
        flag=FLAGS[version],
    )
    tok_download = f"{TOKENIZER_ID} (tokenizer files) or open_clip's {VOCAB_GZ}"
    tok_path = Path(tokenizer).expanduser() if tokenizer not in (None, "") else None
    if tok_path is None or not tok_path.is_file():  # a folder or a cached hub id
        tok_path = resolve_dir(
            tokenizer, what=f"{name} tokenizer", download=tok_download, flag=TOKENIZER_FLAG
        )
    tok = load_open_clip_tokenizer(
        tok_path, what=f"{name} tokenizer", download=tok_download, flag=TOKENIZER_FLAG
    )
    model = open_clip_to_hf(
        load_hps_state_dict(ckpt), vision_heads=vision_heads, text_heads=text_heads, dtype=dtype
    ).to(device)
    image_size = int(model.config.vision_config.image_size)
    context = int(model.config.text_config.max_position_embeddings)
    if tok.eot_id != model.config.text_config.vocab_size - 1:
        # open_clip pools at argmax(ids); that is the end-of-text token only if it has the top id.
        raise missing(
            f"{name} tokenizer",
            tok_path,
            tok_download,
            TOKENIZER_FLAG,
            "its end-of-text id does not match the checkpoint's vocabulary",
        )

    def preprocess(images: ImagesLike) -> torch.Tensor:
        """Normalised pixels ``(B, 3, S, S)`` as HPSv2's ``preprocess_val`` makes them."""
        pils = as_pil_list(images, convert_rgb=False)  # hps_preprocess converts as HPSv2 does
        return hps_preprocess(pils, image_size, mean=CLIP_MEAN, std=CLIP_STD, antialias=antialias)

    def score_pixels(pixels: torch.Tensor, prompts: PromptsLike) -> torch.Tensor:
        """``100 * cos`` of already preprocessed pixels (differentiable outside inference mode)."""
        enc = tok(as_prompt_list(prompts, pixels.shape[0]), context)
        img = normalize(clip_image_embeds(model, pixels.to(device, dtype)).float())
        txt = normalize(
            clip_text_embeds(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device)
            ).float()
        )
        return 100.0 * (img * txt).sum(-1)

    @torch.inference_mode()
    def score(images: ImagesLike, prompts: PromptsLike) -> torch.Tensor:
        pils = as_pil_list(images, convert_rgb=False)
        texts = as_prompt_list(prompts, len(pils))
        out = [
            score_pixels(preprocess(pils[sl]), texts[sl]).cpu()
            for sl in batches(len(pils), batch_size)
        ]
        return torch.cat(out).float() if out else torch.zeros(0)

    score.model = model  # type: ignore[attr-defined]
    score.tokenizer = tok  # type: ignore[attr-defined]
    score.preprocess = preprocess  # type: ignore[attr-defined]
    score.score_pixels = score_pixels  # type: ignore[attr-defined]
    return score


def make_hpsv2_1(path_or_id: str | Path | None = HPS_REPO, **kwargs: Any) -> Scorer:
    """HPSv2.1: same network and scoring as :func:`make_hpsv2`, the ``HPS_v2.1_compressed.pt`` weights."""
    kwargs.setdefault("version", "v2.1")
    return make_hpsv2(path_or_id, **kwargs)
