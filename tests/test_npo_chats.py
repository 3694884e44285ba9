"""The dual-model baselines: Diff-NPO (reversed-label training, weight merging, two-network
guide) and CHATS (loss, lose-prompt zeroing, proxy prompt, training), against float64 hand
evaluations of METHOD.md on the tiny toy backbone."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from conftest import colour_pairs
from snpo.backbones.toy import ToyBackbone
from snpo.cli import main
from snpo.efficiency import (
    chats_footprint,
    count_parameters,
    npo_footprint,
    single_network_footprint,
)
from snpo.evaluate.implicit_accuracy import implicit_accuracy
from snpo.merging import lora_from_state_dict, merge_denoisers, merge_weights
from snpo.methods.chats import (
    ChatsMethod,
    chats_guide,
    chats_pair_errors,
    prepare_chats,
    proxy_condition,
    save_chats,
)
from snpo.methods.draws import draw_pairs, pair_seed
from snpo.methods.npo import npo_guide, npo_negative_method, reverse_batch
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig, chats_loss
from snpo.sampling import SamplerSettings, sample_latents, single_network_guide
from snpo.toy.data import TensorPairDataset, stack_batch
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ---- helpers ---------------------------------------------------------------------------
def perturbed(module, seed, scale=0.02):
    """A copy of ``module`` with every floating parameter moved by Gaussian noise."""
    out = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return out


def with_lora(unet, seed, **config):
    """A copy of ``unet`` with a LoRA whose B factors are random (peft starts them at zero)."""
    out = copy.deepcopy(unet)
    out.add_adapter(LoraConfig(target_modules=LORA_TARGETS, init_lora_weights="gaussian", **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, LoraLayer):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)
    return out


def hand_lora_deltas(unet):
    """``scale * B @ A`` per adapted weight, float64, from the peft layers' own attributes."""
    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            a_factor = module.lora_A["default"].weight.detach().double()
            b_factor = module.lora_B["default"].weight.detach().double()
            deltas[f"{name}.weight"] = module.scaling["default"] * (b_factor @ a_factor)
    return deltas


def batches(dataset, size=16):
    return [
        stack_batch([dataset[i] for i in range(s, min(s + size, len(dataset)))])
        for s in range(0, len(dataset), size)
    ]


def toy_train(backbone, tmp_path, dataset, method, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8,
        learning_rate=3e-3, lr_scheduler="constant", beta=500.0, method="dpo",
        cfg_dropout=0.0, checkpointing_steps=0, report_to="none", seed=0,
    )  # fmt: skip
    model = overrides.pop("model", None)
    params = overrides.pop("trainable_parameters", None)
    values.update(overrides)
    trainer = Trainer(
        TrainConfig(**values), backbone, dataset, method, collate_fn=stack_batch, model=model,
        trainable_parameters=params, show_progress=False, save_model=False, write_logs=False,
    )  # fmt: skip
    return trainer.train()


# ---- Diff-NPO: merging -----------------------------------------------------------------
def random_state(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
        "linear.weight": torch.randn(5, 7, generator=g, dtype=torch.float64),
        "linear.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "counter": torch.tensor([seed], dtype=torch.long),
    }


@pytest.mark.parametrize("a, b", [(0.5, 1.0), (0.0, 1.0), (0.7, 0.0), (0.0, 0.0), (-0.3, 1.7)])
def test_merge_weights_matches_hand_evaluation(a, b):
    ref, pos, neg = random_state(0), random_state(1), random_state(2)
    merged = merge_weights(ref, pos, neg, a, b)
    assert set(merged) == set(ref)
    assert torch.equal(merged["counter"], ref["counter"])  # integer buffers: the reference's
    for key in ("conv.weight", "linear.weight", "linear.bias"):
        r, p, n = (np.asarray(sd[key].tolist(), dtype=np.float64) for sd in (ref, pos, neg))
        expected = r + a * (p - r) + b * (n - r)
        assert merged[key].dtype == torch.float64
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-12, atol=1e-12)
        if a == 0 and b == 0:
            assert torch.equal(merged[key], ref[key])  # exactly the reference


