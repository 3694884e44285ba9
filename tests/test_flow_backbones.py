"""The flow-matching backbones (SD3, FLUX) against the diffusers pipelines themselves.

Every expected value comes from somewhere other than the code under test: the pipeline's
own ``encode_prompt``, its VAE arithmetic, its sampling loop for the same seed, its
``load_lora_weights`` / ``from_pretrained`` loaders, or a closed-form formula in float64.
Tiny pipelines are built from diffusers' own test configs (``tiny_pipelines``).
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from fixtures_data import solid_image
from snpo.backbones import BACKBONES, detect_family, load_backbone
from snpo.backbones.flow import FlowMatchingBackbone
from snpo.backbones.flux import FluxBackbone
from snpo.backbones.sd3 import StableDiffusion3Backbone
from snpo.data import PairedTransform, collate_pairs
from snpo.errors import ConfigError
from snpo.sampling import sample_images, sample_latents, single_network_guide
from tiny_pipelines import RESOLUTION, make_flux, make_sd3

try:  # the sampling loop's settings (renamed from SamplingConfig during a refactor)
    from snpo.sampling import SamplerSettings
except ImportError:  # pragma: no cover
    from snpo.sampling import SamplingConfig as SamplerSettings

PROMPTS = ["a red cat", "prompt 3"]
FLOW = "FlowMatchEulerDiscreteScheduler"
SHORT_T5 = 24  # a short T5 length where the test is not about the default


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return make_sd3(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def schnell_path(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("schnell") / "model", guidance_embeds=False)


def _pipe(path, **kwargs):
    klass = StableDiffusion3Pipeline if detect_family(path) == "sd3" else FluxPipeline
    pipe = klass.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- registry, loading, defaults -------------------------------------------------------------
def test_detection_loading_and_defaults(tmp_path, sd3_path, flux_path):
    assert BACKBONES["sd3"] is StableDiffusion3Backbone and BACKBONES["flux"] is FluxBackbone
    sd3, flux = load_backbone(sd3_path), load_backbone(flux_path)
    assert (detect_family(sd3_path), detect_family(flux_path)) == ("sd3", "flux")
    assert isinstance(sd3, StableDiffusion3Backbone) and isinstance(flux, FluxBackbone)
    # the T5 length and embedded guidance default to the pipelines' own call defaults
    sd3_call = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    flux_call = inspect.signature(FluxPipeline.__call__).parameters
    assert sd3.max_sequence_length == sd3_call["max_sequence_length"].default == 256
    assert flux.max_sequence_length == flux_call["max_sequence_length"].default == 512
    assert flux.embedded_guidance_scale == flux_call["guidance_scale"].default == 3.5
    assert sd3.weighting_scheme == flux.weighting_scheme == "logit_normal"
    assert (sd3.logit_mean, sd3.logit_std) == (0.0, 1.0)
    assert sd3.prediction_type == flux.prediction_type == "flow_prediction"
    # a null branch: SD3 always, FLUX only with true CFG
    assert sd3.has_null_branch and flux.guidance_distilled and not flux.has_null_branch
    flux.true_cfg = True
    assert flux.has_null_branch
    for backbone, klass in ((sd3, "StableDiffusion3Pipeline"), (flux, "FluxPipeline")):
        info = backbone.describe()
        assert info["pipeline_class"] == klass and info["prediction_type"] == "flow_prediction"
        json.dumps(info)
    # an unknown pipeline class is placed by its components
    for path, family in ((sd3_path, "sd3"), (flux_path, "flux")):
        index = json.loads((path / "model_index.json").read_text())
        index["_class_name"] = "SomeCustomPipeline"
        (tmp_path / family).mkdir()
        (tmp_path / family / "model_index.json").write_text(json.dumps(index))
        assert detect_family(tmp_path / family) == family


def test_geometry_and_no_ddim_for_flow_models(sd3_path, flux_path):
    sd3, flux = load_backbone(sd3_path), load_backbone(flux_path)
    # SD3: latents are the VAE's (4 channels, half size); FLUX: in_channels / 4 (2x2 packing)
    assert sd3.latent_geometry(RESOLUTION) == ((4, 8, 8), RESOLUTION)
    assert flux.latent_geometry(RESOLUTION) == ((4, 8, 8), RESOLUTION)
    assert sd3.latent_geometry(None)[1] == _pipe(sd3_path).default_sample_size * 2
    with pytest.raises(ConfigError, match="multiple of 4"):
        flux.latent_geometry(18)
    with pytest.raises(ConfigError, match="FlowMatchEulerDiscreteScheduler"):
        sd3.sampling_scheduler("ddim", 2, "cpu", (4, 8, 8))


def test_half_precision_keeps_t5_wo_in_float32(sd3_path):
    """As ``from_pretrained(torch_dtype=float16)`` does: T5's ``wo`` overflows in float16."""
    backbone = load_backbone(sd3_path).to("cpu", torch.float16)
    t5 = backbone.text_encoder_3
    wo = [m.weight.dtype for n, m in t5.named_modules() if n.endswith(".wo")]
    assert wo and set(wo) == {torch.float32}
    assert t5.shared.weight.dtype == backbone.text_encoder.dtype == torch.float16
    assert backbone.vae.dtype == torch.float32  # force_upcast VAE


