"""The Stable Diffusion backbones against the diffusers pipelines themselves: the prompt
embeddings, the null condition and SDXL's micro-conditioning are compared with what the
pipeline's own ``encode_prompt`` / ``_get_add_time_ids`` produce; the training target with
the closed form of the noise schedule; the family registry with model folders on disk."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from fixtures_data import solid_image
from snpo.backbones import ModelNotFoundError, detect_family, load_backbone
from snpo.backbones.sd import StableDiffusionBackbone
from snpo.backbones.sdxl import StableDiffusionXLBackbone
from snpo.data import PairedTransform, collate_pairs
from tiny_pipelines import RESOLUTION, make_sd15, make_sdxl

PROMPTS = ["a red cat", "prompt 3"]



@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return make_sd15(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture(scope="module", params=[True, False], ids=["zeros", "empty-prompt"])
def sdxl_path(request, tmp_path_factory):
    return make_sdxl(tmp_path_factory.mktemp("sdxl") / "model", force_zeros_for_empty_prompt=request.param)


@torch.no_grad()
def test_sd15_condition_and_null_match_the_pipeline(sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    backbone = load_backbone(sd_path)
    assert isinstance(backbone, StableDiffusionBackbone) and backbone.family == "sd"
    cond = backbone.encode_prompts(PROMPTS)
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=None)
    torch.testing.assert_close(cond["encoder_hidden_states"], positive)
    null = backbone.null_condition(cond)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)  # what pipe(prompt) uses
    _, negative_empty = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["", ""])
    torch.testing.assert_close(null["encoder_hidden_states"], negative_empty)
    assert not torch.allclose(negative, positive, atol=1e-3)  # the null really is another input


@torch.no_grad()
def test_sdxl_condition_and_null_match_the_pipeline(sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    backbone = load_backbone(sdxl_path)
    assert isinstance(backbone, StableDiffusionXLBackbone) and backbone.family == "sdxl"
    zeros = pipe.config.force_zeros_for_empty_prompt
    assert backbone.force_zeros_for_empty_prompt == zeros
    cond = backbone.encode_prompts(PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=None)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    null = backbone.null_condition(cond)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)
    torch.testing.assert_close(null["text_embeds"], negative_pooled)
    assert torch.equal(null["time_ids"], cond["time_ids"])  # micro-conditioning unchanged
    assert bool((negative == 0).all()) == zeros
    # the default time_ids are the pipeline's: (H, W) original, no crop, (H, W) target
    expected = pipe._get_add_time_ids((RESOLUTION,) * 2, (0, 0), (RESOLUTION,) * 2, torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    torch.testing.assert_close(cond["time_ids"], expected.repeat(2, 1))


def test_sdxl_time_ids_per_image_from_the_data_layer(tmp_path):
    """Each image's real size and crop go into its own time_ids row, chosen rows first."""
    backbone = StableDiffusionXLBackbone.from_pretrained(make_sdxl(tmp_path / "m"))
    # chosen 24 x 36 (h x w) -> resized 16 x 24, centre crop left 4; rejected 40 x 20 ->
    # resized 32 x 16, centre crop top 8 (worked out by hand)
    transform = PairedTransform(RESOLUTION)
    items = [dict(prompt="a red cat", key=str(i),
                  **transform(solid_image((10, 20, 30), (24, 36)), solid_image((200, 210, 220), (40, 20))))
             for i in range(2)]
    batch = collate_pairs(items)
    with torch.no_grad():
        _, _, cond = backbone.encode_batch(batch)
    chosen_row = [24, 36, 0, 4, RESOLUTION, RESOLUTION]
    rejected_row = [40, 20, 8, 0, RESOLUTION, RESOLUTION]
    assert cond["time_ids"].tolist() == [chosen_row, chosen_row, rejected_row, rejected_row]
    assert cond["encoder_hidden_states"].shape[0] == 4


def test_training_target_follows_the_scheduler(tmp_path):
    """epsilon -> the noise; v_prediction -> sqrt(abar) eps - sqrt(1 - abar) x0, with abar from
    the scaled-linear schedule written out here."""
    eps_backbone = load_backbone(make_sd15(tmp_path / "eps"))
    v_backbone = load_backbone(make_sd15(tmp_path / "v", prediction_type="v_prediction"))
    assert (eps_backbone.prediction_type, v_backbone.prediction_type) == ("epsilon", "v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(eps_backbone.training_target(x0, eps, t), eps)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double()
    torch.testing.assert_close(v_backbone.training_target(x0, eps, t).double(), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_latents_are_the_scaled_posterior_mean_and_decode_as_the_pipeline(sd_path):
    backbone = load_backbone(sd_path)
    vae = backbone.vae
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    latents = backbone.encode_images(pixels)
    torch.testing.assert_close(latents, vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    # StableDiffusionPipeline decodes with vae.decode(latents / scaling_factor)
    torch.testing.assert_close(backbone.decode_latents(latents), vae.decode(latents / vae.config.scaling_factor).sample)


def test_lora_reference_is_the_network_with_adapters_disabled(sd_path):
    backbone = load_backbone(sd_path)
    g = torch.Generator().manual_seed(1)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
        before = backbone.predict(backbone.denoiser, noisy, t, cond)
    params = backbone.prepare_for_training(lora_rank=4)
    assert params and all("lora" in n for n, p in backbone.denoiser.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        policy = backbone.predict(backbone.denoiser, noisy, t, cond)
        with backbone.reference() as reference:
            ref = backbone.predict(reference, noisy, t, cond)
    torch.testing.assert_close(ref, before)
    assert not torch.allclose(policy, before, atol=1e-4)


def test_family_detection(tmp_path, sd_path, tiny_toy):
    assert detect_family(sd_path) == "sd"
    assert detect_family(make_sdxl(tmp_path / "xl")) == "sdxl"
    tiny_toy.save_pretrained(tmp_path / "toy")
    assert detect_family(tmp_path / "toy") == "toy"
    assert load_backbone(tmp_path / "toy").family == "toy"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline", "transformer": ["x", "y"]}))
    with pytest.raises(ModelNotFoundError, match="PixArtSigmaPipeline"):
        detect_family(odd)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        detect_family(tmp_path / "missing" / "model")
