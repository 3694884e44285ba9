"""What a benchmark runs on: random-init copies of real architectures, saved as diffusers
pipeline folders, and a Pick-a-Pic-style parquet of synthetic JPEG pairs.

Weights are random (nothing can be fetched here, and speed does not depend on their values);
shapes are the real ones, so every matmul, convolution and attention is the size it is in
training. Folders are built once per architecture under ``work_dir/models`` and reused.

- ``tiny``: the tiny configs diffusers' own tests use (UNet ``(32, 64)``, VAE ``(32, 64)``,
  a 5-layer 32-wide CLIP text encoder).
- ``sd15``: Stable Diffusion 1.5 (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M).
- ``sdxl``: SDXL base (UNet 2.6B, two text encoders: CLIP ViT-L and OpenCLIP ViT-bigG, VAE).
- ``sdxl-quarter``: SDXL's UNet layout (three levels, 1/2/10 transformer layers, text-time
  conditioning, the same blocks, heads and attention pattern) with every width divided by 4
  (channels 80/160/320, cross-attention 512; 1/16 of the weights: 0.17B), its two text
  encoders as narrow, the SDXL VAE: the full-fine-tune memory benchmark on a 24 GB CPU machine,
  where the real 2.6B UNet with AdamW and a reference copy (about 52 GB a process) cannot run.
- ``sd3``: Stable Diffusion 3.5 Medium (MMDiT-X transformer 2.5B, 24 blocks, 13 with dual
  attention; CLIP ViT-L and OpenCLIP ViT-bigG with projections; the 16-channel VAE; the
  flow-matching scheduler with shift 3). WITHOUT T5-XXL (4.7B parameters, 19 GB in float32):
  the pipeline then feeds zeros of the same length (77 + 256 tokens) in T5's place, so the
  transformer's work, which is what training repeats every step, is exactly the T5 run's;
  only encoding (the cache build, ``dpo-uncached``) is cheaper than with T5.
- ``tiny-sd3``: an SD3 pipeline of the tiny configs diffusers' own tests use (no T5), for
  ``snpo bench --arch tiny-sd3`` in seconds.

Flow-matching architectures have no ``reference-script`` configuration (the diffusers
Diffusion-DPO script trains SD1.5/SDXL UNets only).
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snpo.errors import ConfigError

ARCHS = ("tiny", "sd15", "sdxl", "sdxl-quarter", "tiny-sd3", "sd3")
#: architectures trained as rectified flows (no reference-script configuration for them)
FLOW_ARCHS = ("tiny-sd3", "sd3")
ASSET_VERSION = 1
WORDS = ("a", "photo", "of", "red", "blue", "green", "cat", "dog", "house", "tree", "on", "the",
         "beach", "in", "snow", "painting", "castle", "at", "night", "with", "boat")


def _sd_text_config(tokenizer: Any, **overrides: Any):
    from transformers import CLIPTextConfig

    values = dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=768, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def _vae(arch: str):
    from diffusers import AutoencoderKL

    arch = "sdxl" if arch == "sdxl-quarter" else arch
    if arch == "tiny":
        return AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=32,
        )
    sdxl = arch == "sdxl"
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=1024 if sdxl else 512,
        scaling_factor=0.13025 if sdxl else 0.18215, force_upcast=sdxl,
    )


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", clip_sample=False,
    )


def sd3_transformer_config(arch: str) -> dict[str, Any]:
    """``SD3Transformer2DModel`` config of ``arch``: SD3.5 Medium's (its ``transformer/config.json``),
    or the tiny one of diffusers' SD3 pipeline tests."""
    if arch == "tiny-sd3":
        return dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                    attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                    joint_attention_dim=32, pooled_projection_dim=64)
    return dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def _sd3_pipeline(arch: str, tokenizer: Any):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(**sd3_transformer_config(arch))
    if arch == "tiny-sd3":
        vae = AutoencoderKL(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
            scaling_factor=1.5035)
        small = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, projection_dim=32)
        text, text_2 = (CLIPTextModelWithProjection(_sd_text_config(tokenizer, **small)) for _ in range(2))
    else:  # SD3.5 Medium's VAE and CLIP encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=16,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5305, force_upcast=True)
        text = CLIPTextModelWithProjection(_sd_text_config(tokenizer))
        text_2 = CLIPTextModelWithProjection(_sd_text_config(
            tokenizer, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
            num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_pipeline(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-init ``arch`` pipeline to ``folder`` (a diffusers pipeline folder)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from snpo.toy.tokenizer import build_toy_tokenizer

    if arch not in ARCHS:
        raise ConfigError(f"arch: expected one of {', '.join(ARCHS)}, got {arch!r}")
    torch.manual_seed(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = build_toy_tokenizer(WORDS, tmp / "_tokenizer", max_length=77)
    if arch in FLOW_ARCHS:
        pipe = _sd3_pipeline(arch, tokenizer)
    elif arch == "tiny":
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        )
        text = CLIPTextModel(_sd_text_config(
            tokenizer, vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=5,
            num_attention_heads=4, projection_dim=32))
        pipe = StableDiffusionPipeline(
            vae=_vae(arch), text_encoder=text, tokenizer=tokenizer, unet=unet,
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    elif arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        pipe = StableDiffusionPipeline(
            vae=_vae(arch), text_encoder=CLIPTextModel(_sd_text_config(tokenizer)),
            tokenizer=tokenizer, unet=unet, scheduler=_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    else:
        w = 4 if arch == "sdxl-quarter" else 1  # every width / w (sdxl-quarter)
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320 // w, 640 // w, 1280 // w), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048 // w, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256 // w, projection_class_embeddings_input_dim=6 * (256 // w) + 1280 // w,
            norm_num_groups=32 // (2 if w > 1 else 1),
        )
        text_2 = CLIPTextModelWithProjection(_sd_text_config(
            tokenizer, hidden_size=1280 // w, intermediate_size=5120 // w, num_hidden_layers=32,
            num_attention_heads=20, projection_dim=1280 // w, hidden_act="gelu"))
        text = CLIPTextModel(_sd_text_config(tokenizer, hidden_size=768 // w, intermediate_size=3072 // w,
                                             projection_dim=768 // w))
        pipe = StableDiffusionXLPipeline(
            vae=_vae(arch), text_encoder=text,
            text_encoder_2=text_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(tmp)
    shutil.rmtree(tmp / "_tokenizer", ignore_errors=True)
    (tmp / "snpo_bench.json").write_text(json.dumps({"arch": arch, "seed": seed, "version": ASSET_VERSION}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def pipeline_folder(work_dir: Path, arch: str, seed: int = 0) -> tuple[Path, float | None]:
    """The ``arch`` pipeline folder under ``work_dir`` (built if missing) and the seconds the
    build took (None when it was already there)."""
    import time

    folder = work_dir / "models" / f"{arch}-seed{seed}-v{ASSET_VERSION}"
    if (folder / "snpo_bench.json").is_file():
        return folder, None
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_pipeline(arch, folder, seed)
    return folder, time.perf_counter() - start


def _image(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random image with some texture, as JPEG (about the bytes of a real photo)."""
    from PIL import Image

    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pickapic_parquet(work_dir: Path, n_pairs: int, image_size: int = 512, seed: int = 0) -> Path:
    """A Pick-a-Pic v2-style parquet (``caption, jpg_0, jpg_1, label_0, label_1, ...``) of
    ``n_pairs`` distinct pairs of ``image_size`` px JPEGs, winners in both columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = work_dir / "data" / f"pickapic-{n_pairs}x{image_size}-seed{seed}.parquet"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in (
        "caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid",
        "ranking_id", "best_image_uid")}
    for i in range(n_pairs):
        words = rng.choice(WORDS, size=8)
        rows["caption"].append(f"{' '.join(words)} {i}")
        rows["jpg_0"].append(_image(rng, image_size))
        rows["jpg_1"].append(_image(rng, image_size))
        first_won = i % 2 == 0
        rows["label_0"].append(1.0 if first_won else 0.0)
        rows["label_1"].append(0.0 if first_won else 1.0)
        rows["image_0_uid"].append(f"{i}-0")
        rows["image_1_uid"].append(f"{i}-1")
        rows["ranking_id"].append(i)
        rows["best_image_uid"].append(f"{i}-{0 if first_won else 1}")
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), tmp)
    tmp.rename(path)
    return path