# ---- conditions and the null condition ----------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("use_t5", [True, False], ids=["t5", "no-t5"])
def test_sd3_condition_and_null_match_the_pipeline(sd3_path, use_t5):
    extra = {} if use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = _pipe(sd3_path, **extra)
    backbone = StableDiffusion3Backbone.from_pretrained(sd3_path, use_t5=use_t5)
    assert backbone.uses_t5 == use_t5
    cond = backbone.encode_prompts(PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=None,
    )
    assert embeds.shape[1] == 77 + 256
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    null = backbone.null_condition(cond)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)  # what pipe(prompt) uses
    torch.testing.assert_close(null["pooled_projections"], negative_pooled)
    _, negative_empty, _, negative_pooled_empty = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", negative_prompt=["", ""],
    )
    torch.testing.assert_close(null["encoder_hidden_states"], negative_empty)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled_empty)
    assert not torch.allclose(negative_pooled, pooled, atol=1e-3)
    t5_part = cond["encoder_hidden_states"][:, 77:]
    assert bool((t5_part == 0).all()) == (not use_t5)


@torch.no_grad()
def test_flux_condition_and_true_cfg_null_match_the_pipeline(flux_path):
    pipe = _pipe(flux_path)
    backbone = load_backbone(flux_path)
    cond = backbone.encode_prompts(PROMPTS)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
    assert embeds.shape[1] == 512 and text_ids.shape == (512, 3)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    # FluxPipeline(negative_prompt="", true_cfg_scale > 1) encodes "" the same way
    negative, negative_pooled, _ = pipe.encode_prompt(["", ""], device="cpu")
    null = backbone.null_condition(cond)
    torch.testing.assert_close(null["encoder_hidden_states"], negative)
    torch.testing.assert_close(null["pooled_projections"], negative_pooled)
    assert not torch.allclose(negative_pooled, pooled, atol=1e-3)


@torch.no_grad()
def test_null_from_a_cache_without_encoders(sd3_path):
    """Training from a cache: no text encoders, the null condition preset from the cache."""
    full = load_backbone(sd3_path)
    null_text = full.null_text()
    bare = load_backbone(sd3_path, with_encoders=False)
    assert bare.vae is None and bare.text_encoder is None and bare.text_encoder_3 is None
    # a run from a cache encodes like the run that built it (the cache keys on these)
    assert bare.encoding_options() == full.encoding_options() == {"max_sequence_length": 256, "uses_t5": True}
    bare.preset_null_text({k: v.clone() for k, v in null_text.items()})
    cond = full.encode_prompts(PROMPTS)
    for key, value in bare.null_condition(cond).items():
        torch.testing.assert_close(value, full.null_condition(cond)[key])
    assert set(full.text_condition_keys) == set(cond) and full.image_condition_keys == ()
    full.max_sequence_length = SHORT_T5  # the null condition follows the encoding settings
    assert full.null_text()["encoder_hidden_states"].shape[1] == 77 + SHORT_T5


