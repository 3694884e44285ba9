"""The single-network loss (Diff-SNPO, naive SNPO, Diff-DPO, Diff-BDPO, SFT), recomputed by hand.

``SingleNetworkMethod.compute_loss`` (the path every single-network method trains through)
is compared with a float64 evaluation of docs/method.md / METHOD.md built from the RAW
networks and the diffusers pipeline, for one batch, on tiny SD1.5-like (epsilon and
v-prediction), SDXL-like, SD3-like and FLUX-like models. Nothing the hand evaluation uses
comes from snpo:

- draws: per pair, a CPU generator seeded with the pair's seed gives, in this order, the
  noise (``randn`` of one pair's latent shape), the timestep (SD: ``randint(0, 1000)``; flow:
  ``u = sigmoid(normal(0, 1))``, ``index = int(1000 u)`` into the scheduler's table, the
  table written out below) and the branch coin (``rand < p``);
- latents from the pipeline's VAE (posterior mean, shift and scale from its config); the
  prompt condition and the null condition from the pipeline's own ``encode_prompt`` (SD1.5:
  the empty prompt; SDXL: zeros, time_ids kept; SD3/FLUX: the encoded empty prompt, pooled
  included); SDXL's time_ids written out per image;
- noising in float64 from the closed-form schedule (``alphas_cumprod`` of the scaled-linear
  betas; rectified flow ``(1 - sigma) x0 + sigma eps``) and the model's own target;
- the policy is the base network loaded from disk with ``scale * B @ A`` added to each
  adapted weight by hand, the reference the base network as loaded; both run in float64;
- the null condition on BOTH rows of a null-branch pair, the reference under the same
  condition, the winner/loser swap for snpo/snpo-naive only, and M(l) by its formula.

Tolerance: the code under test runs in float32. Its per-sample errors agree with float64 to
about 1e-7 relative, i.e. implicit rewards ``(beta/2) (e_ref - e_pol)`` to about
``beta * 1e-7``; with beta = 500 the measured gap is at most 1.6e-5 on every quantity of
every family, and the tolerance is 2e-4 (absolute, plus 1e-5 relative). Bugs planted in
the code under test and caught here: noise drawn per image, the null condition on the chosen
row only, the reference under the prompt, an epsilon target on a v-prediction model, the
winner/loser swap applied to dpo.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from peft.tuners.lora import LoraLayer

from snpo.backbones import load_backbone
from snpo.methods import get_method
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig
from tiny_pipelines import RESOLUTION, make_flux, make_sd3, make_sd15, make_sdxl

BETA = 500.0
LAMBDA = 0.9
P = 0.5
N_PAIRS = 6
#: chosen so that both branches occur for p = 0.5 (checked below, by the hand draw)
SEEDS = [1001, 1002, 1003, 1004, 1005, 1006]
PROMPTS = ["a red cat", "prompt 3", "a cat", "red", "a red prompt", "cat 3"]
SHORT_T5 = 24  # T5 tokens for SD3/FLUX (the default 256/512 costs time and tests nothing more)
ATOL, RTOL = 2e-4, 1e-5

#: (case id, objective, mix_scale): every registered single-network objective, and the
#: bounded term at the other reading of its likelihood scale
OBJECTIVE_CASES = [
    ("sft", "sft", None), ("dpo", "dpo", None), ("bdpo", "bdpo", None),
    ("snpo-naive", "snpo-naive", None), ("snpo", "snpo", None), ("snpo-k1", "snpo", 1.0),
]
METRIC_KEYS = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "branch/negative_fraction", "branch/conditional/loss", "branch/conditional/accuracy",
    "branch/negative/loss", "branch/negative/accuracy", "logratio/chosen", "logratio/rejected",
}


# ---- the float64 hand evaluation ---------------------------------------------------------------
def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """The tiny SD pipelines' schedule (beta 0.00085 -> 0.012, scaled linear, 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def flow_table_entry(index: int, shift: float, dynamic: bool) -> tuple[float, float]:
    """(timestep, sigma) of entry ``index`` of a fresh ``FlowMatchEulerDiscreteScheduler``'s
    1000-entry table: ``s = (1000 - index) / 1000``, shifted ``shift s / (1 + (shift - 1) s)``
    unless the scheduler shifts dynamically (FLUX: unshifted table); timestep = 1000 sigma."""
    s = (1000 - index) / 1000
    sigma = s if dynamic else shift * s / (1 + (shift - 1) * s)
    return 1000 * sigma, sigma


