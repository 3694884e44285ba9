"""The flow-matching toy backbone: registry and save/load, the sampler against the Euler
update written out by hand, learning the rectified-flow target, and one preference step."""

from __future__ import annotations

import math

import torch

from conftest import TINY, WORDS, colour_pairs
from snpo.backbones import detect_family, load_backbone
from snpo.backbones.base import per_sample_mse
from snpo.backbones.toy_flow import ToyFlowBackbone
from snpo.sampling import sample_latents, single_network_guide
from snpo.toy.data import stack_batch
from snpo.toy.tokenizer import build_toy_tokenizer

try:  # the sampling loop's settings (renamed from SamplingConfig during a refactor)
    from snpo.sampling import SamplerSettings
except ImportError:  # pragma: no cover
    from snpo.sampling import SamplingConfig as SamplerSettings

FLOW = "FlowMatchEulerDiscreteScheduler"


def _toy(tmp_path, shift: float = 2.0) -> ToyFlowBackbone:
    tokenizer = build_toy_tokenizer(WORDS, tmp_path / "tok", max_length=TINY.max_prompt_tokens)
    return ToyFlowBackbone.create(tokenizer, TINY, seed=0, shift=shift)


def test_registry_and_round_trip(tmp_path):
    toy = _toy(tmp_path)
    assert toy.prediction_type == "flow_prediction" and toy.has_null_branch
    toy.save_pretrained(tmp_path / "m")
    assert detect_family(tmp_path / "m") == "toy-flow"
    loaded = load_backbone(tmp_path / "m")
    assert isinstance(loaded, ToyFlowBackbone) and loaded.noise_scheduler.config.shift == 2.0
    x, t = torch.randn(2, 12, 4, 4), torch.tensor([10.0, 90.0])
    with torch.no_grad():
        cond = toy.encode_prompts(["a red square", "a blue circle"])
        torch.testing.assert_close(loaded.predict(loaded.denoiser, x, t, cond), toy.predict(toy.denoiser, x, t, cond))
    assert loaded.describe()["shift"] == 2.0


@torch.no_grad()
def test_sampler_is_the_euler_update_written_out(tmp_path):
    toy = _toy(tmp_path, shift=2.0)
    prompts, seeds, steps, scale = ["a red square", "a blue circle"], [3, 4], 4, 3.0
    shape = (12, 4, 4)
    config = SamplerSettings(num_inference_steps=steps, guidance_scale=scale, scheduler=FLOW, batch_size=2)
    latents = sample_latents(toy, single_network_guide(toy, toy.denoiser, scale), prompts, seeds, shape, config)
    # by hand: N = 100 train steps; unshifted sigmas from 1 down to 1/N, then shifted,
    # then 0; x <- x + (sigma_next - sigma) * v, v = CFG of the velocity; t = sigma * N
    n_train, shift = TINY.num_train_timesteps, 2.0
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    unshifted = torch.linspace(1.0, shifted(torch.tensor(1 / n_train)).item(), steps, dtype=torch.float64)
    sigmas = torch.cat([shifted(unshifted), torch.zeros(1, dtype=torch.float64)])
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    cond = toy.encode_prompts(prompts)
    null = toy.null_condition(cond)
    for i in range(steps):
        t = torch.full((2,), float(sigmas[i] * n_train))
        c = toy.predict(toy.denoiser, x.float(), t, cond).double()
        u = toy.predict(toy.denoiser, x.float(), t, null).double()
        x = x + (sigmas[i + 1] - sigmas[i]) * (u + scale * (c - u))
    torch.testing.assert_close(latents.double(), x, atol=2e-4, rtol=2e-4)