# ---- rectified flow ---------------------------------------------------------------------------
def _shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_noising_and_target_follow_the_formula(family, sd3_path, flux_path):
    backbone = load_backbone(sd3_path if family == "sd3" else flux_path)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.cat([backbone.sample_timesteps(1, torch.Generator().manual_seed(s)) for s in range(4)])
    assert t.dtype == torch.float32 and bool(((t > 0) & (t <= 1000)).all())
    sigma = (t.double() / 1000).view(-1, 1, 1, 1)  # the scripts' table holds t = sigma * 1000
    expected = (1 - sigma) * x0.double() + sigma * eps.double()
    torch.testing.assert_close(backbone.add_noise(x0, eps, t).double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(backbone.training_target(x0, eps, t).double(), eps.double() - x0.double())
    # t = 1000 is pure noise; a timestep off the table uses t / 1000
    torch.testing.assert_close(backbone.add_noise(x0, eps, torch.full((4,), 1000.0)), eps)
    off = torch.full((4,), 123.25)
    torch.testing.assert_close(backbone.add_noise(x0, eps, off).double(),
                               (1 - 0.12325) * x0.double() + 0.12325 * eps.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "none"])
def test_density_is_diffusers_compute_density_for_timestep_sampling(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from snpo.backbones.flow import flow_density

    args = {"logit_mean": 0.3, "logit_std": 1.2, "mode_scale": 1.29}
    mine = flow_density(scheme, 64, generator=torch.Generator().manual_seed(4), **args)
    theirs = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(4), **args)
    assert torch.equal(mine, theirs)


def test_sigma_sampling_replays_and_follows_the_density(sd3_path, flux_path):
    sd3, flux = load_backbone(sd3_path), load_backbone(flux_path)
    shift = sd3.noise_scheduler.config.shift
    assert shift == 3.0 and flux.noise_scheduler.config.use_dynamic_shifting
    state = torch.get_rng_state()
    first = sd3.sample_timesteps(5, torch.Generator().manual_seed(11))
    assert torch.equal(first, sd3.sample_timesteps(5, torch.Generator().manual_seed(11)))
    assert torch.equal(torch.get_rng_state(), state)  # only the given generator is used
    # logit-normal, written out: u = sigmoid(N(0, 1)) from the same generator, index int(1000 u),
    # unshifted s = (1000 - index) / 1000, sigma = shift s / (1 + (shift - 1) s)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (5,), generator=torch.Generator().manual_seed(11)).double())
    s = (1000 - torch.floor(u * 1000)) / 1000
    torch.testing.assert_close(first.double() / 1000, _shifted(s, shift), atol=1e-6, rtol=0)
    # many draws: logit of the UNSHIFTED sigma ~ N(0, 1) for SD3 (its table is shifted) and for
    # FLUX (dynamic shifting: its training table is unshifted, as in the FLUX script)
    n = 4000
    for backbone, unshift in ((sd3, lambda x: x / (shift - (shift - 1) * x)), (flux, lambda x: x)):
        sigma = backbone.sample_timesteps(n, torch.Generator().manual_seed(1)).double() / 1000
        z = torch.logit(unshift(sigma).clamp(1e-6, 1 - 1e-6))
        assert abs(z.mean()) < 0.08 and abs(z.std() - 1) < 0.08
    # uniform ("none" is the SD3 script's name for it): unshifted sigma ~ U(0, 1]
    sd3.weighting_scheme = "none"
    sigma = sd3.sample_timesteps(n, torch.Generator().manual_seed(2)).double() / 1000
    s = sigma / (shift - (shift - 1) * sigma)
    assert bool(((sigma > 0) & (sigma <= 1)).all())
    assert abs(s.mean() - 0.5) < 0.02 and abs((s < 0.25).double().mean() - 0.25) < 0.03
    assert sigma.mean() > 0.6  # the shift pushes sigma up: E = 0.79 for shift 3
    sd3.weighting_scheme = "mode"
    sigma = sd3.sample_timesteps(n, torch.Generator().manual_seed(2))
    assert bool(((sigma > 0) & (sigma <= 1000)).all())
    sd3.weighting_scheme = "sigma_sqrt"  # a loss weighting: would change the objective
    with pytest.raises(ConfigError, match="weighting_scheme"):
        sd3.sample_timesteps(1, torch.Generator())


