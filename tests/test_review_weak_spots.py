"""Checks the review of issue 16 found too weak, made as strong as their claims.

- bf16 + gradient checkpointing: the first step's gradients against the float32 run without
  checkpointing (not only "finite"): checkpointing alone changes nothing (bitwise), and
  bf16 stays within a stated bound of float32.
- sampling with other schedulers (Euler, DPM++, UniPC, PNDM): snpo's sampler against the
  diffusers pipeline with the same scheduler swapped in (``Scheduler.from_config(
  pipe.scheduler.config)``), not only "finite".
- a resume from an older checkpoint REWRITES the newer checkpoints (the old test compared
  them before and after, which an untouched folder passes too).
- SDXL: a run from the latent/text cache trains the same LoRA as an uncached run, with
  per-image time_ids (images of different sizes) and random flips (proven for SD1.5 in
  ``test_cache.py``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import colour_pairs
from fixtures_data import encode, make_pickapic_parquet
from snpo.backbones import load_backbone
from snpo.configuration import load_config
from snpo.methods.single import SingleNetworkMethod
from snpo.sampling import SamplerSettings, sample_latents, single_network_guide
from snpo.toy.data import stack_batch
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.job import build_job
from snpo.training.run import run_cache, run_train
from snpo.training.trainer import Callback, Trainer
from tiny_pipelines import RESOLUTION, make_sd15, make_sdxl


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return make_sd15(tmp_path_factory.mktemp("sd") / "model")


def sd_config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                  resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-3,
                  lr_scheduler="constant", beta=500, checkpointing_steps=0, report_to="none",
                  method="snpo", cfg_dropout=0.5, max_steps=1, seed=0, lora_rank=4)
    values.update(overrides)
    return load_config(TrainConfig, None, {k: v for k, v in values.items() if v is not None})


# ---- bf16 + gradient checkpointing ----------------------------------------------------------
class FirstGradients(Callback):
    """The trainable parameters' gradients of the first optimizer step (before clipping)."""

    def __init__(self) -> None:
        self.backbone = None
        self.grads: dict[str, torch.Tensor] | None = None
        self.dtypes: set[torch.dtype] = set()

    def before_optimizer(self) -> None:
        if self.grads is None:
            trainable = [(n, p) for n, p in self.backbone.denoiser.named_parameters() if p.requires_grad]
            self.dtypes = {p.dtype for _, p in trainable} | {p.grad.dtype for _, p in trainable if p.grad is not None}
            self.grads = {n: p.grad.detach().double().clone() for n, p in trainable if p.grad is not None}


