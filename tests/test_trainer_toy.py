"""The training loop on the tiny toy backbone: it learns, it learns the right thing on each
branch, it is invariant to how a step's pairs are split, and it resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import colour_pairs
from snpo.evaluate.implicit_accuracy import implicit_accuracy
from snpo.methods.draws import draw_pairs
from snpo.methods.single import SingleNetworkMethod
from snpo.toy.data import stack_batch
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer


def train(backbone, tmp_path, dataset, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=30, per_device_train_batch_size=8,
                  learning_rate=3e-3, lr_scheduler="constant", beta=500.0, method="dpo",
                  cfg_dropout=0.0, checkpointing_steps=0, report_to="none", seed=0)
    values.update(overrides)
    config = TrainConfig(**values)
    method = SingleNetworkMethod(backbone, config.objective_config, config.cfg_dropout)
    trainer = Trainer(config, backbone, dataset, method, collate_fn=stack_batch,
                      show_progress=False, save_model=False, write_logs=False)
    return trainer.train()


def batches(dataset, size=16):
    return [stack_batch([dataset[i] for i in range(s, min(s + size, len(dataset)))])
            for s in range(0, len(dataset), size)]


def test_training_changes_parameters_and_raises_accuracy(tiny_toy, tmp_path):
    data = colour_pairs(32)
    before = copy.deepcopy(tiny_toy.denoiser.state_dict())
    text_before = copy.deepcopy(tiny_toy.text_encoder.state_dict())
    result = train(tiny_toy, tmp_path, data, max_steps=40)
    after = tiny_toy.denoiser.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.8 * len(before)
    assert all(torch.equal(v, tiny_toy.text_encoder.state_dict()[k]) for k, v in text_before.items())
    reference_state = tiny_toy._reference.state_dict()
    assert all(torch.equal(before[k], reference_state[k]) for k in before)  # reference frozen

    first = sum(h["rewards/accuracies"] for h in result.history[:5]) / 5
    last = sum(h["rewards/accuracies"] for h in result.history[-5:]) / 5
    assert last > first + 0.2
    acc = implicit_accuracy(tiny_toy, tiny_toy.denoiser, tiny_toy._reference, batches(data),
                            branch="conditional", reverse=False, draws=4)
    assert acc["accuracy"] > 0.8
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("objective, expect_reversed_preference", [("snpo", True), ("dpo", False)])
def test_null_branch_learns_reversed_preference_only_for_snpo(tiny_toy, tmp_path, objective,
                                                              expect_reversed_preference):
    """SNPO swaps winner and loser on the null branch; DPO's dropout branch is not swapped."""
    data = colour_pairs(32)
    train(tiny_toy, tmp_path, data, method=objective, cfg_dropout=0.5, max_steps=80, mix_lambda=0.9)
    null_reversed = implicit_accuracy(tiny_toy, tiny_toy.denoiser, tiny_toy._reference, batches(data),
                                      branch="null", reverse=True, draws=4)
    conditional = implicit_accuracy(tiny_toy, tiny_toy.denoiser, tiny_toy._reference, batches(data),
                                    branch="conditional", reverse=False, draws=4)
    assert conditional["accuracy"] > 0.7
    if expect_reversed_preference:
        assert null_reversed["accuracy"] > 0.7
    else:
        assert null_reversed["accuracy"] < 0.3


def test_pair_draws_do_not_depend_on_batching(tiny_toy):
    latents = torch.zeros(4, 12, 4, 4)
    seeds = [11, 22, 33, 44]
    d, d2 = draw_pairs(tiny_toy, latents, 0.5, seeds), draw_pairs(tiny_toy, latents[2:], 0.5, seeds[2:])
    noise, t, neg = d.noise, d.timesteps, d.coin
    noise2, t2, neg2 = d2.noise, d2.timesteps, d2.coin
    assert torch.equal(noise[2:], noise2) and torch.equal(t[2:], t2) and torch.equal(neg[2:], neg2)


def test_batch_split_invariance(tiny_toy, tmp_path):
    """Batch 2 x accumulation 1 gives the same weights as batch 1 x accumulation 2."""
    data = colour_pairs(8)
    twin = copy.deepcopy(tiny_toy)
    common = dict(max_steps=3, method="snpo", cfg_dropout=0.5, max_grad_norm=0.0,
                  adam_weight_decay=0.0, learning_rate=1e-3)
    train(tiny_toy, tmp_path / "a", data, per_device_train_batch_size=2, gradient_accumulation_steps=1, **common)
    train(twin, tmp_path / "b", data, per_device_train_batch_size=1, gradient_accumulation_steps=2, **common)
    a, b = tiny_toy.denoiser.state_dict(), twin.denoiser.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-6, rtol=1e-4), key