def test_learns_the_rectified_flow_target(tmp_path):
    """A few Adam steps on one image lower the flow-matching loss on fixed held-out draws."""
    torch.manual_seed(0)
    toy = _toy(tmp_path)
    params = toy.prepare_for_training(lora_rank=0)
    optimizer = torch.optim.Adam(params, lr=5e-3)
    pixels = torch.zeros(8, 3, 8, 8)
    pixels[:, 0] = 0.8  # one red image, eight copies
    with torch.no_grad():
        x0 = toy.encode_images(pixels)
        cond = toy.encode_prompts(["a red square"] * 8)

    def loss_at(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        noise, t = torch.randn(x0.shape, generator=g), toy.sample_timesteps(8, g)
        prediction = toy.predict(toy.denoiser, toy.add_noise(x0, noise, t), t, cond)
        return per_sample_mse(prediction, toy.training_target(x0, noise, t)).mean()

    with torch.no_grad():
        before = sum(float(loss_at(10_000 + i)) for i in range(4))
    for step in range(80):
        loss = loss_at(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = sum(float(loss_at(10_000 + i)) for i in range(4))
    assert after < 0.5 * before


def test_one_preference_step(tmp_path):
    from snpo.methods.single import SingleNetworkMethod
    from snpo.objectives import ObjectiveConfig

    toy = _toy(tmp_path)
    params = toy.prepare_for_training(lora_rank=4)
    method = SingleNetworkMethod(toy, ObjectiveConfig("snpo", 2000.0), 0.5)
    data = colour_pairs(4)
    loss, _ = method.compute_loss(toy.denoiser, stack_batch([data[i] for i in range(4)]), [0, 1, 2, 3])
    assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5)  # LoRA B = 0: policy = reference
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_demo_flow_runs_the_study_on_the_flow_toy(tmp_path):
    """`snpo demo --flow true`: the world's reference is the flow-matching toy (its own cache
    entry), saved and reloaded as one, and every sampler of the study (the pairs' images, the
    evaluation) is its Euler sampler. (The whole `snpo demo --quick --flow true` takes minutes
    on this CPU, so the pieces are tested here.)"""
    from dataclasses import replace

    import numpy as np

    from snpo.sampling import sample_images
    from snpo.toy.demo import DemoConfig
    from snpo.toy.evaluator import Evaluator
    from snpo.toy.scenes import all_scenes
    from snpo.toy.study import world_config
    from snpo.toy.world import load_toy, pretrain_reference, sample_with_scales

    world = world_config(DemoConfig(flow=True), 0)
    assert world.flow and world.pretrain_key() != world_config(DemoConfig(), 0).pretrain_key()
    small = replace(world, model=replace(TINY, resolution=8), pretrain_steps=2, pretrain_images=16,
                    pretrain_batch_size=8)
    backbone = pretrain_reference(small, tmp_path / "reference", show_progress=False)
    loaded = load_toy(tmp_path / "reference")
    assert isinstance(backbone, ToyFlowBackbone) and isinstance(loaded, ToyFlowBackbone)
    assert isinstance(load_toy(tmp_path / "reference" / "weak"), ToyFlowBackbone)
    prompts, seeds = [s.caption for s in all_scenes()[:2]], [5, 6]
    images = sample_with_scales(loaded, prompts, seeds, np.array([3.0, 3.0]), 4)
    shape = (TINY.latent_channels, 4, 4)
    expected = sample_images(loaded, single_network_guide(loaded, loaded.denoiser, 3.0), prompts, seeds, shape,
                             SamplerSettings(4, 3.0, FLOW, batch_size=2))
    torch.testing.assert_close(images, expected)
    evaluator = Evaluator(loaded, loaded.denoiser, prompts, [0], None, steps=4, guidance_scale=3.0,
                          implicit_draws=1, seed=0)
    assert evaluator.sampling.scheduler == FLOW


def test_demo_quick_flow_end_to_end(tmp_path):
    """`snpo demo --quick --flow true` at test_demo.py's smallest sizes: the study runs on the
    flow toy and its report says so (sampler included)."""
    from snpo.cli import main

    code = main(["demo", "--quick", "--flow", "true", "--output_dir", str(tmp_path / "out"), "--cache_dir",
                 str(tmp_path / "cache"), "--show_progress", "false", "--pools", "pickapic-like",
                 "--pretrain_steps", "40", "--methods", "dpo,snpo", "--dual_baselines", "false"])
    assert code == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "flow-matching toy" in report and "flow-matching Euler" in report and "DDIM" not in report
    reference = next((tmp_path / "cache").glob("reference-*"))
    assert isinstance(load_backbone(reference), ToyFlowBackbone)
