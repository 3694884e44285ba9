"""The ImageReward network (Xu et al., 2023): BLIP ViT + BLIP "MED" BERT + a 5-Linear reward head.

A re-implementation, from the checkpoint alone, of what the reference (THUDM/ImageReward,
``ImageReward/ImageReward.py`` and ``ImageReward/models/BLIP/{blip,blip_pretrain,med}.py``,
BLIP's ``models/vit.py``) computes; the module tree mirrors it, so ``ImageReward.pt`` keys load
one to one (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.{0,2,4,6,7}.*``).
Loading, tokenisation and image preprocessing live in :mod:`snpo.scoring.image_reward`.

* ViT (timm layout, pre-norm blocks, LayerNorm eps 1e-6, exact GELU, qkv bias, head dim 64 ->
  16 heads for ViT-L), final LayerNorm; *all* its tokens (CLS + patches) are the cross-attention
  keys/values, with an all-ones image attention mask;
* MED BERT layer (``mode="multimodal"``): post-LN self-attention with the padding mask added as
  ``(1 - mask) * -10000``, post-LN cross-attention (key/value ``Linear(encoder_width, hidden)``),
  post-LN feed-forward; embeddings are word + absolute position (no token-type embedding) ->
  LayerNorm (eps from ``med_config.json``, 1e-12);
* reward: ``last_hidden_state[:, 0, :].float()`` -> ``Linear(768,1024), Dropout, Linear(1024,128),
  Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1)`` (the ReLUs are commented out in
  the reference, so the head is affine) -> ``(r - 0.16717362830052426) / 1.0333394966054072``.

All sizes come from tensor shapes (widths, depths, vocabulary, positions, image and patch size,
MLP widths) and ``med_config.json`` (text heads, LayerNorm eps, activation). The ViT head count
is not in any shape; it follows BLIP's head dimension of 64 (``width // 64``). Without a
``med_config.json`` the text encoder uses BLIP's values (eps 1e-12, GELU, ``hidden // 64`` heads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from snpo.errors import UserError

__all__ = [
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "ImageRewardConfig",
    "ImageRewardModel",
]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
_VIT_HEAD_DIM = 64  # BLIP ViT-B/16 (768/12) and ViT-L/16 (1024/16)
_MASK_VALUE = -10000.0  # additive padding mask of the reference BERT


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
                raise UserError(f"ImageReward checkpoint lacks {key!r}; is it ImageReward.pt?")
            return tuple(sd[key].shape)

        def count(prefix: str) -> int:
            pat = re.compile(re.escape(prefix) + r"(\d+)\.")
            idx = {int(m.group(1)) for k in sd if (m := pat.match(k))}
            if idx != set(range(len(idx))):
                raise UserError(f"ImageReward checkpoint: non-contiguous layers under {prefix}")
            return len(idx)

        v, t = "blip.visual_encoder.", "blip.text_encoder."
        width, _, patch, patch_w = shape(v + "patch_embed.proj.weight")
        if patch != patch_w:
            raise UserError("ImageReward checkpoint: non-square patches are not supported")
        n_pos = shape(v + "pos_embed")[1] - 1
        grid = math.isqrt(n_pos)
        if grid * grid != n_pos:
            raise UserError(f"ImageReward checkpoint: {n_pos} patch positions is not a square")
        vision_layers = count(v + "blocks.")
        if width >= _VIT_HEAD_DIM and width % _VIT_HEAD_DIM:  # BLIP heads are 64 wide
            raise UserError(f"ImageReward checkpoint: ViT width {width} is not a multiple of 64")
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
                raise UserError(
                    f"med_config.json {name}={med[name]} but the checkpoint has {got}; "
                    "use the med_config.json that ships with THUDM/ImageReward"
                )
        if med.get("position_embedding_type", "absolute") != "absolute":
            raise UserError("med_config.json: only absolute position embeddings are supported")
        if not med.get("add_cross_attention", True):
            raise UserError("med_config.json: ImageReward needs add_cross_attention=true")
        text_heads = int(med.get("num_attention_heads", max(1, hidden // 64)))
        if hidden % text_heads:
            raise UserError(f"text width {hidden} is not divisible by {text_heads} heads")
        act = str(med.get("hidden_act", "gelu"))
        if act not in _ACTIVATIONS:
            raise UserError(f"med_config.json hidden_act={act!r} is not supported")

        pat = re.compile(r"^mlp\.layers\.(\d+)\.weight$")
        indices = tuple(sorted(int(m.group(1)) for k in sd if (m := pat.match(k))))
        if not indices:
            raise UserError("ImageReward checkpoint lacks the reward head (mlp.layers.*)")
        dims = tuple(
            (shape(f"mlp.layers.{i}.weight")[1], shape(f"mlp.layers.{i}.weight")[0])
            for i in indices
        )
        if dims[0][0] != hidden or dims[-1][1] != 1:
            raise UserError(f"ImageReward reward head has shape {dims}; expected {hidden} -> 1")
        for (_, a), (b, _) in zip(dims[:-1], dims[1:]):
            if a != b:
                raise UserError(f"ImageReward reward head widths do not chain: {dims}")
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
