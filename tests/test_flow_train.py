"""``snpo train`` on tiny SD3-like and FLUX-like pipelines saved to disk, with a generated
Pick-a-Pic parquet with ties and bad rows: the result loads into the diffusers pipeline and
changes its output, and the pipeline's denoiser then computes what snpo's own trained policy
computes on the same inputs.

Expected values come from diffusers itself: ``pipe.encode_prompt`` for the conditions, the
pipeline's ``load_lora_weights`` / ``<Transformer>.from_pretrained`` for the weights, the
transformer called as each pipeline's denoising loop calls it, and the tensors the
pipeline's own sampling loop feeds its unconditional branch (recorded with a hook).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from fixtures_data import make_pickapic_parquet
from snpo.backbones import load_backbone
from snpo.cli import main
from snpo.configuration import load_config
from snpo.methods.draws import draw_pairs
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig
from snpo.training.config import TrainConfig
from snpo.training.job import build_job
from tiny_pipelines import RESOLUTION, make_flux, make_sd3

SHORT_T5 = 24  # T5 tokens in these tests (the pipelines' 256/512 only cost time here)
SINGLE = ("sft", "dpo", "bdpo", "snpo-naive", "snpo")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("flow-train")


@pytest.fixture(scope="module")
def sd3_model(root):
    return make_sd3(root / "sd3")


@pytest.fixture(scope="module")
def flux_model(root):
    return make_flux(root / "flux")


@pytest.fixture(scope="module")
def pickapic(root):
    """10 rows: 2 ties, winners in both columns, one unreadable image (met while training), one
    bad label and one empty caption: 6 pairs pass the scan, 5 are readable."""
    path = root / "data" / "train-00000.parquet"
    make_pickapic_parquet(path, 10, bad_rows={"unreadable_image": 1, "bad_label": 1, "empty_caption": 1})
    return path


def train_values(model, data, out, **overrides) -> dict:
    values = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                  resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler="constant", beta=500.0, checkpointing_steps=0, report_to="none",
                  max_steps=3, lora_rank=4, cfg_dropout=0.5, max_sequence_length=SHORT_T5, seed=0)
    values.update(overrides)
    return values


def cli_args(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def pipeline(model):
    klass = StableDiffusion3Pipeline if "sd3" in str(model) else FluxPipeline
    pipe = klass.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kwargs) -> np.ndarray:
    return pipe("a red cat", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                max_sequence_length=SHORT_T5, generator=torch.Generator().manual_seed(0),
                output_type="np", **kwargs).images


@torch.no_grad()
def pipeline_forward(pipe, transformer, noisy, t, embeds, pooled):
    """The denoiser call as each pipeline's denoising loop writes it (FLUX: packed latents,
    timestep / 1000, the embedded guidance 3.5)."""
    if isinstance(pipe, StableDiffusion3Pipeline):
        return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
    b, c, h, w = noisy.shape
    guidance = torch.full([1], 3.5, dtype=torch.float32).expand(b) if transformer.config.guidance_embeds else None
    out = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t / 1000, guidance=guidance,
        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32), return_dict=False,
    )[0]
    scale = pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)


def pipeline_embeds(pipe, prompts):
    if isinstance(pipe, StableDiffusion3Pipeline):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", max_sequence_length=SHORT_T5,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=SHORT_T5)
    return embeds, pooled


def assert_pipeline_denoiser_is_the_trained_policy(job, pipe, transformer) -> None:
    """On the same noisy latents, timesteps and prompts (encoded by the pipeline), the
    pipeline's transformer (with the saved weights loaded the diffusers way) equals snpo's own
    trained policy, and both differ from the base model."""
    g = torch.Generator().manual_seed(7)
    noisy = torch.randn(2, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g)
    t = torch.tensor([300.0, 850.0])
    embeds, pooled = pipeline_embeds(pipe, ["a red cat", "prompt 3"])
    backbone = job.backbone
    model = job.built.model if job.built.model is not None else backbone.denoiser
    with torch.no_grad():
        policy = backbone.predict(model.eval(), noisy, t, {"encoder_hidden_states": embeds, "pooled_projections": pooled})
        with backbone.reference() as reference:
            base = backbone.predict(reference, noisy, t, {"encoder_hidden_states": embeds, "pooled_projections": pooled})
    loaded = pipeline_forward(pipe, transformer, noisy, t, embeds, pooled)
    torch.testing.assert_close(loaded, policy, atol=1e-5, rtol=1e-4)
    assert (loaded - base).abs().max() > 1e-3  # training changed the denoiser


def check_run(out, *, steps: int = 3) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert all(np.isfinite(m["loss"]) for m in lines)
    card = (out / "README.md").read_text()
    assert "unreadable_image 1" in card  # met while training, substituted and counted
    return lines


# ---- SD3: every single-network objective, LoRA and full fine-tune -----------------------------
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("method", SINGLE)
def test_sd3_every_objective_trains_and_changes_the_pipeline(method, lora, sd3_model, pickapic, root, capsys):
    out = root / f"sd3-{method}-{'lora' if lora else 'full'}"
    values = train_values(sd3_model, pickapic, out, method=method, lora_rank=4 if lora else 0,
                          learning_rate=1e-2 if lora else 1e-3)
    assert main(["train", *cli_args(values)]) == 0
    assert "kept 6 of 10 pairs; skipped: tie 2, empty_caption 1, bad_label 1" in capsys.readouterr().out
    lines = check_run(out)
    assert sum(m["branch/negative_fraction"] for m in lines) > 0  # the null branch was trained
    card = (out / "README.md").read_text()
    pipe = pipeline(sd3_model)
    before = images(pipe)
    if lora:
        assert "load_lora_weights" in card
        pipe.load_lora_weights(out)
    else:
        assert "SD3Transformer2DModel.from_pretrained" in card and "subfolder='transformer'" in card
        pipe = StableDiffusion3Pipeline.from_pretrained(
            sd3_model, transformer=SD3Transformer2DModel.from_pretrained(out, subfolder="transformer"))
        pipe.set_progress_bar_config(disable=True)
    assert np.abs(images(pipe) - before).max() > 1e-3


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sd3_pipeline_denoiser_equals_the_trained_policy(lora, sd3_model, pickapic, root):
    out = root / f"sd3-policy-{lora}"
    values = train_values(sd3_model, pickapic, out, method="snpo", lora_rank=4 if lora else 0,
                          learning_rate=1e-2 if lora else 1e-3)
    job = build_job(load_config(TrainConfig, None, values), show_progress=False)
    job.trainer.train()
    pipe = pipeline(sd3_model)
    if lora:
        pipe.load_lora_weights(out)
        transformer = pipe.transformer
    else:
        transformer = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    assert_pipeline_denoiser_is_the_trained_policy(job, pipe, transformer)


# ---- FLUX: dpo (no null branch), snpo with true CFG ---------------------------------------------
def test_flux_dpo_lora_loads_into_the_pipeline_and_equals_the_trained_policy(flux_model, pickapic, root, capsys):
    out = root / "flux-dpo"
    values = train_values(flux_model, pickapic, out, method="dpo", cfg_dropout=0.0)
    job = build_job(load_config(TrainConfig, None, values), show_progress=False)
    assert not job.backbone.has_null_branch and job.backbone.embedded_guidance_scale == 3.5
    job.trainer.train()
    lines = check_run(out)
    assert all(m["branch/negative_fraction"] == 0 for m in lines)
    pipe = pipeline(flux_model)
    before = images(pipe)  # FLUX.1-dev's own sampling: embedded guidance 3.5, no null branch
    pipe.load_lora_weights(out)
    assert np.abs(images(pipe) - before).max() > 1e-3
    assert_pipeline_denoiser_is_the_trained_policy(job, pipe, pipe.transformer)


def test_flux_snpo_with_true_cfg_full_fine_tune(flux_model, pickapic, root):
    out = root / "flux-snpo-true-cfg"
    values = train_values(flux_model, pickapic, out, method="snpo", true_cfg=True, lora_rank=0,
                          learning_rate=1e-3)
    job = build_job(load_config(TrainConfig, None, values), show_progress=False)
    assert job.backbone.has_null_branch
    job.trainer.train()
    lines = check_run(out)
    assert sum(m["branch/negative_fraction"] for m in lines) > 0
    card = (out / "README.md").read_text()  # how to sample it: true CFG, its T5 length and guidance
    assert "true_cfg_scale" in card and f"max_sequence_length={SHORT_T5}" in card and "guidance_scale=3.5" in card
    transformer = FluxTransformer2DModel.from_pretrained(out, subfolder="transformer")
    pipe = pipeline(flux_model)
    true_cfg = {"negative_prompt": "", "true_cfg_scale": 3.0}
    before = images(pipe, **true_cfg)
    tuned = FluxPipeline.from_pretrained(flux_model, transformer=transformer)
    tuned.set_progress_bar_config(disable=True)
    assert np.abs(images(tuned, **true_cfg) - before).max() > 1e-3
    assert_pipeline_denoiser_is_the_trained_policy(job, pipe, transformer)


# ---- the null condition training uses is the one the sampler feeds --------------------------------
def recorded_null_branch(pipe, **kwargs) -> dict[str, torch.Tensor]:
    """What the pipeline's own sampling loop feeds its transformer on the unconditional
    branch (first step), recorded by a forward pre-hook."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: calls.append({k: kw[k].clone() for k in ("encoder_hidden_states", "pooled_projections")}),
        with_kwargs=True)
    try:
        pipe("a red cat", num_inference_steps=1, height=RESOLUTION, width=RESOLUTION, max_sequence_length=SHORT_T5,
             generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        hook.remove()
    if isinstance(pipe, StableDiffusion3Pipeline):  # CFG batches [negative, positive]
        return {k: v.chunk(2)[0][0] for k, v in calls[0].items()}
    return {k: v[0] for k, v in calls[1].items()}  # FLUX true CFG: positive call, then negative


@pytest.mark.parametrize("family", ["sd3", "flux-true-cfg"])
def test_training_null_condition_is_what_the_sampler_feeds_the_null_branch(family, sd3_model, flux_model, pickapic):
    """The condition snpo's training step gives the denoiser on the null branch (through the
    method's select_condition path) equals, tensor for tensor, what the diffusers pipeline's
    sampling loop feeds its unconditional branch."""
    from snpo.data import (
        PairedTransform,
        PreferencePairDataset,
        collate_pairs,
        load_preference_source,
    )

    model = sd3_model if family == "sd3" else flux_model
    backbone = load_backbone(model, options={"max_sequence_length": SHORT_T5, "true_cfg": True})
    backbone.prepare_for_training(lora_rank=4)
    pipe = pipeline(model)
    sampler_null = recorded_null_branch(
        pipe, **({"guidance_scale": 5.0} if family == "sd3" else {"negative_prompt": "", "true_cfg_scale": 2.0}))
    source = load_preference_source(str(pickapic))
    source.scan()
    dataset = PreferencePairDataset(source, PairedTransform(RESOLUTION), seed=0, on_unreadable="substitute")
    batch = collate_pairs([dataset[0], dataset[1]])
    seeds = [11, 12]
    chosen = backbone.encode_batch(batch)[0]
    assert bool(draw_pairs(backbone, chosen, 0.999, seeds).coin.all())  # both pairs on the null branch
    fed = []
    original = backbone.predict

    def spy(model_, noisy, t, cond):
        fed.append({k: v.detach().clone() for k, v in cond.items()})
        return original(model_, noisy, t, cond)

    backbone.predict = spy
    method = SingleNetworkMethod(backbone, ObjectiveConfig("snpo", 500.0), 0.999)
    method.compute_loss(backbone.denoiser, batch, seeds)
    assert len(fed) == 2  # policy and reference, 2B rows each
    for cond in fed:
        for key, expected in sampler_null.items():
            assert cond[key].shape[0] == 4
            for row in cond[key]:
                torch.testing.assert_close(row, expected, atol=1e-6, rtol=1e-6)
    # and the prompt's own condition differs from it (the test would pass vacuously otherwise)
    prompt_cond = backbone.encode_prompts(["a red cat"])
    assert not torch.allclose(prompt_cond["pooled_projections"][0], sampler_null["pooled_projections"], atol=1e-4)


# ---- what a FLUX model without true CFG cannot train -----------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    import snpo.training.job as job

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the method was checked")

    monkeypatch.setattr(job, "load_backbone", forbidden)


@pytest.mark.parametrize("method, extra, needle", [
    ("snpo", {}, "method: snpo trains the network of CFG's null"),
    ("snpo-naive", {}, "method: snpo-naive trains"),
    ("chats", {}, "method: chats trains"),
    ("npo-negative", {"cfg_dropout": 0.0}, "method: npo-negative trains"),
    ("dpo", {"cfg_dropout": 0.2}, "cfg_dropout: this flux model samples without a null branch"),
])
def test_flux_without_true_cfg_refuses_null_branch_training_before_loading(
        method, extra, needle, flux_model, pickapic, tmp_path, capsys, no_model_load):
    values = train_values(flux_model, pickapic, tmp_path / "out", method=method, **extra)
    capsys.readouterr()
    assert main(["train", *cli_args(values)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "true_cfg: true" in err[0], err
    assert not (tmp_path / "out").exists()


def test_flux_settings_reach_the_backbone(flux_model, sd3_model, pickapic, tmp_path):
    """The config's flow keys are the loaded backbone's settings (training and caching load
    through the same function)."""
    from snpo.training.job import load_job_backbone

    config = load_config(TrainConfig, None, train_values(
        flux_model, pickapic, tmp_path / "o", method="snpo", true_cfg=True, embedded_guidance_scale=2.0,
        weighting_scheme="mode", mode_scale=0.5, logit_mean=0.3, logit_std=0.7))
    flux = load_job_backbone(config, "flux")
    assert (flux.true_cfg, flux.embedded_guidance_scale, flux.max_sequence_length) == (True, 2.0, SHORT_T5)
    assert (flux.weighting_scheme, flux.mode_scale, flux.logit_mean, flux.logit_std) == ("mode", 0.5, 0.3, 0.7)
    config = load_config(TrainConfig, None, train_values(sd3_model, pickapic, tmp_path / "o", use_t5=False,
                                                         max_sequence_length=None))
    sd3 = load_job_backbone(config, "sd3")
    assert sd3.text_encoder_3 is None and not sd3.uses_t5 and sd3.max_sequence_length == 256
    with pytest.raises(ValueError, match="weighting_scheme"):
        load_config(TrainConfig, None, train_values(sd3_model, pickapic, tmp_path / "o", weighting_scheme="cosmap"))
