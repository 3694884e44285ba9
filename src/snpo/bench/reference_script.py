"""The baseline: what the public Diffusion-DPO scripts do, step for step, with phase timers.

A faithful re-implementation of the training loop of diffusers'
``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py`` (and its SDXL twin) on
the same pipeline folder and the same parquet as the snpo runs:

- data: each item's two JPEGs decoded and transformed every time it is read (resize to
  ``resolution`` with bilinear filtering, centre crop, random horizontal flip, to [-1, 1]),
  winner first, caption tokenized (the script's ``with_transform(preprocess_train)``; PIL and
  numpy here, as torchvision has no CPU build on this machine);
- every step: ``vae.encode(...).latent_dist.sample()`` of all 2B images (in chunks of
  ``vae_encode_batch_size`` = 8) and the text encoder on the B prompts, repeated for the
  same images every epoch;
- the policy forward on 2B rows, the reference forward with the LoRA adapters disabled under
  no_grad, the sigmoid DPO loss, ``accelerator.backward``, gradient clipping, ``AdamW``
  (the script's default optimizer: ``torch.optim.AdamW`` with no ``fused``/``foreach``
  argument), ``lr_scheduler.step()``, ``zero_grad()``.

Mixed precision as the scripts: frozen weights cast to the half dtype, LoRA parameters
upcast to float32 only under fp16, the forward under accelerate's autocast; the SDXL VAE in
float32.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

VAE_ENCODE_BATCH_SIZE = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class ScriptPairs(Dataset):
    """The script's ``preprocess_train`` per item, on a Pick-a-Pic parquet held in memory."""

    def __init__(self, parquet: str | Path, tokenizers: list[Any], resolution: int, seed: int = 0) -> None:
        import pyarrow.parquet as pq

        self.table = pq.read_table(parquet).to_pydict()
        self.tokenizers, self.resolution = tokenizers, resolution
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.table["caption"])

    def _transform(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB")
        original = (image.height, image.width)
        res = self.resolution
        scale = res / min(image.size)
        size = (max(res, round(image.width * scale)), max(res, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        top, left = (image.height - res) // 2, (image.width - res) // 2
        image = image.crop((left, top, left + res, top + res))
        if self.rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        return pixels.permute(2, 0, 1), original, (top, left)

    def __getitem__(self, i: int) -> dict[str, Any]:
        images = [self._transform(self.table[c][i]) for c in ("jpg_0", "jpg_1")]
        if self.table["label_0"][i] == 0:  # winner first
            images = images[::-1]
        item = {
            "pixel_values": torch.cat([images[0][0], images[1][0]], dim=0),
            "original_size": images[0][1], "crop_top_left": images[0][2],
        }
        for j, tok in enumerate(self.tokenizers):
            item[f"input_ids_{j}"] = tok(
                [self.table["caption"][i]], truncation=True, padding="max_length",
                max_length=tok.model_max_length, return_tensors="pt",
            ).input_ids[0]
        return item


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"pixel_values": torch.stack([i["pixel_values"] for i in items]).float()}
    for key in items[0]:
        if key.startswith("input_ids_"):
            out[key] = torch.stack([i[key] for i in items])
    out["original_sizes"] = [i["original_size"] for i in items]
    out["crop_top_lefts"] = [i["crop_top_left"] for i in items]
    return out


def run_reference_script(spec: dict[str, Any], timer: Any) -> dict[str, Any]:
    """Train ``warmup + measure`` steps the way the reference script does (see module doc)."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from snpo.bench.timing import optimizer_hooks

    model = Path(spec["model"])
    sdxl = (model / "text_encoder_2").is_dir()
    accelerator = Accelerator(mixed_precision=spec["mixed_precision"],
                              cpu=spec.get("device") == "cpu")
    torch.manual_seed(spec["seed"])
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")]
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder")]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2"))
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for module in (vae, unet, *encoders):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32 if sdxl else weight_dtype)
    for encoder in encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    rank = spec["lora_rank"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS))
    if accelerator.mixed_precision == "fp16":
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.to(torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = optimizer_hooks(torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999),
                                                  weight_decay=1e-2, eps=1e-8), timer)
    dataset = ScriptPairs(spec["dataset"], tokenizers, spec["resolution"], seed=spec["seed"])

    class TimedPairs(Dataset):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, i: int) -> dict[str, Any]:
            with timer.phase("data"):
                return dataset[i]

    loader = DataLoader(TimedPairs(), batch_size=spec["batch_size"], shuffle=True,
                        collate_fn=timer.wrap(collate, "data"), num_workers=0)
    steps = spec["warmup_steps"] + spec["measure_steps"]
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(unet)
    resolution, beta = spec["resolution"], spec["beta"]

    def encode_prompt(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            if not sdxl:
                return encoders[0](batch["input_ids_0"].to(accelerator.device))[0], None
            hidden, pooled = [], None
            for j, encoder in enumerate(encoders):
                out = encoder(batch[f"input_ids_{j}"].to(accelerator.device), output_hidden_states=True)
                pooled = out[0]
                hidden.append(out.hidden_states[-2])
            return torch.cat(hidden, dim=-1), pooled

    timer.begin()
    unet.train()
    step = 0
    while step < steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                with timer.phase("encode"):
                    pixel_values = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
                    feed = torch.cat(pixel_values.chunk(2, dim=1))
                    latents = torch.cat([
                        vae.encode(feed[i: i + VAE_ENCODE_BATCH_SIZE]).latent_dist.sample()
                        for i in range(0, feed.shape[0], VAE_ENCODE_BATCH_SIZE)
                    ]) * vae.config.scaling_factor
                    latents = latents.to(weight_dtype) if sdxl else latents
                    prompt_embeds, pooled = encode_prompt(batch)
                noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
                bsz = latents.shape[0] // 2
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device, dtype=torch.long).repeat(2)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                prompt_embeds = prompt_embeds.repeat(2, 1, 1)
                kwargs: dict[str, Any] = {}
                if sdxl:
                    time_ids = torch.tensor(
                        [list(s) + list(c) + [resolution, resolution]
                         for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])],
                        device=accelerator.device, dtype=weight_dtype).repeat(2, 1)
                    kwargs["added_cond_kwargs"] = {"time_ids": time_ids, "text_embeds": pooled.repeat(2, 1)}
                with timer.phase("policy_forward"):
                    model_pred = unet(noisy, timesteps, prompt_embeds, **kwargs).sample
                target = noise
                losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                losses = losses.mean(dim=list(range(1, len(losses.shape))))
                model_diff = losses.chunk(2)[0] - losses.chunk(2)[1]
                with timer.phase("reference_forward"):
                    unwrapped.disable_adapters()
                    with torch.no_grad():
                        ref_pred = unet(noisy, timesteps, prompt_embeds, **kwargs).sample.detach()
                        ref = F.mse_loss(ref_pred.float(), target.float(), reduction="none")
                        ref = ref.mean(dim=list(range(1, len(ref.shape))))
                        ref_diff = ref.chunk(2)[0] - ref.chunk(2)[1]
                    unwrapped.enable_adapters()
                inside = -0.5 * beta * (model_diff - ref_diff)
                loss = -1 * F.logsigmoid(inside).mean()
                with timer.phase("policy_backward"):
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    with timer.phase("optimizer"):
                        accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss.detach().item()  # the script logs the loss every step (a host sync)
            step += 1
            if step >= steps:
                break
    result = timer.finish()
    accelerator.end_training()
    return result