# ---- the VAE ----------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_latents_use_the_vae_shift_and_scale_as_the_pipeline(family, sd3_path, flux_path):
    backbone = load_backbone(sd3_path if family == "sd3" else flux_path)
    vae = backbone.vae
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    assert shift != 0 and scale != 1
    pixels = torch.rand(2, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = backbone.encode_images(pixels)
    # the scripts: (latent - shift_factor) * scaling_factor (here with the posterior mean)
    torch.testing.assert_close(latents, (vae.encode(pixels).latent_dist.mean - shift) * scale)
    # the pipelines: vae.decode(latents / scaling_factor + shift_factor)
    torch.testing.assert_close(backbone.decode_latents(latents), vae.decode(latents / scale + shift).sample)


# ---- same seed, same image ----------------------------------------------------------------------
def _pipeline_images(pipe, prompts, seeds, **kwargs):
    images, latents = [], []
    for prompt, seed in zip(prompts, seeds, strict=True):
        for output, out in (("pt", images), ("latent", latents)):
            result = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type=output,
                          height=RESOLUTION, width=RESOLUTION, **kwargs).images
            out.append(result)
    latents = torch.cat(latents)
    if isinstance(pipe, FluxPipeline):
        latents = pipe._unpack_latents(latents, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)
    return torch.cat(images), latents


@pytest.mark.parametrize(
    "family, guide_scale, pipe_kwargs",
    [
        ("sd3", 5.0, {"guidance_scale": 5.0}),
        ("flux", 1.0, {"guidance_scale": 2.5}),  # distilled: embedded guidance, no null branch
        ("flux", 2.0, {"guidance_scale": 2.5, "negative_prompt": "", "true_cfg_scale": 2.0}),
        ("schnell", 1.0, {"guidance_scale": 0.0}),  # no guidance input at all
    ],
    ids=["sd3-cfg", "flux-distilled", "flux-true-cfg", "flux-schnell"],
)
@torch.no_grad()
def test_sampler_matches_the_pipeline_for_the_same_seed(
    family, guide_scale, pipe_kwargs, sd3_path, flux_path, schnell_path,
):
    path = {"sd3": sd3_path, "flux": flux_path, "schnell": schnell_path}[family]
    pipe = _pipe(path)
    backbone = load_backbone(path)
    backbone.max_sequence_length = SHORT_T5
    if family != "sd3":
        assert backbone.guidance_distilled == (family == "flux")
        backbone.embedded_guidance_scale = pipe_kwargs["guidance_scale"]
        backbone.true_cfg = "true_cfg_scale" in pipe_kwargs
    seeds = [7, 1234]
    expected_images, expected_latents = _pipeline_images(
        pipe, PROMPTS, seeds, num_inference_steps=3, max_sequence_length=SHORT_T5, **pipe_kwargs,
    )
    config = SamplerSettings(num_inference_steps=3, guidance_scale=guide_scale, scheduler=FLOW, batch_size=2)
    guide = single_network_guide(backbone, backbone.denoiser, guide_scale)
    shape, _ = backbone.latent_geometry(RESOLUTION)
    latents = sample_latents(backbone, guide, PROMPTS, seeds, shape, config)
    torch.testing.assert_close(latents, expected_latents, atol=1e-5, rtol=1e-5)
    images = sample_images(backbone, guide, PROMPTS, seeds, shape, config)
    torch.testing.assert_close(images, expected_images, atol=1e-5, rtol=1e-5)


# ---- LoRA and full fine-tune round trips --------------------------------------------------------
def _inputs(backbone, seed=0):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        cond = backbone.encode_prompts(PROMPTS)
    return noisy, t, cond