def hand_draw(seed: int, latent_shape, flow: dict | None):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(latent_shape, generator=g).double()
    if flow is None:
        t = int(torch.randint(0, 1000, (1,), generator=g))
        sigma = None
    else:  # logit-normal u, as train_dreambooth_lora_sd3/flux.py
        u = torch.sigmoid(torch.normal(mean=0.0, std=1.0, size=(1,), generator=g))
        index = min(int(float(u) * 1000), 999)
        t, sigma = flow_table_entry(index, flow["shift"], flow["dynamic"])
    negative = bool(torch.rand(1, generator=g) < P)
    return eps, t, sigma, negative


def lora_merged(base: torch.nn.Module, adapted: torch.nn.Module) -> torch.nn.Module:
    """``base`` (float64) with ``scale * B @ A`` of every peft LoRA layer of ``adapted`` added."""
    out = copy.deepcopy(base).double()
    state = out.state_dict()
    found = 0
    for name, module in adapted.named_modules():
        if isinstance(module, LoraLayer):
            a = module.lora_A["default"].weight.detach().double()
            b = module.lora_B["default"].weight.detach().double()
            state[f"{name}.weight"] += module.scaling["default"] * (b @ a)
            found += 1
    assert found > 0
    out.load_state_dict(state)
    return out


@dataclass
class Family:
    """What the hand evaluation needs of one model family."""

    name: str
    backbone: object  # the snpo backbone under test (LoRA with random B factors)
    batch: dict
    hand: dict  # per-pair float64 errors and branch labels


def hand_errors(pipe, family: str, batch: dict, backbone) -> dict:
    """Per-pair e_pol / e_ref of chosen and rejected, and the branch labels, in float64."""
    n = len(batch["prompt"])
    with torch.no_grad():
        pixels = torch.cat([batch["chosen_pixels"], batch["rejected_pixels"]])
        vae = pipe.vae
        mean = vae.encode(pixels).latent_dist.mean.double()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (mean - shift) * vae.config.scaling_factor
        prompts = list(batch["prompt"])
        inputs = _conditions(pipe, family, prompts, batch)
        denoiser = pipe.unet if family.startswith("sd15") or family == "sdxl" else pipe.transformer
        reference = copy.deepcopy(denoiser).double()
        policy = lora_merged(denoiser, backbone.denoiser)
    flow = None
    if family in ("sd3", "flux"):
        flow = {"shift": float(pipe.scheduler.config.shift),
                "dynamic": bool(pipe.scheduler.config.use_dynamic_shifting)}
    acp = scaled_linear_alphas_cumprod()
    v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    out = {k: [] for k in ("e_pol_c", "e_pol_r", "e_ref_c", "e_ref_r", "negative", "t")}
    for i in range(n):
        eps, t, sigma, negative = hand_draw(SEEDS[i], latents.shape[1:], flow)
        out["negative"].append(negative)
        out["t"].append(t)
        for role, row in (("c", i), ("r", n + i)):  # chosen row i, rejected row n + i
            x0 = latents[row]
            if flow is None:
                a = acp[t]
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
                target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v_prediction else eps
            else:
                x_t = (1 - sigma) * x0 + sigma * eps
                target = eps - x0
            # the null condition on BOTH rows of a null-branch pair
            cond = inputs["null" if negative else "cond"](row)
            with torch.no_grad():
                for net, key in ((policy, "e_pol"), (reference, "e_ref")):
                    pred = _forward(pipe, family, net, x_t[None], t, cond)[0]
                    out[f"{key}_{role}"].append(float((pred - target).pow(2).mean()))
    return out


