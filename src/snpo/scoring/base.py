"""Shared plumbing for the scorers: the error type, input coercion, path resolution, loading.

Every scorer is built by a factory ``make_<name>(path_or_id, *, device, dtype, batch_size, ...)``
that returns ``fn(images, prompts) -> torch.Tensor`` of shape ``(B,)``, float32, on the CPU.

Weights are never downloaded: a path is either a local file/folder or a Hugging Face hub id that
is already in the local HF cache (looked up with ``local_files_only=True``).  Anything else stops
with :class:`ScorerWeightsMissing`, whose message is one line naming what to download and which
argument/flag to point at it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image

from snpo.errors import ConfigError, UserError
from snpo.files import is_hub_id

ImagesLike: TypeAlias = Sequence[Image.Image] | torch.Tensor
PromptsLike: TypeAlias = Sequence[str] | str | None
Scorer: TypeAlias = Callable[..., torch.Tensor]


class ScorerWeightsMissing(UserError):
    """Weights (or tokenizer/processor files) of a scorer could not be found locally.

    The message is a single line: what was looked for, where, what to download and which
    argument/flag to point at it.
    """


def missing(
    what: str, path: object, download: str, flag: str, reason: str = ""
) -> ScorerWeightsMissing:
    """Build the one-line :class:`ScorerWeightsMissing` used by every scorer."""
    why = f" ({_one_line(reason)})" if reason else ""
    return ScorerWeightsMissing(
        f"{what} not found at {str(path)!r}{why}: download {download} and pass {flag} PATH"
    )


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cached_hub_file(repo: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` of hub repo ``repo`` already in the local HF cache, else None.

    Never downloads; a malformed id counts as not cached.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    for name in filenames:
        try:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
        except Exception:  # HFValidationError for malformed ids etc.
            hit = None
        if isinstance(hit, str):
            return Path(hit)
    return None


def resolve_dir(path_or_id: str | Path | None, *, what: str, download: str, flag: str) -> Path:
    """Return a local folder for ``path_or_id``: the folder itself, or the cached hub snapshot.

    Never touches the network: a hub id is only resolved from the local HF cache.
    """
    if path_or_id is None or str(path_or_id) == "":
        raise missing(what, path_or_id, download, flag, "no path given")
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise missing(what, path_or_id, download, flag, "expected a folder, got a file")
    if is_hub_id(path_or_id):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id=str(path_or_id), local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError, offline errors, bad ids ...
            raise missing(
                what, path_or_id, download, flag, "not in the local Hugging Face cache"
            ) from err
    raise missing(what, path_or_id, download, flag, "no such file or folder")


def resolve_file(
    path_or_id: str | Path | None,
    *,
    filenames: Sequence[str],
    what: str,
    download: str,
    flag: str,
) -> Path:
    """Return a local file: ``path`` itself, ``path/<one of filenames>``, or the cached hub file."""
    if path_or_id is None or str(path_or_id) == "":
        raise missing(what, path_or_id, download, flag, "no path given")
    p = Path(path_or_id).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for name in filenames:
            if (p / name).is_file():
                return p / name
        raise missing(what, path_or_id, download, flag, f"folder has none of {list(filenames)}")
    if is_hub_id(path_or_id):
        hit = cached_hub_file(str(path_or_id), filenames)
        if hit is not None:
            return hit
        raise missing(what, path_or_id, download, flag, "not in the local Hugging Face cache")
    raise missing(what, path_or_id, download, flag, "no such file or folder")


def load_tensor_file(path: Path, *, what: str) -> dict[str, Any]:
    """Load a checkpoint without executing arbitrary pickled code.

    ``.safetensors`` is read with safetensors; anything else goes through
    ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain containers and
    refuses any other pickled object (the classic code-execution hole of ``.pt``/``.pth`` files).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for non-tensor objects, corrupt files, ...
        raise UserError(
            f"{what}: refusing to load {str(path)!r} with weights_only=True "
            f"({_one_line(str(err), 160)}); convert it to .safetensors or a plain tensor state dict"
        ) from err
    if not isinstance(obj, dict):
        raise UserError(
            f"{what}: {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors"
        )
    return obj