def _pipeline_forward(pipe, transformer, noisy, t, cond):
    """The denoiser call written as each pipeline's denoising loop writes it."""
    if isinstance(pipe, StableDiffusion3Pipeline):
        return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                           pooled_projections=cond["pooled_projections"], return_dict=False)[0]
    b, c, h, w = noisy.shape
    hidden = cond["encoder_hidden_states"]
    guidance = torch.full([1], 3.5, dtype=torch.float32).expand(b) if transformer.config.guidance_embeds else None
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t / 1000, guidance=guidance,
        pooled_projections=cond["pooled_projections"], encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
        return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_round_trip_through_the_pipeline_loader(family, sd3_path, flux_path, tmp_path):
    path = sd3_path if family == "sd3" else flux_path
    backbone = load_backbone(path)
    backbone.max_sequence_length = SHORT_T5
    noisy, t, cond = _inputs(backbone)
    pipe = _pipe(path)
    with torch.no_grad():
        base = _pipeline_forward(pipe, pipe.transformer, noisy, t, cond)
    params = backbone.prepare_for_training(lora_rank=4)
    names = {n for n, p in backbone.denoiser.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    targets = {n.split(".lora_")[0].split(".", 2)[-1] for n in names}  # e.g. attn.to_q
    assert targets == set(backbone.lora_target_modules)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        policy = backbone.predict(backbone.denoiser, noisy, t, cond)
        with backbone.reference() as reference:
            ref = backbone.predict(reference, noisy, t, cond)
    assert len(params) == len(names)
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)  # adapters off = the base model
    assert not torch.allclose(policy, base, atol=1e-3)
    assert backbone.save_trained(tmp_path / "out") == ["pytorch_lora_weights.safetensors"]
    pipe.load_lora_weights(tmp_path / "out")
    with torch.no_grad():
        loaded = _pipeline_forward(pipe, pipe.transformer, noisy, t, cond)
    torch.testing.assert_close(loaded, policy, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_fine_tune_round_trip(family, sd3_path, flux_path, tmp_path):
    path = sd3_path if family == "sd3" else flux_path
    backbone = load_backbone(path)
    backbone.max_sequence_length = SHORT_T5
    noisy, t, cond = _inputs(backbone, seed=1)
    pipe = _pipe(path)
    params = backbone.prepare_for_training(lora_rank=0)
    assert len(params) == len(list(backbone.denoiser.parameters()))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn(p.shape, generator=g))
        policy = backbone.predict(backbone.denoiser, noisy, t, cond)
        with backbone.reference() as reference:
            ref = backbone.predict(reference, noisy, t, cond)
        base = _pipeline_forward(pipe, pipe.transformer, noisy, t, cond)
    torch.testing.assert_close(ref, base, atol=1e-5, rtol=1e-5)  # the frozen copy
    assert backbone.save_trained(tmp_path / "out") == ["transformer"]
    klass = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    loaded = klass.from_pretrained(tmp_path / "out", subfolder="transformer")
    with torch.no_grad():
        out = _pipeline_forward(pipe, loaded, noisy, t, cond)
    torch.testing.assert_close(out, policy, atol=1e-5, rtol=1e-5)


# ---- the trainer-facing interface -------------------------------------------------------------
def _batch(n: int = 2):
    transform = PairedTransform(RESOLUTION)
    items = [dict(prompt=PROMPTS[i % 2], key=str(i),
                  **transform(solid_image((20 + 30 * i, 40, 60)), solid_image((200, 180 - 20 * i, 160))))
             for i in range(n)]
    return collate_pairs(items)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_single_network_step_with_lora(family, sd3_path, flux_path):
    from snpo.methods.single import SingleNetworkMethod
    from snpo.objectives import ObjectiveConfig

    backbone = load_backbone(sd3_path if family == "sd3" else flux_path)
    backbone.max_sequence_length = SHORT_T5
    backbone.true_cfg = True  # FLUX: snpo trains the null branch, so it needs true CFG
    assert backbone.has_null_branch
    params = backbone.prepare_for_training(lora_rank=4)
    method = SingleNetworkMethod(backbone, ObjectiveConfig("snpo", 2000.0), 0.5)
    batch = _batch()
    loss, metrics = method.compute_loss(backbone.denoiser, batch, [10, 11])
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # reference = adapters off: at initialisation (lora_B = 0) the policy IS the reference,
    # so every implicit reward is exactly zero and the loss is log 2
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)


def test_flow_backbones_share_one_base():
    assert issubclass(StableDiffusion3Backbone, FlowMatchingBackbone)
    assert issubclass(FluxBackbone, FlowMatchingBackbone)