def _conditions(pipe, family: str, prompts: list[str], batch: dict) -> dict:
    """``cond(row)`` and ``null(row)``: the inputs of image ``row`` (chosen rows first), float64."""
    n = len(prompts)
    if family.startswith("sd15"):
        positive, negative = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)
        hidden, null = positive.double(), negative.double()
        return {"cond": lambda row: {"hidden": hidden[row % n : row % n + 1]},
                "null": lambda row: {"hidden": null[row % n : row % n + 1]}}
    if family == "sdxl":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", negative_prompt=None)
        assert bool((negative == 0).all()) and bool((negative_pooled == 0).all())  # force_zeros_for_empty_prompt
        sizes = torch.cat([batch["chosen_original_size"], batch["rejected_original_size"]])
        crops = torch.cat([batch["chosen_crop_top_left"], batch["rejected_crop_top_left"]])

        def time_ids(row):  # (h, w, top, left, H, W): the image's own size and crop
            return torch.tensor([[*sizes[row].tolist(), *crops[row].tolist(), RESOLUTION, RESOLUTION]],
                                dtype=torch.float64)

        return {
            "cond": lambda row: {"hidden": embeds[row % n : row % n + 1].double(),
                                 "text_embeds": pooled[row % n : row % n + 1].double(), "time_ids": time_ids(row)},
            "null": lambda row: {"hidden": negative[row % n : row % n + 1].double(),
                                 "text_embeds": negative_pooled[row % n : row % n + 1].double(),
                                 "time_ids": time_ids(row)},
        }
    if family == "sd3":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="",
            max_sequence_length=SHORT_T5)
    else:  # flux: the encoded empty prompt is the true-CFG negative
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=SHORT_T5)
        negative, negative_pooled, _ = pipe.encode_prompt([""] * n, None, device="cpu", max_sequence_length=SHORT_T5)
    return {
        "cond": lambda row: {"hidden": embeds[row % n : row % n + 1].double(),
                             "pooled": pooled[row % n : row % n + 1].double()},
        "null": lambda row: {"hidden": negative[row % n : row % n + 1].double(),
                             "pooled": negative_pooled[row % n : row % n + 1].double()},
    }


def _forward(pipe, family: str, net, x, t, cond):
    """One raw denoiser forward in float64, as the family's pipeline calls it."""
    if family.startswith("sd15"):
        return net(x, torch.tensor([t]), encoder_hidden_states=cond["hidden"]).sample
    if family == "sdxl":
        return net(x, torch.tensor([t]), encoder_hidden_states=cond["hidden"],
                   added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    timestep = torch.tensor([t], dtype=torch.float64)
    if family == "sd3":
        return net(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["hidden"],
                   pooled_projections=cond["pooled"], return_dict=False)[0]
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    hidden = cond["hidden"]
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float64)
    out = net(hidden_states=packed, timestep=timestep / 1000, guidance=torch.full((b,), 3.5, dtype=torch.float64),
              pooled_projections=cond["pooled"], encoder_hidden_states=hidden,
              txt_ids=torch.zeros(hidden.shape[1], 3, dtype=torch.float64), img_ids=ids, return_dict=False)[0]
    vae_scale = pipe.vae_scale_factor
    return FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)


def hand_loss(hand: dict, objective: str, mix_scale: float | None) -> dict[str, float]:
    """METHOD.md's loss and metrics from per-pair float64 errors, in plain Python."""
    n = len(hand["negative"])
    k = BETA / 2 if mix_scale is None else mix_scale

    def reward(e_ref, e_pol):
        return BETA / 2 * (e_ref - e_pol)

    def bound(loser):  # M(l) = (beta / 2k) log(lam exp(r) + 1 - lam), r = (2k / beta) l
        r = 2 * k / BETA * loser
        return BETA / (2 * k) * math.log(LAMBDA * math.exp(r) + 1 - LAMBDA)

    rows = []
    for i in range(n):
        neg = hand["negative"][i]
        lc = reward(hand["e_ref_c"][i], hand["e_pol_c"][i])
        lr = reward(hand["e_ref_r"][i], hand["e_pol_r"][i])
        swap = neg and objective in ("snpo", "snpo-naive")
        winner, loser = (lr, lc) if swap else (lc, lr)
        if objective in ("bdpo", "snpo"):
            loser = bound(loser)
        z = winner - loser
        loss = hand["e_pol_c"][i] if objective == "sft" else math.log1p(math.exp(-z))
        rows.append(dict(neg=neg, lc=lc, lr=lr, z=z, loss=loss,
                         dc=hand["e_ref_c"][i] - hand["e_pol_c"][i], dr=hand["e_ref_r"][i] - hand["e_pol_r"][i]))

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else math.nan

    cond = [r for r in rows if not r["neg"]]
    null = [r for r in rows if r["neg"]]
    return {
        "loss": mean(r["loss"] for r in rows),
        "rewards/chosen": mean(r["lc"] for r in rows),
        "rewards/rejected": mean(r["lr"] for r in rows),
        "rewards/margins": mean(r["lc"] - r["lr"] for r in rows),
        "rewards/accuracies": mean(float(r["z"] > 0) for r in rows),
        "branch/negative_fraction": len(null) / n,
        "branch/conditional/loss": mean(r["loss"] for r in cond),
        "branch/conditional/accuracy": mean(float(r["z"] > 0) for r in cond),
        "branch/negative/loss": mean(r["loss"] for r in null),
        "branch/negative/accuracy": mean(float(r["z"] > 0) for r in null),
        "logratio/chosen": mean(r["dc"] for r in cond),
        "logratio/rejected": mean(r["dr"] for r in cond),
        "_min_abs_z": min(abs(r["z"]) for r in rows),
    }


