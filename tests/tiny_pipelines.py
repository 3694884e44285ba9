"""Tiny Stable Diffusion 1.5-like and SDXL-like pipelines, built from configs and saved to a
folder exactly as a hub snapshot is laid out (``model_index.json`` + one folder per
component), so tests load them through the same code path as a real model.

Sizes follow the tiny configs diffusers' own tests use, shrunk further where the CPU budget
asks (one layer per block, 8-channel VAE). Images are ``RESOLUTION`` px; the VAE halves them.
The tokenizer is a real ``CLIPTokenizer`` built offline from a hand-written vocabulary.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

RESOLUTION = 16  # image side in the tests; latents are 8 x 8
TEXT_WIDTH = 16
MAX_TOKENS = 77
WORDS = ("prompt", "a", "red", "cat")


def build_tokenizer(*, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer over characters, digits and a few whole words (offline)."""
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer keeps its vocabulary in memory
        return _build_tokenizer(Path(tmp), pad_token)


def _build_tokenizer(folder: Path, pad_token: str) -> CLIPTokenizer:
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "!</w>": 3}
    for char in string.ascii_lowercase + string.digits:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in WORDS:  # merge each word left to right into one token
        piece = word[0]
        for i, char in enumerate(word[1:], start=1):
            tail = char + "</w>" if i == len(word) - 1 else char
            merges.append(f"{piece} {tail}")
            piece += tail
            vocab.setdefault(piece, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        model_max_length=MAX_TOKENS, pad_token=pad_token,
    )


def _text_config(tokenizer: CLIPTokenizer, projection_dim: int = TEXT_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection_dim,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, prediction_type=prediction_type, num_train_timesteps=1000,
        steps_offset=1,
    )


def make_sd15(folder: str | Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny SD1.5-like ``StableDiffusionPipeline`` to ``folder``; return the folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        unet=unet, scheduler=_scheduler(prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_sdxl(
    folder: str | Path, *, force_zeros_for_empty_prompt: bool = True, seed: int = 0,
    prediction_type: str = "epsilon",
) -> Path:
    """Save a tiny SDXL-like ``StableDiffusionXLPipeline`` (two text encoders, pooled
    embeddings, ``text_time`` micro-conditioning) to ``folder``; return the folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer(pad_token="!")  # as SDXL's second one
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + TEXT_WIDTH,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=_scheduler(prediction_type), force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.save_pretrained(folder)
    return folder


# ---- flow-matching pipelines (SD3, FLUX) ------------------------------------------------------
# Sizes follow diffusers' own pipeline tests (tests/pipelines/stable_diffusion_3 and flux),
# with the VAE halving the image as real ones do (16 px images, 8 x 8 latents) and a
# T5 tokenizer built offline from a hand-written Unigram vocabulary.
T5_WIDTH = 32  # T5 d_model = the transformers' joint_attention_dim (>= both CLIP widths together)
T5_WORDS = ("a", "red", "cat", "prompt", "3", "blue", "dog")


def build_t5_tokenizer():
    """A T5 (Unigram) tokenizer over a few words and single characters (offline)."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS]
    vocab += [("\u2581", -2.0)] + [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    return T5TokenizerFast(vocab=vocab, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))


def _flow_vae(latent_channels: int, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """A two-level VAE (halves the image) with SD3/FLUX's shift and scale, no quant convs."""
    return AutoencoderKL(
        block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def make_sd3(folder: str | Path, *, with_t5: bool = True, seed: int = 0, shift: float = 3.0) -> Path:
    """Save a tiny ``StableDiffusion3Pipeline`` (two CLIP encoders with projection, T5 unless
    ``with_t5=False``, an MMDiT with two joint blocks, the scheduler shift of SD3/SD3.5)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer() if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=2 * TEXT_WIDTH,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_flow_vae(4, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2)), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3) if with_t5 else None, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(folder)
    return folder


def make_flux(folder: str | Path, *, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Save a tiny ``FluxPipeline`` (CLIP pooled + T5, a transformer with one double and one
    single block, 2x2-packed 4-channel latents, FLUX.1-dev's dynamically shifted scheduler;
    ``guidance_embeds`` as FLUX.1-dev, without as FLUX.1-schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_flow_vae(4, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2), tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(folder)
    return folder