def test_merge_weights_rejects_mismatched_models():
    ref, pos = random_state(0), random_state(1)
    with pytest.raises(ValueError, match="positive: state dict does not match"):
        merge_weights(ref, {k: v for k, v in pos.items() if k != "linear.bias"}, pos, 1.0, 1.0)


def test_lora_merge_acts_on_effective_deltas(tiny_toy, tmp_path):
    """Two LoRA-adapted toy UNets: merged weights equal ref + a dpos + b dneg (B@A*scale),
    in memory, and through `snpo merge` on diffusers-style LoRA files."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers

    ref = tiny_toy.denoiser
    pos = with_lora(ref, seed=1, r=2, lora_alpha=4)  # scale 2
    neg = with_lora(ref, seed=2, r=4, lora_alpha=6, use_rslora=True)  # scale 6 / sqrt(4) = 3
    a, b = 0.6, 1.0
    dpos, dneg = hand_lora_deltas(pos), hand_lora_deltas(neg)
    assert len(dpos) == len(dneg) > 0
    ref_state = {k: v.double() for k, v in ref.state_dict().items()}
    expected = dict(ref_state)
    for key in dpos:
        expected[key] = ref_state[key] + a * dpos[key] + b * dneg[key]

    merged = merge_denoisers(ref, pos, neg, a, b).state_dict()
    assert set(merged) == set(ref_state)
    for key, value in expected.items():
        torch.testing.assert_close(merged[key].double(), value, rtol=0, atol=2e-6)
    # files: positive in peft keys + diffusers' header metadata; negative in diffusers keys
    # with network alphas (alpha = scale * r); the reference a plain unet folder
    ref.save_pretrained(tmp_path / "ref")
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "pos", unet_lora_layers=get_peft_model_state_dict(pos),
        unet_lora_adapter_metadata={"r": 2, "lora_alpha": 4, "use_rslora": False},
    )  # fmt: skip
    neg_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(neg))
    for name in {k.rsplit(".lora.", 1)[0] for k in neg_layers}:
        neg_layers[f"{name}.alpha"] = torch.tensor(3.0 * 4)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "neg", unet_lora_layers=neg_layers)
    scales = lora_from_state_dict(neg_layers).scale
    assert set(scales) == set(dneg) and all(v == pytest.approx(3.0) for v in scales.values())

    out = tmp_path / "merged"
    argv = ["merge", "--reference", str(tmp_path / "ref"), "--positive", str(tmp_path / "pos"),
            "--npo", str(tmp_path / "neg"), "--a", str(a), "--b", str(b),
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    loaded = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key].double(), value, rtol=0, atol=2e-6)
    info = json.loads((out / "merge_info.json").read_text())
    assert info["positive_kind"] == info["npo_kind"] == "lora"


def test_merge_cli_on_full_model_folders(tiny_toy, tmp_path, capsys):
    """Toy model folders (full weights): the output is a loadable toy model (copy_pipeline)."""
    ref = tiny_toy.denoiser
    pos, neg = perturbed(ref, 1), perturbed(ref, 2)
    for name, unet in (("ref", ref), ("pos", pos), ("neg", neg)):
        tiny_toy.save_pretrained(tmp_path / name, unet)
    out = tmp_path / "merged"
    argv = ["merge", "--reference", str(tmp_path / "ref"), "--positive", str(tmp_path / "pos"),
            "--negative", str(tmp_path / "neg"), "--a", "0.5", "--output_dir", str(out),
            "--copy_pipeline", "true"]  # fmt: skip
    assert main(argv) == 0
    merged = ToyBackbone.from_pretrained(out).denoiser.state_dict()
    p, n = pos.state_dict(), neg.state_dict()
    for key, r in ref.state_dict().items():
        expected = (
            r.double() + 0.5 * (p[key].double() - r.double()) + (n[key].double() - r.double())
        )
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6)
    assert main(["merge", "--reference", str(tmp_path / "nowhere"), "--positive", "x",
                 "--negative", "y", "--output_dir", str(out)]) == 2  # fmt: skip
    assert "no such file or folder" in capsys.readouterr().err


# ---- Diff-NPO: sampling and training ---------------------------------------------------
def test_npo_guide_with_equal_networks_is_plain_cfg(tiny_toy):
    unet = tiny_toy.denoiser.eval()
    config = SamplerSettings(num_inference_steps=4, guidance_scale=3.0, batch_size=4)
    prompts, seeds = ["a red square", "a blue circle", "a red circle"], [3, 4, 5]
    shape = (12, 4, 4)
    plain = sample_latents(
        tiny_toy, single_network_guide(tiny_toy, unet, 3.0), prompts, seeds, shape, config
    )
    twin = copy.deepcopy(unet)
    npo = sample_latents(
        tiny_toy, npo_guide(tiny_toy, unet, twin, 3.0), prompts, seeds, shape, config
    )
    # two forwards of B rows vs one of 2B: equal up to float rounding of the batching
    torch.testing.assert_close(npo, plain, rtol=0, atol=1e-5)


def test_npo_guide_matches_hand_formula(tiny_toy):
    positive, negative = tiny_toy.denoiser.eval(), perturbed(tiny_toy.denoiser, 7, 0.05).eval()
    cond = tiny_toy.encode_prompts(["a red square", "a blue circle"])
    null = tiny_toy.null_condition(cond)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 12, 4, 4, generator=g), torch.tensor([40, 80])
    with torch.no_grad():
        out = npo_guide(tiny_toy, positive, negative, 2.5)(x, t, cond, null)
        pos64, neg64 = copy.deepcopy(positive).double(), copy.deepcopy(negative).double()
        e_pos = pos64(
            x.double(), t, encoder_hidden_states=cond["encoder_hidden_states"].double()
        ).sample
        e_neg = neg64(
            x.double(), t, encoder_hidden_states=null["encoder_hidden_states"].double()
        ).sample
    torch.testing.assert_close(out.double(), e_neg + 2.5 * (e_pos - e_neg), rtol=0, atol=1e-5)


def test_reversed_labels_equal_a_swapped_dataset(tiny_toy):
    data = colour_pairs(4)
    swapped = TensorPairDataset(data.rejected, data.chosen, data.prompts)
    batch, swapped_batch = (
        stack_batch([data[i] for i in range(4)]),
        stack_batch([swapped[i] for i in range(4)]),
    )
    reversed_batch = reverse_batch(batch)
    assert torch.equal(reversed_batch["chosen_pixels"], swapped_batch["chosen_pixels"])
    cached = {"chosen_latents": torch.zeros(2), "rejected_latents": torch.ones(2),
              "cond": {"encoder_hidden_states": torch.arange(4.0)[:, None]}}  # fmt: skip
    flipped = reverse_batch(cached)
    assert torch.equal(flipped["chosen_latents"], torch.ones(2))
    assert flipped["cond"]["encoder_hidden_states"].flatten().tolist() == [2.0, 3.0, 0.0, 1.0]

    tiny_toy.prepare_for_training()
    model = perturbed(tiny_toy.denoiser, 3)
    seeds = [11, 12, 13, 14]
    loss, metrics = npo_negative_method(tiny_toy, beta=500.0).compute_loss(model, batch, seeds)
    plain = SingleNetworkMethod(tiny_toy, ObjectiveConfig("dpo", 500.0), 0.0)
    expected, _ = plain.compute_loss(model, swapped_batch, seeds)
    assert torch.equal(loss, expected)
    assert metrics["branch/negative_fraction"] == 0  # conditional branch only by default


def test_npo_negative_model_learns_the_reversed_preference(tiny_toy, tmp_path):
    """Trained on reversed pairs (conditional branch), the negative model's implicit accuracy
    on the REVERSED preference rises from chance (policy = reference: all ties) to > 0.8."""
    data = colour_pairs(16)

    def reversed_accuracy():
        return implicit_accuracy(tiny_toy, tiny_toy.denoiser, tiny_toy._reference, batches(data),
                                 branch="conditional", reverse=True, draws=4)  # fmt: skip

    tiny_toy.prepare_for_training()
    assert reversed_accuracy()["accuracy"] == 0.5
    toy_train(tiny_toy, tmp_path, data, npo_negative_method(tiny_toy, beta=500.0), max_steps=12,
              trainable_parameters=[p for p in tiny_toy.denoiser.parameters() if p.requires_grad])  # fmt: skip
    after = reversed_accuracy()
    assert after["accuracy"] > 0.8 and after["mean_margin"] > 0


# ---- CHATS -----------------------------------------------------------------------------
def test_chats_loss_matches_hand_evaluation():
    g = torch.Generator().manual_seed(0)
    ew, el, rw, rl = (
        0.1 + 0.01 * torch.rand(32, generator=g, dtype=torch.float64) for _ in range(4)
    )
    beta = 2000.0
    loss, metrics = chats_loss(ew, el, rw, rl, beta=beta)
    z = [
        -(beta / 2) * ((float(ew[i]) - float(rw[i])) + (float(el[i]) - float(rl[i])))
        for i in range(32)
    ]
    assert float(loss) == pytest.approx(sum(math.log1p(math.exp(-zi)) for zi in z) / 32, rel=1e-10)
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(z) / 32, rel=1e-10)
    assert float(metrics["rewards/accuracies"]) == sum(zi > 0 for zi in z) / 32
    lose_reward = sum(beta / 2 * (float(rl[i]) - float(el[i])) for i in range(32)) / 32
    assert float(metrics["rewards/rejected"]) == pytest.approx(lose_reward, rel=1e-10)


def test_proxy_condition_matches_hand_evaluation():
    g = torch.Generator().manual_seed(0)
    cond = {k: torch.randn(2, *s, generator=g, dtype=torch.float64)
            for k, s in (("encoder_hidden_states", (3, 4)), ("text_embeds", (5,)), ("time_ids", (6,)))}  # fmt: skip
    null = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in cond.items()}
    proxy = proxy_condition(cond, null, alpha=0.5)
    for key in ("encoder_hidden_states", "text_embeds"):
        c, n = np.asarray(cond[key].tolist()), np.asarray(null[key].tolist())
        np.testing.assert_allclose(proxy[key].numpy(), 1.5 * n - 0.5 * c, rtol=1e-12, atol=1e-12)
    assert torch.equal(proxy["time_ids"], cond["time_ids"])
    assert torch.equal(proxy_condition(cond, null, alpha=0.0)["text_embeds"], null["text_embeds"])


def test_chats_guide_matches_hand_formula(tiny_toy):
    win, lose = tiny_toy.denoiser.eval(), perturbed(tiny_toy.denoiser, 5, 0.05).eval()
    cond = tiny_toy.encode_prompts(["a red square", "a blue circle"])
    null = tiny_toy.null_condition(cond)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 12, 4, 4, generator=g), torch.tensor([10, 70])
    with torch.no_grad():
        out = chats_guide(tiny_toy, win, lose, 4.0)(x, t, cond, null)
        c64, n64 = cond["encoder_hidden_states"].double(), null["encoder_hidden_states"].double()
        e_win = copy.deepcopy(win).double()(x.double(), t, encoder_hidden_states=c64).sample
        e_lose = (
            copy.deepcopy(lose)
            .double()(x.double(), t, encoder_hidden_states=1.5 * n64 - 0.5 * c64)
            .sample
        )
    torch.testing.assert_close(out.double(), e_win + 4.0 * (e_win - e_lose), rtol=0, atol=1e-5)


def hand_chats_loss(backbone, win, lose, reference, batch, seeds, beta):
    """METHOD.md's CHATS loss in float64, noising by hand from the scheduler's alphas."""
    chosen, rejected, cond = backbone.encode_batch(batch)
    acp = backbone.noise_scheduler.alphas_cumprod.double()
    nets = [copy.deepcopy(m).double() for m in (win, lose, reference)]
    hidden = cond["encoder_hidden_states"].double()
    n = len(seeds)
    losses, zeroed = [], []
    for i, seed in enumerate(seeds):  # the documented per-pair draw: noise, timestep, coin
        gen = torch.Generator().manual_seed(seed)
        eps = torch.randn(chosen.shape[1:], generator=gen).double()
        t = torch.randint(0, backbone.num_train_timesteps, (1,), generator=gen)
        blank = bool(torch.rand(1, generator=gen) < 0.5)
        zeroed.append(blank)
        s, u = acp[t].sqrt(), (1 - acp[t]).sqrt()
        xw, xl = s * chosen[i].double() + u * eps, s * rejected[i].double() + u * eps
        hw, hl = hidden[i : i + 1], hidden[n + i : n + i + 1] * (0.0 if blank else 1.0)

        def err(net, x, h, t=t, eps=eps):
            return float((net(x[None], t, encoder_hidden_states=h).sample[0] - eps).pow(2).mean())

        with torch.no_grad():
            z = -(beta / 2) * ((err(nets[0], xw, hw) - err(nets[2], xw, hw))
                               + (err(nets[1], xl, hl) - err(nets[2], xl, hl)))  # fmt: skip
        losses.append(math.log1p(math.exp(-z)))
    return sum(losses) / n, zeroed


def test_chats_method_loss_matches_float64_hand_evaluation(tiny_toy):
    dual, _ = prepare_chats(tiny_toy)
    with torch.no_grad():  # move both networks away from the reference, differently
        dual["win"].load_state_dict(perturbed(dual["win"], 1, 0.01).state_dict())
        dual["lose"].load_state_dict(perturbed(dual["lose"], 2, 0.01).state_dict())
    batch = stack_batch([colour_pairs(6)[i] for i in range(6)])
    seeds = [pair_seed(0, 0, i) for i in range(6)]
    beta = 500.0
    loss, metrics = ChatsMethod(tiny_toy, beta=beta).compute_loss(dual, batch, seeds)
    with tiny_toy.reference() as reference:
        expected, zeroed = hand_chats_loss(
            tiny_toy, dual["win"], dual["lose"], reference, batch, seeds, beta
        )
    assert 0 < sum(zeroed) < len(zeroed)  # both kinds of pair are covered
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert float(metrics["chats/lose_prompt_zeroed_fraction"]) == pytest.approx(sum(zeroed) / 6)


def test_lose_prompt_zeroed_about_half_the_time(tiny_toy):
    dual, _ = prepare_chats(tiny_toy)
    seen = {"win": [], "lose": [], "reference": []}

    def recorder(name):
        def hook(module, args, kwargs):
            seen[name].append(kwargs["encoder_hidden_states"].detach().clone())

        return hook

    dual["win"].register_forward_pre_hook(recorder("win"), with_kwargs=True)
    dual["lose"].register_forward_pre_hook(recorder("lose"), with_kwargs=True)
    tiny_toy._reference.register_forward_pre_hook(recorder("reference"), with_kwargs=True)
    data, method, n = colour_pairs(50), ChatsMethod(tiny_toy, beta=500.0), 50
    batch = stack_batch([data[i] for i in range(n)])
    fractions = []
    with torch.no_grad():
        for step in range(4):
            _, metrics = method.compute_loss(dual, batch, [pair_seed(0, step, i) for i in range(n)])
            fractions.append(float(metrics["chats/lose_prompt_zeroed_fraction"]))
    lose_rows = torch.cat(seen["lose"]).flatten(1)
    zero_rows = (lose_rows == 0).all(dim=1)
    assert 0.4 < float(zero_rows.double().mean()) < 0.6
    assert float(zero_rows.double().mean()) == pytest.approx(sum(fractions) / 4)
    assert not (torch.cat(seen["win"]).flatten(1) == 0).all(dim=1).any()  # win keeps the prompt
    # the reference sees each rejected image with the lose network's (zeroed) condition
    ref_rejected = torch.cat([r[n:] for r in seen["reference"]]).flatten(1)
    assert torch.equal(ref_rejected, lose_rows)


def test_one_step_lowers_win_chosen_and_lose_rejected_errors(tiny_toy):
    """The CHATS plus: the lose network is trained to FIT the rejected image."""
    dual, params = prepare_chats(tiny_toy)
    batch = stack_batch([colour_pairs(8)[i] for i in range(8)])
    chosen, rejected, cond = tiny_toy.encode_batch(batch)
    seeds = [pair_seed(3, 0, i) for i in range(8)]
    d = draw_pairs(tiny_toy, chosen, 0.5, seeds)
    draws = (d.noise, d.timesteps, d.coin)

    def errors():
        return chats_pair_errors(tiny_toy, dual, chosen, rejected, cond, *draws)

    with torch.no_grad():
        before = errors()
    loss, _ = ChatsMethod(tiny_toy, beta=500.0).compute_loss(dual, batch, seeds)
    loss.backward()
    torch.optim.SGD(params, lr=1e-4).step()
    with torch.no_grad():
        after = errors()
    assert after.err_win_chosen.mean() < before.err_win_chosen.mean()
    assert after.err_lose_rejected.mean() < before.err_lose_rejected.mean()
    assert torch.equal(after.ref_err_chosen, before.ref_err_chosen)


def test_chats_trains_both_networks_through_the_trainer(tiny_toy, tmp_path):
    dual, params = prepare_chats(tiny_toy)
    initial = copy.deepcopy(tiny_toy._reference.state_dict())
    result = toy_train(tiny_toy, tmp_path, colour_pairs(16), ChatsMethod(tiny_toy, beta=500.0),
                       max_steps=4, learning_rate=1e-3, model=dual, trainable_parameters=params)  # fmt: skip
    assert len(result.history) == 4 and "chats/lose_prompt_zeroed_fraction" in result.history[-1]
    win, lose = dual["win"].state_dict(), dual["lose"].state_dict()
    for name, state in (("win", win), ("lose", lose)):
        changed = [k for k in initial if not torch.equal(initial[k], state[k])]
        assert len(changed) > 0.8 * len(initial), name
    assert any(not torch.equal(win[k], lose[k]) for k in win)
    reference = tiny_toy._reference.state_dict()
    assert all(torch.equal(initial[k], reference[k]) for k in initial)  # reference frozen

    save_chats(tiny_toy, dual, str(tmp_path / "chats"))
    reloaded = ToyBackbone.from_pretrained(tmp_path / "chats" / "lose").denoiser.state_dict()
    assert all(torch.equal(reloaded[k], lose[k]) for k in lose)


# ---- efficiency ------------------------------------------------------------------------
def test_footprints_count_networks_and_shared_weights(tiny_toy):
    unet = tiny_toy.denoiser
    n = count_parameters(unet)
    full = single_network_footprint(unet, copy.deepcopy(unet).requires_grad_(False))
    assert (full.trainable, full.training_resident, full.sampling_resident) == (n, 2 * n, n)

    adapted = with_lora(unet, seed=0, r=2, lora_alpha=2)
    adapted.requires_grad_(False)
    for name, p in adapted.named_parameters():
        p.requires_grad_("lora_" in name)
    adapters = count_parameters(adapted, trainable_only=True)
    lora = single_network_footprint(adapted, adapted)  # reference = adapters off, same weights
    assert 0 < adapters < n and lora.training_resident == n + adapters

    merged = copy.deepcopy(unet)
    npo = npo_footprint(full, lora, unet, merged)
    assert (npo.trainable, npo.training_runs, npo.sampling_resident) == (n + adapters, 2, 2 * n)
    win, lose = copy.deepcopy(unet), copy.deepcopy(unet)
    chats = chats_footprint(win, lose, copy.deepcopy(unet).requires_grad_(False))
    assert (chats.trainable, chats.training_resident, chats.sampling_networks) == (2 * n, 3 * n, 2)