# ---- the families ---------------------------------------------------------------------------
def _batch(family: str) -> dict:
    g = torch.Generator().manual_seed(7)
    batch = {
        "prompt": PROMPTS[:N_PAIRS],
        "chosen_pixels": torch.rand(N_PAIRS, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1,
        "rejected_pixels": torch.rand(N_PAIRS, 3, RESOLUTION, RESOLUTION, generator=g) * 2 - 1,
    }
    if family == "sdxl":  # each image its own original size and crop, as the data layer gives them
        batch["chosen_original_size"] = torch.randint(16, 64, (N_PAIRS, 2), generator=g)
        batch["rejected_original_size"] = torch.randint(16, 64, (N_PAIRS, 2), generator=g)
        batch["chosen_crop_top_left"] = torch.randint(0, 8, (N_PAIRS, 2), generator=g)
        batch["rejected_crop_top_left"] = torch.randint(0, 8, (N_PAIRS, 2), generator=g)
    return batch


def _build(family: str, folder) -> Family:
    import diffusers

    if family == "sd15-eps":
        path, klass = make_sd15(folder), diffusers.StableDiffusionPipeline
    elif family == "sd15-v":
        path, klass = make_sd15(folder, prediction_type="v_prediction"), diffusers.StableDiffusionPipeline
    elif family == "sdxl":
        path, klass = make_sdxl(folder), diffusers.StableDiffusionXLPipeline
    elif family == "sd3":
        path, klass = make_sd3(folder), diffusers.StableDiffusion3Pipeline
    else:
        path, klass = make_flux(folder), diffusers.FluxPipeline
    backbone = load_backbone(path)
    if family in ("sd3", "flux"):
        backbone.max_sequence_length = SHORT_T5
    if family == "flux":
        backbone.true_cfg = True  # the null branch is trained only for a true-CFG sampler
    backbone.prepare_for_training(lora_rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # peft starts B at zero (policy = reference): move it
        for name, p in backbone.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch = _batch(family)
    pipe = klass.from_pretrained(path)
    hand = hand_errors(pipe, family, batch, backbone)
    assert 0 < sum(hand["negative"]) < N_PAIRS  # both branches occur in the batch
    assert all(abs(a - b) > 1e-5 for a, b in zip(hand["e_pol_c"], hand["e_ref_c"]))  # policy != reference
    return Family(family, backbone, batch, hand)


FAMILIES = ["sd15-eps", "sd15-v", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory) -> Family:
    return _build(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.mark.parametrize("case, objective, mix_scale", OBJECTIVE_CASES, ids=[c[0] for c in OBJECTIVE_CASES])
def test_loss_and_metrics_equal_the_float64_hand_evaluation(family, case, objective, mix_scale):
    backbone = family.backbone
    method = SingleNetworkMethod(backbone, ObjectiveConfig(objective, BETA, LAMBDA, mix_scale), P)
    loss, metrics = method.compute_loss(backbone.denoiser, family.batch, SEEDS)
    assert loss.requires_grad  # the policy's errors carry the gradient
    expected = hand_loss(family.hand, objective, mix_scale)
    assert expected.pop("_min_abs_z") > 10 * ATOL  # no pair's accuracy hangs on float noise
    assert set(metrics) >= METRIC_KEYS
    got = {key: float(metrics[key]) for key in METRIC_KEYS}
    got["loss"] = float(loss.detach())
    for key in sorted(METRIC_KEYS):
        assert got[key] == pytest.approx(expected[key], abs=ATOL, rel=RTOL), (family.name, key)


def test_the_registered_methods_build_the_same_loss(family):
    """The trainer builds the method through the registry (``method: snpo`` ...): same loss."""
    from types import SimpleNamespace

    backbone = family.backbone
    for name in ("dpo", "snpo"):
        config = SimpleNamespace(method=name, beta=BETA, mix_lambda=LAMBDA, mix_scale=None, cfg_dropout=P)
        built = get_method(name).build(config, backbone).method
        loss, _ = built.compute_loss(backbone.denoiser, family.batch, SEEDS)
        expected = hand_loss(family.hand, name, None)["loss"]
        assert float(loss.detach()) == pytest.approx(expected, abs=ATOL, rel=RTOL), (family.name, name)
