"""``snpo sample`` and ``snpo merge`` on tiny SD3-like and FLUX-like pipelines.

What is checked against what: images of ``snpo sample`` (the family's defaults: the
flow-matching Euler scheduler and the pipeline's guidance) against what the diffusers pipeline
itself draws for the same prompt and seed, for a base model, a LoRA trained by ``snpo train``
and true CFG; the same seed gives the same image whatever else is drawn; ``snpo merge`` of
transformer LoRAs against the weights diffusers' own ``load_lora_weights`` + ``fuse_lora``
give.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors.torch import load_file

from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.evaluate import manifest as mf
from tiny_pipelines import RESOLUTION, make_flux, make_sd3

PROMPTS = ["a red cat", "prompt 3", "a cat"]
SHORT_T5 = 24
FLOW = "FlowMatchEulerDiscreteScheduler"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow-sample")


@pytest.fixture(scope="module")
def models(root) -> dict[str, Path]:
    return {"sd3": make_sd3(root / "sd3"), "flux": make_flux(root / "flux")}


@pytest.fixture(scope="module")
def prompts_txt(root) -> Path:
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def loras(root, models) -> dict[str, Path]:
    """LoRAs trained by `snpo train` (3 steps): SD3 snpo and dpo (Diff-NPO's positive run),
    SD3 npo-negative, FLUX dpo."""
    data = root / "train.parquet"
    make_pickapic_parquet(data, 8, bad_rows={"bad_label": 1})
    runs = {"sd3-snpo": ("sd3", "snpo", 0.5), "sd3-dpo": ("sd3", "dpo", 0.5),
            "sd3-npo": ("sd3", "npo-negative", 0.0), "flux-dpo": ("flux", "dpo", 0.0)}
    out = {}
    for name, (family, method, p) in runs.items():
        out[name] = root / name
        args = {"model_name_or_path": models[family], "dataset_name": data, "output_dir": out[name],
                "resolution": RESOLUTION, "method": method, "cfg_dropout": p, "lora_rank": 4, "max_steps": 3,
                "per_device_train_batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant",
                "beta": 500, "checkpointing_steps": 0, "report_to": "none", "max_sequence_length": SHORT_T5}
        assert main(["train", *[x for k, v in args.items() for x in (f"--{k}", str(v))]]) == 0
    return out


def sample(model: Path, prompts: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--model_name_or_path", str(model), "--prompts", str(prompts), "--output_dir", str(out),
                 "--show_progress", "false", "--resolution", str(RESOLUTION), "--max_sequence_length", str(SHORT_T5),
                 *extra])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def pipeline(model: Path, **kwargs):
    klass = StableDiffusion3Pipeline if model.name == "sd3" else FluxPipeline
    pipe = klass.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_pipeline_images(pipe, out: Path, seeds, steps: int, **call) -> None:
    for i, prompt in enumerate(PROMPTS):
        for seed in seeds:
            expected = pipe(prompt, num_inference_steps=steps, height=RESOLUTION, width=RESOLUTION,
                            max_sequence_length=SHORT_T5, generator=torch.Generator().manual_seed(seed), **call).images[0]
            got = pixels(out / mf.image_name(i, seed))
            assert np.abs(np.asarray(expected).astype(np.int64) - got).max() <= 1, (prompt, seed)  # 8-bit rounding


# ---- the family's defaults, and the pipelines' own images -------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_default_samples_are_the_pipelines_images(family, models, prompts_txt, root):
    """No scheduler or guidance given: SD3 samples as StableDiffusion3Pipeline does by default
    (its Euler flow scheduler, CFG 7.0 on the empty prompt), FLUX.1-dev as FluxPipeline does
    (embedded guidance 3.5, no null branch)."""
    out = root / f"{family}-default"
    assert sample(models[family], prompts_txt, out, "--seeds", "0,5", "--num_inference_steps", "3",
                  "--batch_size", "2") == 0
    records, bad = mf.read_jsonl(out / mf.MANIFEST)
    assert bad == 0 and len(records) == 6
    settings = records[0]["sampling"]
    expected = {"num_inference_steps": 3, "scheduler": FLOW, "resolution": RESOLUTION, "dtype": "float32",
                "max_sequence_length": SHORT_T5}
    if family == "sd3":
        expected |= {"guidance_scale": 7.0, "use_t5": True}
    else:
        expected |= {"guidance_scale": 1.0, "embedded_guidance_scale": 3.5, "true_cfg": False}
    assert settings == expected
    assert_pipeline_images(pipeline(models[family]), out, (0, 5), 3)


def test_flux_true_cfg_samples_are_the_pipelines_true_cfg_images(models, prompts_txt, root, capsys):
    out = root / "flux-true-cfg"
    assert sample(models["flux"], prompts_txt, out, "--seeds", "3", "--num_inference_steps", "3",
                  "--true_cfg", "true", "--guidance_scale", "2.5", "--embedded_guidance_scale", "2.0") == 0
    assert_pipeline_images(pipeline(models["flux"]), out, (3,), 3, negative_prompt="", true_cfg_scale=2.5,
                           guidance_scale=2.0)
    # without true CFG a FLUX.1-dev model has no null branch: a CFG scale is refused in one line
    capsys.readouterr()
    assert sample(models["flux"], prompts_txt, root / "flux-bad", "--guidance_scale", "5") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("snpo ")]
    assert len(err) == 1 and "guidance_scale:" in err[0] and "true_cfg: true" in err[0]
    assert not (root / "flux-bad").exists()


def test_sd3_same_seed_same_image_and_ddim_is_refused(models, prompts_txt, root, capsys):
    steps = ["--num_inference_steps", "3"]
    assert sample(models["sd3"], prompts_txt, root / "seeds-a", "--seeds", "0,1,2", "--batch_size", "2", *steps) == 0
    assert sample(models["sd3"], prompts_txt, root / "seeds-b", "--seeds", "2,7", "--batch_size", "3", *steps) == 0
    a = {p.name: p.read_bytes() for p in (root / "seeds-a" / mf.IMAGES).iterdir()}
    for i in range(len(PROMPTS)):  # seed 2 alone or among others, in batches of 2 or 3
        assert np.abs(pixels(root / "seeds-a/images" / f"p{i:05d}_s2.png")
                      - pixels(root / "seeds-b/images" / f"p{i:05d}_s2.png")).max() <= 1
    assert a["p00000_s0.png"] != a["p00000_s1.png"] and a["p00000_s0.png"] != a["p00001_s0.png"]
    capsys.readouterr()
    assert sample(models["sd3"], prompts_txt, root / "ddim", "--scheduler", "ddim", *steps) == 2
    assert "FlowMatchEulerDiscreteScheduler" in capsys.readouterr().err


# ---- trained weights: LoRA, Diff-NPO ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_samples_are_the_pipelines_images_with_the_lora(family, models, loras, prompts_txt, root):
    lora = loras["sd3-snpo" if family == "sd3" else "flux-dpo"]
    out = root / f"{family}-lora"
    assert sample(models[family], prompts_txt, out, "--lora", str(lora), "--seeds", "1", "--num_inference_steps", "3") == 0
    pipe = pipeline(models[family])
    pipe.load_lora_weights(lora)
    assert_pipeline_images(pipe, out, (1,), 3)
    base = root / f"{family}-base-1"  # the LoRA changed the images
    assert sample(models[family], prompts_txt, base, "--seeds", "1", "--num_inference_steps", "3") == 0
    assert any(np.abs(pixels(base / n) - pixels(out / n)).max() > 1 for n in
               (mf.image_name(i, 1) for i in range(len(PROMPTS))))


def test_merge_of_transformer_loras_is_diffusers_fused_weights(models, loras, root, capsys):
    """`snpo merge` on SD3: reference = the pipeline folder (transformer/), positive and NPO
    models = LoRAs with `transformer.` keys. Output: transformer/ with
    theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref), where each theta is
    what diffusers' load_lora_weights + fuse_lora make of the LoRA."""
    out = root / "merged"
    assert main(["merge", "--reference", str(models["sd3"]), "--positive", str(loras["sd3-dpo"]),
                 "--npo", str(loras["sd3-npo"]), "--a", "0.5", "--b", "1.0", "--output_dir", str(out)]) == 0
    assert "merged denoiser written to" in capsys.readouterr().out and (out / "transformer").is_dir()
    merged = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer").state_dict()

    def fused(lora: Path) -> dict[str, torch.Tensor]:
        pipe = pipeline(models["sd3"])
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}

    ref = pipeline(models["sd3"]).transformer.state_dict()
    pos, npo = fused(loras["sd3-dpo"]), fused(loras["sd3-npo"])
    changed = 0
    for key, value in ref.items():
        expected = value + 0.5 * (pos[key] - value) + 1.0 * (npo[key] - value)
        torch.testing.assert_close(merged[key], expected, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(merged[key], value)
    assert changed > 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["positive_kind"] == info["npo_kind"] == "lora"
    keys = load_file(loras["sd3-dpo"] / "pytorch_lora_weights.safetensors")
    assert all(k.startswith("transformer.") for k in keys)


def test_diff_npo_sampling_on_sd3(models, loras, prompts_txt, root):
    """`--npo_negative` with transformer LoRAs: the merged NPO model serves the null branch
    (the images differ from the positive LoRA's own CFG images)."""
    args = ["--lora", str(loras["sd3-dpo"]), "--seeds", "2", "--num_inference_steps", "3"]
    assert sample(models["sd3"], prompts_txt, root / "npo", *args, "--npo_negative", str(loras["sd3-npo"])) == 0
    assert sample(models["sd3"], prompts_txt, root / "pos", *args) == 0
    record = mf.read_jsonl(root / "npo" / mf.MANIFEST)[0][0]
    assert record["model"]["guide"] == "npo"
    a, b = pixels(root / "npo" / mf.image_name(0, 2)), pixels(root / "pos" / mf.image_name(0, 2))
    assert np.abs(a - b).max() > 0


def test_flux_without_true_cfg_has_no_null_branch_for_dual_model_guides(models, loras, prompts_txt, root, capsys):
    capsys.readouterr()
    assert sample(models["flux"], prompts_txt, root / "flux-npo", "--lora", str(loras["flux-dpo"]),
                  "--npo_negative", str(loras["flux-dpo"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("snpo ")]
    assert len(err) == 1 and "method: npo-negative samples a network on the null branch" in err[0]
    assert not (root / "flux-npo").exists()