def first_gradients(model, data, out, **overrides) -> dict[str, torch.Tensor]:
    spy = FirstGradients()
    job = build_job(sd_config(model, data, out, **overrides), callbacks=[spy], show_progress=False,
                    save_model=False, write_logs=False)
    spy.backbone = job.backbone
    job.trainer.train()
    assert spy.grads
    # trainable weights and their gradients stay float32 under mixed precision (bf16 weights
    # would swallow updates of lr ~ 1e-8 entirely; the saved file is float32 either way)
    assert spy.dtypes == {torch.float32}
    return spy.grads


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def test_bf16_and_gradient_checkpointing_give_the_float32_gradients(tmp_path, sd_model):
    """One LoRA step of snpo on both branches (batch 2, accumulation 2, p = 0.5).

    - fp32 with checkpointing equals fp32 without, bitwise (recomputation is exact);
    - bf16 with checkpointing equals bf16 without, bitwise;
    - bf16 against fp32: cosine > 0.99 and relative L2 error < 15% over all LoRA gradients,
      every adapted layer's gradient within 30% (measured: cosine 0.9975, 7.5% overall,
      16% for the worst layer). At initialisation (lora_B = 0) the gradient is the
      DIFFERENCE of the winner's and loser's error gradients, which bf16 resolves worst;
      the set of parameters that get a gradient is the same in every run.
    """
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    common = dict(gradient_accumulation_steps=2)
    fp32 = first_gradients(sd_model, data, tmp_path / "a", **common)
    fp32_ckpt = first_gradients(sd_model, data, tmp_path / "b", gradient_checkpointing=True, **common)
    bf16 = first_gradients(sd_model, data, tmp_path / "c", mixed_precision="bf16", **common)
    bf16_ckpt = first_gradients(sd_model, data, tmp_path / "d", mixed_precision="bf16",
                                gradient_checkpointing=True, **common)
    assert fp32.keys() == fp32_ckpt.keys() == bf16.keys() == bf16_ckpt.keys()
    nonzero = {k for k, g in fp32.items() if g.abs().max() > 0}
    assert len(nonzero) >= len(fp32) // 2  # lora_B (lora_A's gradient is zero while B = 0)
    for grads in (fp32_ckpt, bf16, bf16_ckpt):
        assert {k for k, g in grads.items() if g.abs().max() > 0} == nonzero
    assert all(torch.equal(fp32[k], fp32_ckpt[k]) for k in fp32)
    assert all(torch.equal(bf16[k], bf16_ckpt[k]) for k in bf16)

    a, b = flat(fp32), flat(bf16_ckpt)
    cosine = float(a @ b / (a.norm() * b.norm()))
    relative = float((a - b).norm() / a.norm())
    assert cosine > 0.99 and relative < 0.15, (cosine, relative)
    worst = max(float((fp32[k] - bf16_ckpt[k]).norm() / fp32[k].norm()) for k in nonzero)
    assert worst < 0.3, worst