def as_pil_list(images: ImagesLike, *, convert_rgb: bool = True) -> list[Image.Image]:
    """Coerce the scorer input to a list of PIL images, RGB unless ``convert_rgb=False``.

    ``convert_rgb=False`` keeps PIL images in their own mode (RGBA, LA, P, L, I;16, ...) for the
    pipelines that resize before converting (openai-CLIP's and ImageReward's); ``convert("RGB")``
    is PIL's: alpha is dropped, not composited, and 16-bit values are clipped at 255.  A float
    tensor ``(B, 3, H, W)`` in ``[0, 1]`` is quantised exactly as diffusers saves images
    (``round(x * 255)`` to uint8), so scoring a tensor gives the same number as scoring the PNG
    written from it -- which is what the reference implementations see.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError("image tensor must be float in [0, 1]")
        arr = (
            (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255)
            .round()
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .numpy()
        )
        return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr]
    if isinstance(images, Image.Image):
        images = [images]
    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"expected PIL images or a (B,3,H,W) tensor, got {type(im).__name__}")
        out.append(im.convert("RGB") if convert_rgb else im)
    return out


def as_prompt_list(prompts: PromptsLike, n: int) -> list[str]:
    """One prompt per image; a single string is broadcast to all images."""
    if prompts is None:
        raise ValueError("this scorer needs one prompt per image")
    if isinstance(prompts, str):
        return [prompts] * n
    out = [str(p) for p in prompts]
    if len(out) != n:
        raise ValueError(f"got {n} images but {len(out)} prompts")
    return out


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of ``batch_size``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last dim (the reference code divides by ``x.norm(dim=-1)``)."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


def load_clip_model(folder: Path, *, what: str, download: str, flag: str) -> Any:
    """``CLIPModel.from_pretrained(folder)`` with local files only and remote code off."""
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as err:
        raise missing(what, folder, download, flag, str(err)) from err
    return model.eval()


def load_clip_tokenizer(folder: Path, *, what: str, download: str, flag: str) -> Any:
    """The CLIP BPE tokenizer from ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``).

    The fast (``tokenizers``) one, as ``AutoProcessor``/``CLIPProcessor`` load it for PickScore and
    torchmetrics' CLIP score: in transformers 4 the slow ``CLIPTokenizer`` cleans text differently
    (``ftfy`` when installed, else BERT's basic tokenizer); in transformers 5 both names are one
    class.  HPSv2 uses open_clip's own tokenizer instead, see :mod:`.open_clip_tokenizer`.
    """
    try:
        from transformers import CLIPTokenizerFast as CLIPTokenizer
    except ImportError:  # pragma: no cover - builds of transformers without tokenizers
        from transformers import CLIPTokenizer

    has_files = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    if not has_files:
        raise missing(what, folder, download, flag, "no tokenizer.json or vocab.json + merges.txt")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise missing(what, folder, download, flag, str(err)) from err


def tokenize(tokenizer: Any, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """CLIP tokenisation: lower-cased BPE, ``<|startoftext|> ... <|endoftext|>``, cut at ``max_length``.

    Padding to ``max_length`` (as open_clip does) changes nothing for the pooled feature: the
    text transformer is causal and pools at the first end-of-text token.
    """
    enc = tokenizer(
        prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def clip_image_embeds(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embedding (= ``CLIPModel.get_image_features``), version independent.

    transformers v5 returns a ModelOutput from ``get_image_features`` while v4 returns a tensor,
    so we call the sub-modules directly: CLS token -> post-LayerNorm -> visual projection.
    """
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return model.visual_projection(pooled)


def clip_text_embeds(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Projected text embedding (= ``CLIPModel.get_text_features``): EOT token -> projection."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


def model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype
