"""Convert an open_clip ViT CLIP state dict (e.g. HPSv2's checkpoints) into a transformers ``CLIPModel``.

``open_clip_torch`` imports torchvision, which cannot be imported here, so we rebuild the same
network with transformers' CLIP classes.  The two implementations are the same maths:

* vision: ``conv1`` patchify (no bias) -> prepend ``class_embedding`` -> ``+ positional_embedding``
  -> ``ln_pre`` -> pre-LN residual blocks -> ``ln_post`` on the CLS token -> ``@ proj``;
* text: ``token_embedding + positional_embedding`` -> causal pre-LN residual blocks -> ``ln_final``
  -> token at ``argmax(input_ids)`` (the end-of-text id is the largest id) -> ``@ text_projection``;
* a residual block is ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with
  ``nn.MultiheadAttention`` (fused ``in_proj`` = [q; k; v]) and ``c_fc -> GELU -> c_proj``.

Key map (open_clip -> transformers), ``{t}`` = ``visual.`` / ``""`` and ``{m}`` = ``vision_model`` /
``text_model``::

    visual.conv1.weight                 vision_model.embeddings.patch_embedding.weight
    visual.class_embedding              vision_model.embeddings.class_embedding
    visual.positional_embedding         vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                     vision_model.pre_layrnorm.*
    visual.ln_post.*                    vision_model.post_layernorm.*
    visual.proj            (W x P)      visual_projection.weight (P x W, transposed)
    token_embedding.weight              text_model.embeddings.token_embedding.weight
    positional_embedding                text_model.embeddings.position_embedding.weight
    ln_final.*                          text_model.final_layer_norm.*
    text_projection        (W x P)      text_projection.weight   (P x W, transposed)
    logit_scale                         logit_scale
    {t}transformer.resblocks.{i}.ln_1.*            {m}.encoder.layers.{i}.layer_norm1.*
    {t}transformer.resblocks.{i}.attn.in_proj_*    {m}.encoder.layers.{i}.self_attn.{q,k,v}_proj.*
    {t}transformer.resblocks.{i}.attn.out_proj.*   {m}.encoder.layers.{i}.self_attn.out_proj.*
    {t}transformer.resblocks.{i}.ln_2.*            {m}.encoder.layers.{i}.layer_norm2.*
    {t}transformer.resblocks.{i}.mlp.c_fc.*        {m}.encoder.layers.{i}.mlp.fc1.*
    {t}transformer.resblocks.{i}.mlp.c_proj.*      {m}.encoder.layers.{i}.mlp.fc2.*

Head counts cannot be read from the tensors.  open_clip's configs use 64-wide heads everywhere
except the big vision towers (ViT-H-14: width 1280, ``head_width`` 80 -> 16 heads; ViT-g-14: 88;
ViT-bigG-14: 104), which :func:`default_heads` encodes; pass explicit counts for anything else.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch

# open_clip model_configs: vision ``head_width`` by tower width where it is not the default 64.
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_IGNORED_KEYS = {"attn_mask", "visual.attn_mask"}  # non-persistent buffers in some versions
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_PLAIN = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {
    "visual.proj": "visual_projection.weight",
    "text_projection": "text_projection.weight",
}


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that DDP-saved checkpoints carry."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def default_heads(width: int, tower: Literal["vision", "text"]) -> int:
    """Attention heads of an open_clip tower of this width (``width // head_width``)."""
    head_width = _VISION_HEAD_WIDTH.get(width, 64) if tower == "vision" else 64
    if width % head_width:
        raise ValueError(
            f"cannot infer the {tower} head count for width {width}; pass it explicitly"
        )
    return width // head_width


def _num_layers(sd: dict[str, Any], prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(
            f"open_clip state dict: bad or missing '{prefix}transformer.resblocks.*' keys"
        )
    return len(ids)


def clip_config_from_open_clip(
    state_dict: dict[str, Any],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    layer_norm_eps: float = 1e-5,
) -> Any:
    """A transformers ``CLIPConfig`` whose shapes are read off the open_clip tensors.

    ``hidden_act="gelu"`` (exact erf GELU, open_clip's ``nn.GELU``) is right for LAION-trained
    models such as ViT-H-14/HPSv2; OpenAI-trained weights use ``"quick_gelu"``.
    """
    from transformers import CLIPConfig

    sd = state_dict
    try:
        conv = sd["visual.conv1.weight"]
        v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
        n_pos = int(sd["visual.positional_embedding"].shape[0])
        grid = math.isqrt(n_pos - 1)
        if grid * grid != n_pos - 1:
            raise ValueError(f"visual.positional_embedding has {n_pos} rows, not 1 + a square")
        v_mlp = int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        v_proj = int(sd["visual.proj"].shape[1])
        vocab, t_width = (int(d) for d in sd["token_embedding.weight"].shape)
        ctx = int(sd["positional_embedding"].shape[0])
        t_mlp = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        t_proj = int(sd["text_projection"].shape[1])
        logit_scale = float(sd["logit_scale"].float())
    except KeyError as err:
        raise ValueError(f"not an open_clip ViT CLIP state dict: missing key {err}") from None
    if v_proj != t_proj:
        raise ValueError(f"visual.proj gives {v_proj} dims but text_projection gives {t_proj}")
    vision_heads = vision_heads or default_heads(v_width, "vision")
    text_heads = text_heads or default_heads(t_width, "text")
    return CLIPConfig(
        projection_dim=v_proj,
        logit_scale_init_value=logit_scale,
        vision_config={
            "hidden_size": v_width,
            "intermediate_size": v_mlp,
            "num_hidden_layers": _num_layers(sd, "visual."),
            "num_attention_heads": vision_heads,
            "image_size": grid * patch,
            "patch_size": patch,
            "num_channels": int(conv.shape[1]),
            "projection_dim": v_proj,
            "hidden_act": hidden_act,
            "layer_norm_eps": layer_norm_eps,
        },
        text_config={
            "vocab_size": vocab,
            "hidden_size": t_width,
            "intermediate_size": t_mlp,
            "num_hidden_layers": _num_layers(sd, ""),
            "num_attention_heads": text_heads,
            "max_position_embeddings": ctx,
            "projection_dim": t_proj,
            "hidden_act": hidden_act,
            "layer_norm_eps": layer_norm_eps,
            # open_clip pools at argmax(input_ids): with the CLIP BPE the end-of-text token is the
            # last (largest) id, and transformers pools at its first occurrence -- the same token.
            "eos_token_id": vocab - 1,
            "bos_token_id": vocab - 2,
            "pad_token_id": 0,  # open_clip pads with 0; padding never reaches the pooled token
        },
    )


def convert_open_clip_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename/split/transpose open_clip keys into transformers ``CLIPModel`` keys (see module doc)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _IGNORED_KEYS:
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}."
            part = m.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if part.endswith("weight") else "bias"
                # nn.MultiheadAttention stacks [W_q; W_k; W_v] along dim 0.
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}_proj.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[base + _BLOCK_PARTS[part]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            "unsupported open_clip architecture (keys with no transformers CLIP equivalent): "
            + ", ".join(sorted(unknown)[:8])
            + (" ..." if len(unknown) > 8 else "")
        )
    return out


def open_clip_to_hf(
    state_dict: dict[str, Any],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "gelu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Build a transformers ``CLIPModel`` (eval mode) holding an open_clip ViT CLIP's weights.

    The model is created on the meta device (no random init of ~1B parameters) and the converted
    tensors are assigned in, strictly: a missing or extra tensor is an error.
    """
    from transformers import CLIPModel

    sd = strip_module_prefix(state_dict)
    config = clip_config_from_open_clip(
        sd, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
    )
    hf_sd = {k: v.to(dtype) for k, v in convert_open_clip_state_dict(sd).items()}
    with torch.device("meta"):
        model = CLIPModel(config)
    model.load_state_dict(hf_sd, strict=True, assign=True)
    # Non-persistent buffers (the ``position_ids`` aranges) are not in any state dict: rebuild them.
    for mod_name, module in model.named_modules():
        for buf_name, buf in list(module.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name != "position_ids":
                raise RuntimeError(f"unexpected uninitialised buffer {mod_name}.{buf_name}")
            value = torch.arange(buf.shape[-1]).expand(buf.shape).contiguous()
            module.register_buffer(buf_name, value, persistent=False)
    return model.eval()
