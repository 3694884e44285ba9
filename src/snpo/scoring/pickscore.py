"""PickScore (Kirstain et al., 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    PickScore(image, prompt) = exp(logit_scale) * cos(E_txt(prompt), E_img(image))

exactly the reference snippet (``model.logit_scale.exp() * text_embs @ image_embs.T`` of unit
vectors); ``exp(logit_scale)`` is ~100, real images land around 20-22.

Weights: ``yuvalkirstain/PickScore_v1`` (a transformers ``CLIPModel``).  The reference pairs it
with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (tokenizer + image processor),
which the model repo does not ship; pass it as ``processor`` unless the model folder also holds
the tokenizer files and ``preprocessor_config.json``.
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

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLAG = "--pickscore"
PROCESSOR_FLAG = "--pickscore-processor"
_DOWNLOAD = f"{MODEL_ID} and {PROCESSOR_ID} (processor)"


def _has_processor_files(folder: Path) -> bool:
    tok = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    return tok and (folder / "preprocessor_config.json").is_file()


def make_pickscore(
    path_or_id: str | Path | None = MODEL_ID,
    *,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> Scorer:
    """Build the PickScore scorer ``fn(images, prompts) -> (B,) float32``.

    Args:
        path_or_id: PickScore model folder (``config.json`` + weights) or cached hub id.
        processor: folder / cached hub id with the CLIP tokenizer and ``preprocessor_config.json``.
            ``None``: the model folder if it holds them, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
            from the local HF cache.
    """
    model_dir = resolve_dir(path_or_id, what="PickScore weights", download=_DOWNLOAD, flag=FLAG)
    if processor is None:
        processor = model_dir if _has_processor_files(model_dir) else PROCESSOR_ID
    proc_dir = resolve_dir(
        processor,
        what="PickScore processor",
        download=f"{PROCESSOR_ID} (processor)",
        flag=PROCESSOR_FLAG,
    )
    tok = load_clip_tokenizer(
        proc_dir,
        what="PickScore processor",
        download=f"{PROCESSOR_ID} (processor)",
        flag=PROCESSOR_FLAG,
    )
    model = load_clip_model(model_dir, what="PickScore weights", download=_DOWNLOAD, flag=FLAG)
    model = model.to(device=device, dtype=dtype)
    image_cfg = ClipImageConfig.from_folder(
        proc_dir, default_size=model.config.vision_config.image_size
    )
    context = int(model.config.text_config.max_position_embeddings)

    def preprocess(images: ImagesLike) -> torch.Tensor:
        """Normalised pixels as transformers' ``CLIPImageProcessor`` makes them (RGB first,
        floor-split crop margins); RGB is PIL's ``convert("RGB")``, transformers 4's
        ``convert_to_rgb`` (transformers 5 composites transparent images onto white instead)."""
        return clip_preprocess(as_pil_list(images), image_cfg, crop_rounding="floor")

    def score_pixels(pixels: torch.Tensor, prompts: PromptsLike) -> torch.Tensor:
        """``exp(logit_scale) * cos`` of already preprocessed pixels (differentiable outside
        inference mode)."""
        enc = tokenize(tok, as_prompt_list(prompts, pixels.shape[0]), context)
        img = normalize(clip_image_embeds(model, pixels.to(device, dtype)).float())
        txt = normalize(
            clip_text_embeds(
                model, enc["input_ids"].to(device), enc["attention_mask"].to(device)
            ).float()
        )
        return model.logit_scale.float().exp() * (txt * img).sum(-1)

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
