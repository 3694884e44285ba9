"""What ``snpo train`` writes loads, in diffusers' own loaders, into exactly the policy snpo
trained: the denoiser output of the diffusers-loaded network equals the output of snpo's
trained policy (the backbone's denoiser after the run, in memory) on the same inputs.

``pipe.load_lora_weights`` and peft only WARN on keys they do not recognise, so a LoRA file
with misnamed or missing layers still "changes the image"; comparing outputs does not let a
half-loaded LoRA pass. A full fine-tune is read back with
``UNet2DConditionModel.from_pretrained(out, subfolder="unet")``. SD1.5-like and SDXL-like
tiny pipelines (the flow-matching families' round trips: ``test_flow_backbones.py``).

Tolerance: 1e-5 absolute and relative (the same float32 network through two loaders; the
outputs measured bitwise equal). Control: the trained policy differs from the base model by
more than 1e-2 on the same inputs (measured 0.1 to 0.5), so a loader that dropped part of the
LoRA could not meet the tolerance. Planted and caught: the LoRA file without the
cross-attention layers, the LoRA file with misnamed self-attention keys (both still pass the
"the image changed" tests of ``test_train_cli.py``), and a full fine-tune that saves the
frozen reference instead of the policy.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from fixtures_data import make_pickapic_parquet
from snpo.configuration import load_config
from snpo.training.config import TrainConfig
from snpo.training.job import build_job
from tiny_pipelines import RESOLUTION, make_sd15, make_sdxl

ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.parquet"
    make_pickapic_parquet(path, 6, with_ties=False)
    return path


def train(model, data, out, **overrides):
    """``snpo train``'s own job (build_job: data scan, backbone, method, trainer), run in
    process so the trained policy is at hand; returns the job."""
    values = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                  resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler="constant", beta=500, checkpointing_steps=0, report_to="none",
                  method="snpo", cfg_dropout=0.5, max_steps=2, seed=0)
    values.update(overrides)
    job = build_job(load_config(TrainConfig, None, values), show_progress=False)
    job.trainer.train()
    return job


def inputs(pipe, family):
    """Noisy latents, timesteps and the pipeline's own conditioning for two prompts."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g)
    t = torch.tensor([25, 640])
    prompts = ["a red cat", "prompt 3"]
    with torch.no_grad():
        if family == "sd":
            hidden, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            return x, t, {"encoder_hidden_states": hidden}
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[20.0, 28.0, 2.0, 0.0, RESOLUTION, RESOLUTION],
                             [RESOLUTION, RESOLUTION, 0.0, 0.0, RESOLUTION, RESOLUTION]])
    return x, t, {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": time_ids}


def unet_out(unet, x, t, cond):
    """A raw diffusers UNet forward, as the pipelines call it."""
    extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
    kwargs = {"added_cond_kwargs": extra} if extra else {}
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], **kwargs).sample


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_diffusers_loaded_network_is_the_trained_policy(family, kind, tmp_path, pickapic):
    maker, pipeline_class = (make_sd15, StableDiffusionPipeline) if family == "sd" else (make_sdxl, StableDiffusionXLPipeline)
    model = maker(tmp_path / "model")
    out = tmp_path / "out"
    job = train(model, pickapic, out, lora_rank=4 if kind == "lora" else 0,
                learning_rate=1e-2 if kind == "lora" else 1e-3)
    backbone = job.backbone
    policy_net = backbone.denoiser.eval()

    pipe = pipeline_class.from_pretrained(model)
    x, t, cond = inputs(pipe, family)
    base = unet_out(pipe.unet, x, t, cond)
    with torch.no_grad():
        policy = backbone.predict(policy_net, x, t, cond)
    assert (policy - base).abs().max() > 1e-2  # control: training moved the network

    if kind == "lora":
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(out)
        loaded = unet_out(pipe.unet, x, t, cond)
    else:
        unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
        loaded = unet_out(unet, x, t, cond)
    torch.testing.assert_close(loaded, policy, atol=ATOL, rtol=RTOL)