# ---- sampling schedulers against the pipeline -------------------------------------------------
@pytest.mark.parametrize("name, class_name", [
    ("euler", "EulerDiscreteScheduler"), ("dpm++", "DPMSolverMultistepScheduler"),
    ("unipc", "UniPCMultistepScheduler"), ("pndm", "PNDMScheduler"),
])
def test_other_schedulers_sample_what_the_pipeline_samples(sd_model, name, class_name):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_model, safety_checker=None)
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds, steps, scale = ["a red cat", "prompt 3"], [3, 8], 6, 5.0
    expected = torch.cat([
        pipe(p, num_inference_steps=steps, guidance_scale=scale, height=RESOLUTION, width=RESOLUTION,
             generator=torch.Generator().manual_seed(s), output_type="latent").images
        for p, s in zip(prompts, seeds)])
    backbone = load_backbone(sd_model)
    guide = single_network_guide(backbone, backbone.denoiser, scale)
    settings = SamplerSettings(num_inference_steps=steps, guidance_scale=scale, scheduler=name, batch_size=2)
    got = sample_latents(backbone, guide, prompts, seeds, (4, RESOLUTION // 2, RESOLUTION // 2), settings)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # control: another scheduler's samples differ by far more than the tolerance
    ddim = SamplerSettings(num_inference_steps=steps, guidance_scale=scale, scheduler="ddim", batch_size=2)
    other = sample_latents(backbone, guide, prompts, seeds, (4, RESOLUTION // 2, RESOLUTION // 2), ddim)
    assert (other - expected).abs().max() > 1e-2


# ---- a resume rewrites the newer checkpoints ----------------------------------------------
def toy_run(backbone, out, **overrides):
    values = dict(method="snpo", cfg_dropout=0.3, per_device_train_batch_size=4, learning_rate=1e-3,
                  lr_scheduler="linear", lr_warmup_steps=2, beta=500.0, max_steps=6, report_to="none",
                  seed=0, checkpointing_steps=2)
    values.update(overrides)
    config = TrainConfig(output_dir=str(out), **values)
    method = SingleNetworkMethod(backbone, config.objective_config, config.cfg_dropout)
    return Trainer(config, backbone, colour_pairs(12), method, collate_fn=stack_batch, show_progress=False,
                   save_model=True, write_logs=False).train()


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resuming_from_an_older_checkpoint_rewrites_the_newer_ones(tiny_toy, tmp_path):
    """Checkpoints 4 and 6 are replaced by the replay: a marker put in each is gone, and every
    file (scrambled before the resume) is written again, byte for byte as the uninterrupted
    run wrote it: weights, optimizer, schedule and the global RNG states. (The RNG files
    exposed a bug: the resumed run's extra data-loader iterator drew its base seed from the
    global torch RNG after the restore; the loader now has its own generator.)"""
    fresh = copy.deepcopy(tiny_toy)
    out = tmp_path / "run"
    toy_run(tiny_toy, out)
    root = out / "checkpoints"
    original = {step: folder_bytes(path) for step, path in ckpt.list_checkpoints(root)}
    assert sorted(original) == [2, 4, 6]
    for step in (4, 6):
        folder = root / f"checkpoint-{step}"
        (folder / "untouched.marker").write_text("written before the resume")
        for name in (ckpt.OPTIMIZER_FILE, *[n for n in original[step] if n.endswith(".safetensors")]):
            path = folder / name
            if path.is_file():
                path.write_bytes(b"\0" * len(path.read_bytes()))  # scrambled: a copy that was kept would show
    toy_run(copy.deepcopy(fresh), out, resume_from_checkpoint=str(root / "checkpoint-2"))
    after = {step: folder_bytes(path) for step, path in ckpt.list_checkpoints(root)}
    assert sorted(after) == [2, 4, 6]
    for step in (4, 6):
        assert "untouched.marker" not in after[step], step
        assert after[step].keys() == original[step].keys()
        for name, content in original[step].items():
            if name == ckpt.STATE_FILE:
                state, before = json.loads(after[step][name]), json.loads(content)
                assert state["global_step"] == before["global_step"] == step
                continue
            assert after[step][name] == content, (step, name)  # the replay writes the same bytes
    assert after[2] == original[2]  # the checkpoint resumed from is left alone


# ---- SDXL: cached training equals uncached --------------------------------------------------
def make_sized_pickapic(path, n: int) -> None:
    """Pick-a-Pic rows of random-noise images whose sizes differ by row and by column, so each
    image has its own SDXL time_ids (original size and centre-crop offset)."""
    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    sizes = [(20, 28), (32, 18), (24, 24), (18, 30)]
    for i in range(n):
        rows["caption"].append(f"prompt {i % 3}")
        for j, col in enumerate(("jpg_0", "jpg_1")):
            h, w = sizes[(i + j) % len(sizes)]
            rows[col].append(encode(Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)), "PNG"))
        rows["label_0"].append(float(i % 2))
        rows["label_1"].append(float(1 - i % 2))
    pq.write_table(pa.table(rows), path)


def test_sdxl_cached_training_matches_uncached(tmp_path):
    model = make_sdxl(tmp_path / "xl")
    data = tmp_path / "train.parquet"
    make_sized_pickapic(data, 8)
    cache_dir = tmp_path / "cache"
    common = dict(learning_rate=1e-2, max_steps=3, random_flip=True, adam_epsilon=1e-5,
                  cache_shard_size=4, cache_batch_size=3)
    run_cache(sd_config(model, data, tmp_path / "o", cache_dir=str(cache_dir), **common), show_progress=False)
    plain = run_train(sd_config(model, data, tmp_path / "plain", **common), show_progress=False)
    cached = run_train(sd_config(model, data, tmp_path / "cached", cache_dir=str(cache_dir), **common),
                       show_progress=False)
    assert plain.global_step == cached.global_step == 3
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # float noise only (tolerance as test_cache.py's SD1.5 test)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in cached.history], abs=1e-4)
    # control: the same uncached run without flips is far outside that tolerance
    run_train(sd_config(model, data, tmp_path / "noflip", **{**common, "random_flip": False}), show_progress=False)
    c = load_file(tmp_path / "noflip" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
