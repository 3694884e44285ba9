"""CLIP score (Hessel et al., 2021) as torchmetrics defines it.

    CLIPScore(image, prompt) = 100 * max(cos(E_img(image), E_txt(prompt)), 0)

with a transformers CLIP model, by default ``openai/clip-vit-large-patch14`` (torchmetrics'
default).  torchmetrics clamps the *batch mean* at 0; we clamp per sample -- identical whenever
cosines are positive, which they are for real CLIP models (~0.2-0.35).  Prompts are cut to the
model's 77 tokens with the end-of-text token kept (torchmetrics slices the ids instead, dropping
the end-of-text token of over-long prompts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import (
    ImagesLike,
    PromptsLike,
    Scorer,
    as_pil_list,
    as_prompt_list,
    batches,
    clip_image_embeds,
    clip_text_embeds,
    load_clip_model,
    load_clip_tokenizer,
    normalize,
    resolve_dir,
    tokenize,
)
from .preprocess import ClipImageConfig, clip_preprocess

MODEL_ID = "openai/clip-vit-large-patch14"
FLAG = "--clip-score"


def make_clip_score(
    path_or_id: str | Path | None = MODEL_ID,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> Scorer:
    """Build the CLIP-score scorer ``fn(images, prompts) -> (B,) float32`` in ``[0, 100]``.

    Args:
        path_or_id: CLIP folder (model + tokenizer + ``preprocessor_config.json``) or cached hub id.
    """
    folder = resolve_dir(path_or_id, what="CLIP-score weights", download=MODEL_ID, flag=FLAG)
    tok = load_clip_tokenizer(folder, what="CLIP-score tokenizer", download=MODEL_ID, flag=FLAG)
    model = load_clip_model(folder, what="CLIP-score weights", download=MODEL_ID, flag=FLAG)
    model = model.to(device=device, dtype=dtype)
    image_cfg = ClipImageConfig.from_folder(
        folder, default_size=model.config.vision_config.image_size
    )
    context = int(model.config.text_config.max_position_embeddings)

    def preprocess(images: ImagesLike) -> torch.Tensor:
        """Normalised pixels as transformers' ``CLIPProcessor`` makes them (RGB first, floor-split
        crop margins; RGB is PIL's ``convert("RGB")``, as in transformers 4)."""
        return clip_preprocess(as_pil_list(images), image_cfg, crop_rounding="floor")

    def score_pixels(pixels: torch.Tensor, prompts: PromptsLike) -> torch.Tensor:
        """``100 * max(cos, 0)`` of already preprocessed pixels."""
        enc = tokenize(tok, as_prompt_list(prompts, pixels.shape[0]), context)
        img = normalize(clip_image_embeds(model, pixels.to(device, dtype)).float())
        txt = normalize(
            clip_text_embeds(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device)
            ).float()
        )
        return (100.0 * (img * txt).sum(-1)).clamp(min=0.0)

    @torch.inference_mode()
    def score(images: ImagesLike, prompts: PromptsLike) -> torch.Tensor:
        pils = as_pil_list(images, convert_rgb=False)  # preprocess converts
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
