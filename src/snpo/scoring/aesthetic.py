"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann et al.).

An MLP on the L2-normalised CLIP ViT-L/14 image embedding; the prompt is ignored:

    aesthetic(image) = MLP(e / ||e||),   e = E_img^{CLIP ViT-L/14}(image)
    MLP = Linear(768,1024) Drop Linear(1024,128) Drop Linear(128,64) Drop Linear(64,16) Linear(16,1)

(no non-linearities -- that is the published model).  Outputs are on a ~1-10 scale.

Weights: the MLP file ``sac+logos+ava1-l14-linearMSE.pth`` (state-dict keys ``layers.{0,2,4,6,7}``;
loaded with ``weights_only=True``) or a ``.safetensors`` copy of it, plus the CLIP model
``openai/clip-vit-large-patch14`` in transformers format.  The reference embeds with openai-CLIP's
``preprocess`` (``clip.load``): torchvision ``Resize(224, bicubic)`` and ``CenterCrop`` (round-split
crop margins) on the PIL image in its own mode, *then* ``convert("RGB")``, ``ToTensor``,
``Normalize`` -- so RGBA/LA images are resized with premultiplied alpha, palette images with
NEAREST and 16-bit images at full depth before the conversion clips them, as here
(:func:`snpo.scoring.preprocess.clip_preprocess` with ``convert_rgb="after"``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from snpo.errors import UserError

from .base import (
    ImagesLike,
    PromptsLike,
    Scorer,
    as_pil_list,
    batches,
    clip_image_embeds,
    load_clip_model,
    load_tensor_file,
    normalize,
    resolve_dir,
    resolve_file,
)
from .preprocess import ClipImageConfig, clip_preprocess

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
MLP_FILES = [MLP_FILE, "sac+logos+ava1-l14-linearMSE.safetensors"]
MLP_SOURCE = f"{MLP_FILE} (github.com/christophschuhmann/improved-aesthetic-predictor)"
CLIP_ID = "openai/clip-vit-large-patch14"
FLAG = "--aesthetic"
CLIP_FLAG = "--aesthetic-clip"


class AestheticMLP(nn.Module):
    """The predictor head, with the reference's module layout so its state dict loads as is."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_mlp(path: Path) -> AestheticMLP:
    """Load the MLP head from ``.pth`` (weights_only) or ``.safetensors``; strict key check."""
    sd = load_tensor_file(path, what="aesthetic MLP")
    sd = sd.get("state_dict", sd)
    if "layers.0.weight" not in sd:
        raise UserError(
            f"aesthetic MLP {str(path)!r}: expected keys layers.{{0,2,4,6,7}}.weight/bias, "
            f"got {sorted(sd)[:6]}"
        )
    mlp = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
    mlp.load_state_dict(sd, strict=True)
    return mlp.eval()


def make_aesthetic(
    path_or_id: str | Path | None = None,
    *,
    clip: str | Path | None = CLIP_ID,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
) -> Scorer:
    """Build the aesthetic scorer ``fn(images, prompts=None) -> (B,) float32``.

    Args:
        path_or_id: the MLP file (``.pth``/``.safetensors``) or a folder holding
            ``sac+logos+ava1-l14-linearMSE.{pth,safetensors}``.
        clip: CLIP ViT-L/14 folder or cached hub id (transformers format).
    """
    mlp_path = resolve_file(
        path_or_id,
        filenames=MLP_FILES,
        what="aesthetic MLP weights",
        download=MLP_SOURCE,
        flag=FLAG,
    )
    mlp = load_aesthetic_mlp(mlp_path)
    clip_dir = resolve_dir(clip, what="aesthetic CLIP weights", download=CLIP_ID, flag=CLIP_FLAG)
    model = load_clip_model(
        clip_dir, what="aesthetic CLIP weights", download=CLIP_ID, flag=CLIP_FLAG
    )
    if model.config.projection_dim != mlp.layers[0].in_features:
        raise UserError(
            f"aesthetic MLP expects {mlp.layers[0].in_features}-d embeddings but the CLIP model at "
            f"{str(clip_dir)!r} gives {model.config.projection_dim}-d (it needs ViT-L/14)"
        )
    model = model.to(device=device, dtype=dtype)
    # The head stays float32 on the embedding's device: it is tiny and the reference runs it in fp32.
    mlp = mlp.to(device=device, dtype=torch.float32)
    image_cfg = ClipImageConfig.from_folder(
        clip_dir, default_size=model.config.vision_config.image_size
    )

    def preprocess(images: ImagesLike) -> torch.Tensor:
        """Normalised pixels as openai-CLIP's ``preprocess`` makes them (resize, crop, then RGB)."""
        pils = as_pil_list(images, convert_rgb=False)
        return clip_preprocess(pils, image_cfg, crop_rounding="round", convert_rgb="after")

    def score_pixels(pixels: torch.Tensor, prompts: PromptsLike = None) -> torch.Tensor:
        """The predictor on already preprocessed pixels (differentiable outside inference mode)."""
        del prompts  # the aesthetic predictor is prompt-free
        emb = normalize(clip_image_embeds(model, pixels.to(device, dtype)).float())
        return mlp(emb).squeeze(-1)

    @torch.inference_mode()
    def score(images: ImagesLike, prompts: PromptsLike = None) -> torch.Tensor:
        pils = as_pil_list(images, convert_rgb=False)
        out = [score_pixels(preprocess(pils[sl])).cpu() for sl in batches(len(pils), batch_size)]
        return torch.cat(out).float() if out else torch.zeros(0)

    score.model = model  # type: ignore[attr-defined]
    score.mlp = mlp  # type: ignore[attr-defined]
    score.preprocess = preprocess  # type: ignore[attr-defined]
    score.score_pixels = score_pixels  # type: ignore[attr-defined]
    return score