def test_resume_replays_exactly(tiny_toy, tmp_path):
    """6 steps straight equal 3 steps, a checkpoint, and 3 resumed steps (bitwise on CPU)."""
    data = colour_pairs(12)
    fresh = copy.deepcopy(tiny_toy)
    common = dict(method="snpo", cfg_dropout=0.3, per_device_train_batch_size=4,
                  gradient_accumulation_steps=1, learning_rate=1e-3, lr_scheduler="linear",
                  lr_warmup_steps=2)
    straight = copy.deepcopy(tiny_toy)
    train(straight, tmp_path / "straight", data, max_steps=6, **common)

    out = tmp_path / "resumed"
    config = TrainConfig(output_dir=str(out), max_steps=6, checkpointing_steps=3, report_to="none",
                         beta=500.0, **common)
    first = copy.deepcopy(fresh)
    method = SingleNetworkMethod(first, config.objective_config, config.cfg_dropout)

    class Stop(Exception):
        pass

    class KillAfterCheckpoint(Trainer):
        def _save_checkpoint(self, accelerator, root, step):
            super()._save_checkpoint(accelerator, root, step)
            raise Stop  # simulated crash right after the step-3 checkpoint

    with pytest.raises(Stop):
        KillAfterCheckpoint(config, first, data, method, collate_fn=stack_batch, show_progress=False,
                            save_model=True, write_logs=False).train()
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-3"

    second = copy.deepcopy(fresh)
    config.resume_from_checkpoint = "latest"
    method = SingleNetworkMethod(second, config.objective_config, config.cfg_dropout)
    result = Trainer(config, second, data, method, collate_fn=stack_batch, show_progress=False,
                     save_model=True, write_logs=False).train()
    assert result.global_step == 6 and len(result.history) == 3
    a, b = straight.denoiser.state_dict(), second.denoiser.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _predict(backbone, model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 4, 4, generator=g)
    t = torch.tensor([10, 60])
    with torch.no_grad():
        return backbone.predict(model, x, t, backbone.encode_prompts(["a red square", "a blue circle"]))


def test_lora_result_saves_as_a_plain_model_that_predicts_the_same(tiny_toy, tmp_path):
    from snpo.backbones.toy import ToyBackbone

    data = colour_pairs(8)
    config = TrainConfig(output_dir=str(tmp_path / "lora"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-2, beta=500.0, method="snpo", lora_rank=4,
                         checkpointing_steps=0, report_to="none")
    method = SingleNetworkMethod(tiny_toy, config.objective_config, 0.3)
    Trainer(config, tiny_toy, data, method, collate_fn=stack_batch, show_progress=False,
            save_model=True, write_logs=False).train()
    trained = _predict(tiny_toy, tiny_toy.denoiser)
    with tiny_toy.reference() as reference:
        base = _predict(tiny_toy, reference)
    loaded = ToyBackbone.from_pretrained(tmp_path / "lora")
    assert not any("lora" in k for k in loaded.denoiser.state_dict())
    assert torch.allclose(_predict(loaded, loaded.denoiser), trained, atol=1e-5)
    assert not torch.allclose(trained, base, atol=1e-4)


def test_chats_run_saves_both_networks_through_the_trainer(tiny_toy, tmp_path):
    from snpo.backbones.toy import ToyBackbone
    from snpo.methods.chats import ChatsMethod, prepare_chats

    dual, params = prepare_chats(tiny_toy)
    config = TrainConfig(output_dir=str(tmp_path / "chats"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, beta=500.0, method="dpo", cfg_dropout=0.0,
                         checkpointing_steps=0, report_to="none")
    Trainer(config, tiny_toy, colour_pairs(8), ChatsMethod(tiny_toy, 500.0), model=dual,
            trainable_parameters=params, collate_fn=stack_batch, show_progress=False,
            save_model=True, write_logs=False).train()
    for name in ("win", "lose"):
        loaded = ToyBackbone.from_pretrained(tmp_path / "chats" / name)
        assert torch.allclose(_predict(loaded, loaded.denoiser), _predict(tiny_toy, dual[name]), atol=1e-6)
    assert not torch.allclose(_predict(tiny_toy, dual["win"]), _predict(tiny_toy, dual["lose"]))
