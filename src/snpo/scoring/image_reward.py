"""ImageReward (Xu et al., 2023) as a self-contained scorer.

The 2023 ``image-reward`` package does not run on transformers 5 (nor without torchvision), so
this module re-implements the model from the checkpoint alone: a BLIP ViT image encoder, a BLIP
"MED" BERT text encoder whose every layer cross-attends to all image tokens, and a 5-Linear head.

What the reference implementation (THUDM/ImageReward, ``ImageReward/ImageReward.py`` and
``ImageReward/models/BLIP/{blip,blip_pretrain,med}.py``, BLIP's ``models/vit.py``) does, and
what this file reproduces:

* image: ``Resize(224, BICUBIC)`` on the short side, ``CenterCrop(224)``, then ``convert("RGB")``
  (after the resize, as in the reference), ``ToTensor()``, ``Normalize`` with the CLIP mean/std;
* ViT (timm layout, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, qkv bias, head dim 64 ->
  16 heads for ViT-L), final LayerNorm; *all* its tokens (CLS + patches) are the cross-attention
  keys/values, with an all-ones image attention mask;
* text: ``bert-base-uncased`` + ``[DEC]`` (bos) and ``[ENC]`` added as special tokens (ids 30522,
  30523; hence ``vocab_size`` 30524), ``padding="max_length", truncation=True, max_length=35``.
  The ids are fed as tokenised, i.e. the first token stays ``[CLS]``: ``ImageReward.score`` /
  ``inference_rank`` (and the training ``encode_data``) do **not** substitute
  ``tokenizer.enc_token_id`` (BLIP's ITM head does; ImageReward does not);
* MED BERT layer (``mode="multimodal"``): post-LN self-attention with the padding mask added as
  ``(1 - mask) * -10000``, post-LN cross-attention (key/value ``Linear(encoder_width, hidden)``),
  post-LN feed-forward; embeddings are word + absolute position (no token-type embedding) ->
  LayerNorm (eps from ``med_config.json``, 1e-12);
* reward: ``last_hidden_state[:, 0, :].float()`` -> ``Linear(768,1024), Dropout, Linear(1024,128),
  Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1)`` (the ReLUs are commented out in
  the reference, so the head is affine) -> ``(r - 0.16717362830052426) / 1.0333394966054072``.

Checkpoint key mapping: the module tree below mirrors the reference, so ``ImageReward.pt`` keys
load one to one (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.{0,2,4,6,7}.*``).
A ``module.`` prefix is stripped, a missing ``blip.`` prefix is added, a ``{"state_dict": ...}`` /
``{"model": ...}`` wrapper is opened, and ``blip.vision_proj``/``blip.text_proj``/``itm_head``
(unused by the reward) and the ``embeddings.position_ids`` buffer are ignored. Any other key
under the encoders or head that the re-implementation would not use is an error, so a checkpoint
variant with extra machinery can not be silently mis-scored.

All sizes come from tensor shapes (widths, depths, vocabulary, positions, image and patch size,
MLP widths) and ``med_config.json`` (text heads, LayerNorm eps, activation). The ViT head count
is not in any shape; it follows BLIP's head dimension of 64 (``width // 64``). Without a
``med_config.json`` the text encoder uses BLIP's values (eps 1e-12, GELU, ``hidden // 64`` heads).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from snpo.scoring.base import ScorerWeightsMissing

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

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35
_VIT_HEAD_DIM = 64  # BLIP ViT-B/16 (768/12) and ViT-L/16 (1024/16)
_MASK_VALUE = -10000.0  # additive padding mask of the reference BERT

_CKPT_NAMES = ("ImageReward.pt", "ImageReward.pth", "ImageReward.safetensors", "model.safetensors")
_WEIGHTS_HINT = (
    "download `ImageReward.pt` (and `med_config.json`) from the Hugging Face repo "
    "THUDM/ImageReward and pass the file or its folder as --image-reward PATH "
    "(make_image_reward(path=...))"
)
_TOKENIZER_HINT = (
    "download the `bert-base-uncased` tokenizer (vocab.txt, tokenizer_config.json) and pass its "
    "folder as --image-reward-tokenizer PATH (make_image_reward(tokenizer_path=...))"
)
# Keys of ImageReward.pt that the reward does not use.
_IGNORED = re.compile(
    r"^blip\.(vision_proj|text_proj|itm_head)\.|^blip\.text_encoder\.embeddings\.position_ids$"
)
_USED_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")


# --------------------------------------------------------------------------------------------
# configuration read from the checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRewardConfig:
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    max_positions: int
    text_eps: float
    text_act: str
    mlp_indices: tuple[int, ...]
    mlp_dims: tuple[tuple[int, int], ...]
    vision_eps: float = 1e-6

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, torch.Tensor], med_config: Mapping | None = None
    ) -> ImageRewardConfig:
        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise ValueError(f"ImageReward checkpoint lacks {key!r}; is it ImageReward.pt?")
            return tuple(sd[key].shape)

        def count(prefix: str) -> int:
            pat = re.compile(re.escape(prefix) + r"(\d+)\.")
            idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
            if idx != set(range(len(idx))):
                raise ValueError(f"ImageReward checkpoint: non-contiguous layers under {prefix}")
            return len(idx)

        v, t = "blip.visual_encoder.", "blip.text_encoder."
        width, _, patch, patch_w = shape(v + "patch_embed.proj.weight")
        if patch != patch_w:
            raise ValueError("ImageReward checkpoint: non-square patches are not supported")
        n_pos = shape(v + "pos_embed")[1] - 1
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise ValueError(f"ImageReward checkpoint: {n_pos} patch positions is not a square")
        vision_layers = count(v + "blocks.")
        if width >= _VIT_HEAD_DIM and width % _VIT_HEAD_DIM:  # BLIP heads are 64 wide
            raise ValueError(f"ImageReward checkpoint: ViT width {width} is not a multiple of 64")
        vocab, hidden = shape(t + "embeddings.word_embeddings.weight")
        text_layers = count(t + "encoder.layer.")
        inter = shape(t + "encoder.layer.0.intermediate.dense.weight")[0]
        max_pos = shape(t + "embeddings.position_embeddings.weight")[0]

        med = dict(med_config or {})
        for name, got in (
            ("hidden_size", hidden),
            ("num_hidden_layers", text_layers),
            ("intermediate_size", inter),
            ("vocab_size", vocab),
            ("max_position_embeddings", max_pos),
        ):
            if name in med and int(med[name]) != got:
                raise ValueError(
                    f"med_config.json {name}={med[name]} but the checkpoint has {got}; "
                    "use the med_config.json that ships with THUDM/ImageReward"
                )
        if med.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("med_config.json: only absolute position embeddings are supported")
        if not med.get("add_cross_attention", True):
            raise ValueError("med_config.json: ImageReward needs add_cross_attention=true")
        text_heads = int(med.get("num_attention_heads", max(1, hidden // 64)))
        if hidden % text_heads:
            raise ValueError(f"text width {hidden} is not divisible by {text_heads} heads")
        act = str(med.get("hidden_act", "gelu"))
        if act not in _ACTIVATIONS:
            raise ValueError(f"med_config.json hidden_act={act!r} is not supported")

        pat = re.compile(r"^mlp\.layers\.(\d+)\.weight$")
        indices = tuple(sorted(int(m.group(1)) for k in sd if (m := pat.match(k))))
        if not indices:
            raise ValueError("ImageReward checkpoint lacks the reward head (mlp.layers.*)")
        dims = tuple(
            (shape(f"mlp.layers.{i}.weight")[1], shape(f"mlp.layers.{i}.weight")[0])
            for i in indices
        )
        if dims[0][0] != hidden or dims[-1][1] != 1:
            raise ValueError(f"ImageReward reward head has shape {dims}; expected {hidden} -> 1")
        for (_, a), (b, _) in zip(dims[:-1], dims[1:]):
            if a != b:
                raise ValueError(f"ImageReward reward head widths do not chain: {dims}")
        return cls(
            image_size=grid * patch,
            patch_size=patch,
            vision_width=width,
            vision_layers=vision_layers,
            vision_heads=max(1, width // _VIT_HEAD_DIM),
            vision_mlp=shape(v + "blocks.0.mlp.fc1.weight")[0],
            vocab_size=vocab,
            text_width=hidden,
            text_layers=text_layers,
            text_heads=text_heads,
            text_intermediate=inter,
            max_positions=max_pos,
            text_eps=float(med.get("layer_norm_eps", 1e-12)),
            text_act=act,
            mlp_indices=indices,
            mlp_dims=dims,
        )


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------
# BLIP ViT (module names = timm / BLIP models/vit.py)
# --------------------------------------------------------------------------------------------


def _attend(q, k, v, heads: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head softmax attention; q (B,Lq,D), k/v (B,Lk,D), additive mask (B,1,1,Lk)."""
    b, lq, d = q.shape
    lk = k.shape[1]
    q = q.view(b, lq, heads, d // heads).transpose(1, 2)
    k = k.view(b, lk, heads, d // heads).transpose(1, 2)
    v = v.view(b, lk, heads, d // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, d)


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class _VitAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class _VitMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _VitBlock(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        w = cfg.vision_width
        self.norm1 = nn.LayerNorm(w, eps=cfg.vision_eps)
        self.attn = _VitAttention(w, cfg.vision_heads)
        self.norm2 = nn.LayerNorm(w, eps=cfg.vision_eps)
        self.mlp = _VitMlp(w, cfg.vision_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _VisionTransformer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        w = cfg.vision_width
        n_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.patch_embed = _PatchEmbed(cfg.patch_size, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, w))
        self.blocks = nn.ModuleList(_VitBlock(cfg) for _ in range(cfg.vision_layers))
        self.norm = nn.LayerNorm(w, eps=cfg.vision_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------------------------
# BLIP MED BERT encoder with cross-attention (module names = models/BLIP/med.py)
# --------------------------------------------------------------------------------------------


class _Embeddings(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _SelfAttention(nn.Module):  # "attention.self" / "crossattention.self"
    def __init__(self, width: int, kv_width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def forward(self, x, kv, mask):
        return _attend(self.query(x), self.key(kv), self.value(kv), self.heads, mask)


class _DenseLN(nn.Module):  # "attention.output" and "output": dense -> +residual -> LayerNorm
    def __init__(self, d_in: int, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = _SelfAttention(cfg.text_width, kv_width, cfg.text_heads)
        self.output = _DenseLN(cfg.text_width, cfg.text_width, cfg.text_eps)

    def forward(self, x, kv, mask):
        return self.output(self.self(x, kv, mask), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate)
        self.act = _ACTIVATIONS[cfg.text_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.attention = _Attention(cfg, cfg.text_width)
        self.crossattention = _Attention(cfg, cfg.vision_width)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseLN(cfg.text_intermediate, cfg.text_width, cfg.text_eps)

    def forward(self, x, mask, image_embeds):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image_embeds, None)  # image mask is all ones -> no mask
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg.text_layers))


class _TextEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(self, ids, attention_mask, image_embeds) -> torch.Tensor:
        x = self.embeddings(ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * _MASK_VALUE
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = _VisionTransformer(cfg)
        self.text_encoder = _TextEncoder(cfg)


class _RewardHead(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        mods: list[nn.Module] = [nn.Identity() for _ in range(cfg.mlp_indices[-1] + 1)]
        for i, (d_in, d_out) in zip(cfg.mlp_indices, cfg.mlp_dims):
            mods[i] = nn.Linear(d_in, d_out)  # the Dropouts between are identities at eval
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """ImageReward with the state-dict layout of ``ImageReward.pt``.

    ``forward(pixels, input_ids, attention_mask)`` takes normalised pixels (B,3,S,S) and returns
    the normalised reward (B,) in float32; ``raw_reward`` returns the head output before
    ``(r - mean) / std``. The reward head always runs in float32 (the reference casts the
    [CLS] feature with ``.float()``), whatever dtype the encoders are in.
    """

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.config = cfg
        self.blip = _Blip(cfg)
        self.mlp = _RewardHead(cfg)
        self.mean = IMAGE_REWARD_MEAN
        self.std = IMAGE_REWARD_STD

    def raw_reward(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        enc_dtype = self.blip.visual_encoder.pos_embed.dtype
        head_dtype = self.mlp.layers[self.config.mlp_indices[0]].weight.dtype
        image_embeds = self.blip.visual_encoder(pixels.to(enc_dtype))
        hidden = self.blip.text_encoder(input_ids, attention_mask, image_embeds)
        return self.mlp(hidden[:, 0, :].float().to(head_dtype)).squeeze(-1).float()

    def forward(self, pixels, input_ids, attention_mask) -> torch.Tensor:
        return (self.raw_reward(pixels, input_ids, attention_mask) - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _cached_hub_file(repo: str, names: Sequence[str]) -> Path | None:
    """A file of hub repo ``repo`` already in the local Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in names:
        try:
            hit = try_to_load_from_cache(repo_id=repo, filename=name)
        except Exception:  # malformed id etc.: treat as not cached
            hit = None
        if isinstance(hit, str):
            return Path(hit)
    return None


def _resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, med_config.json or None) from a file, a folder or a cached hub id."""
    p = Path(path).expanduser()
    if p.is_dir():
        ckpt = next((p / n for n in _CKPT_NAMES if (p / n).is_file()), None)
        if ckpt is None:
            raise ScorerWeightsMissing(f"no ImageReward checkpoint in {str(p)!r}: {_WEIGHTS_HINT}")
    elif p.is_file():
        ckpt = p
    elif _HUB_ID.match(str(path)) and (hit := _cached_hub_file(str(path), _CKPT_NAMES)):
        ckpt = hit
    else:
        raise ScorerWeightsMissing(f"ImageReward weights not found at {str(p)!r}: {_WEIGHTS_HINT}")
    med = ckpt.parent / "med_config.json"
    return ckpt, (med if med.is_file() else None)


def load_image_reward_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an ImageReward checkpoint (``.pt`` via ``weights_only=True``, or safetensors),
    with the key normalisation described in the module docstring."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path), device="cpu")
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"refusing to load {str(path)!r}: it pickles objects other than tensors and "
                f"containers (torch.load weights_only=True: {first})"
            ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{str(path)!r} does not hold a state dict (got {type(raw).__name__})")
    sd: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = str(key).removeprefix("module.")
        if k.startswith(("visual_encoder.", "text_encoder.")):
            k = "blip." + k
        if _IGNORED.search(k) or not k.startswith(_USED_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r}: {key!r} is a {type(value).__name__}, not a tensor")
        sd[k] = value
    return sd


def _build_model(sd: dict[str, torch.Tensor], med_config: Mapping | None) -> ImageRewardModel:
    cfg = ImageRewardConfig.from_state_dict(sd, med_config)
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            "ImageReward checkpoint does not match the re-implemented architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(sd, strict=True, assign=True)
    return model.float().eval().requires_grad_(False)


def _load_tokenizer(tokenizer_path: str | Path | None, ckpt: Path, vocab_size: int):
    if tokenizer_path is None:
        base = ckpt.parent
        cands = [base / "tokenizer", base / "bert-base-uncased", base]
        hub = "bert-base-uncased"
    else:
        cands = [Path(tokenizer_path).expanduser()]
        hub = str(tokenizer_path) if _HUB_ID.match(str(tokenizer_path)) else None
    if hub is not None and (hit := _cached_hub_file(hub, ("vocab.txt",))):
        cands.append(hit.parent)  # the cached snapshot folder
    folder = next(
        (c for c in cands if (c / "vocab.txt").is_file() or (c / "tokenizer.json").is_file()),
        None,
    )
    if folder is None:
        where = (
            f"at {str(cands[0])!r}"
            if tokenizer_path is not None
            else "next to the checkpoint nor in the local HF cache"
        )
        raise ScorerWeightsMissing(f"no bert-base-uncased tokenizer {where}: {_TOKENIZER_HINT}")
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    # as BLIP's init_tokenizer(): the checkpoint's vocabulary has these two rows appended
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) > vocab_size:
        raise ValueError(
            f"tokenizer at {str(folder)!r} has {len(tok)} tokens but the checkpoint only "
            f"{vocab_size} embeddings; use bert-base-uncased"
        )
    return tok


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def _resized_hw(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output (short side -> size, long side truncated)."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision ``CenterCrop(size)`` top/left."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def preprocess_pil(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Reference preprocessing of PIL images -> (B,3,size,size) float32, normalised."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected PIL images, got {type(img).__name__}")
        nh, nw = _resized_hw(img.height, img.width, size)
        if (nh, nw) != (img.height, img.width):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = _crop_box(nh, nw, size)
        img = img.crop((left, top, left + size, top + size)).convert("RGB")
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        out.append((arr.float() / 255.0 - mean) / std)
    return torch.stack(out)


def _tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) float in [0,1] -> RGB PIL images, quantised as a saved PNG (round(x * 255))."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image tensor must be (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError("image tensor must be float in [0, 1]")
    arr = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in arr.permute(0, 2, 3, 1)]


def preprocess_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B,C,H,W) in [0,1] -> (B,3,size,size) normalised, differentiably.

    torchvision's tensor semantics: bicubic with antialias, no uint8 rounding; this follows
    the PIL path to within PIL's 8-bit quantisation when a resize is needed, exactly otherwise.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    nh, nw = _resized_hw(h, w, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = _crop_box(nh, nw, size)
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# public factory
# --------------------------------------------------------------------------------------------


def make_image_reward(
    path: str | Path | None = "THUDM/ImageReward",
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
        raise ValueError("batch_size must be >= 1")
    ckpt, med_path = _resolve("THUDM/ImageReward" if path is None else path)
    med = json.loads(med_path.read_text()) if med_path is not None else None
    model = _build_model(load_image_reward_state_dict(ckpt), med)
    cfg = model.config
    tokenizer = _load_tokenizer(tokenizer_path, ckpt, cfg.vocab_size)
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

    def preprocess(images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = _tensor_to_pil(images)
        elif isinstance(images, Image.Image):
            images = [images]
        return preprocess_pil(list(images), cfg.image_size)

    def score_pixels(pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        ids, mask = tokenize(prompts)
        return model(pixels.to(device=dev, dtype=dtype), ids.to(dev), mask.to(dev))

    def score(images, prompts) -> torch.Tensor:
        if isinstance(images, Image.Image):
            images = [images]
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for i in range(0, n, batch_size):
                pixels = preprocess(images[i : i + batch_size])
                out.append(score_pixels(pixels, prompts[i : i + batch_size]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    score.model = model  # type: ignore[attr-defined]
    score.tokenizer = tokenizer  # type: ignore[attr-defined]
    score.config = cfg  # type: ignore[attr-defined]
    score.tokenize = tokenize  # type: ignore[attr-defined]
    score.preprocess = preprocess  # type: ignore[attr-defined]
    score.score_pixels = score_pixels  # type: ignore[attr-defined]
    return score
