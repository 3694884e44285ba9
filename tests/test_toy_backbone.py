"""The toy tokenizer, backbone and sampler: word-level tokens, exact latent round trip,
save/load, the null condition, and deterministic per-seed sampling."""

from __future__ import annotations

import torch

from conftest import TINY, WORDS
from snpo.backbones.base import select_condition
from snpo.backbones.toy import ToyBackbone
from snpo.sampling import SamplerSettings, sample_images, sample_latents, single_network_guide
from snpo.toy import scenes as S
from snpo.toy.tokenizer import build_toy_tokenizer, learn_bpe_merges


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = build_toy_tokenizer(S.WORDS, tmp_path / "tok", max_length=16)
    for scene in S.all_scenes():
        ids = tokenizer(scene.caption).input_ids
        words = scene.caption.split()
        assert len(ids) == len(words) + 2  # BOS + one token per word + EOS
        assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]
    # unknown words fall back to characters instead of failing
    assert len(tokenizer("zebra").input_ids) == 2 + 5
    assert learn_bpe_merges([]) == []


def test_patch_latents_round_trip_exactly(tiny_toy):
    pixels = torch.rand(3, 3, 8, 8) * 2 - 1
    latents = tiny_toy.encode_images(pixels)
    assert latents.shape == (3, 12, 4, 4)
    assert torch.equal(tiny_toy.decode_latents(latents), pixels)


def test_null_condition_is_the_empty_prompt(tiny_toy):
    cond = tiny_toy.encode_prompts(["a red square", "a blue circle"])
    null = tiny_toy.null_condition(cond)
    empty = tiny_toy.encode_prompts(["", ""])
    assert torch.allclose(null["encoder_hidden_states"], empty["encoder_hidden_states"])
    assert not torch.allclose(null["encoder_hidden_states"], cond["encoder_hidden_states"])
    mixed = select_condition(torch.tensor([True, False]), null, cond)
    assert torch.equal(mixed["encoder_hidden_states"][0], null["encoder_hidden_states"][0])
    assert torch.equal(mixed["encoder_hidden_states"][1], cond["encoder_hidden_states"][1])


def test_save_and_load_round_trip(tiny_toy, tmp_path):
    tiny_toy.save_pretrained(tmp_path / "model")
    loaded = ToyBackbone.from_pretrained(tmp_path / "model")
    assert loaded.config == TINY
    x = torch.randn(2, 12, 4, 4)
    t = torch.tensor([3, 50])
    cond = tiny_toy.encode_prompts(["a red square", "a blue circle"])
    with torch.no_grad():
        a = tiny_toy.predict(tiny_toy.denoiser, x, t, cond)
        b = loaded.predict(loaded.denoiser, x, t, loaded.encode_prompts(["a red square", "a blue circle"]))
    assert torch.allclose(a, b, atol=1e-6)


def test_same_seed_same_image_whatever_the_batch(tiny_toy):
    prompts = ["a red square", "a blue circle", "a red circle"]
    config = SamplerSettings(num_inference_steps=5, guidance_scale=3.0, batch_size=3)
    guide = single_network_guide(tiny_toy, tiny_toy.denoiser, 3.0)
    shape = (12, 4, 4)
    full = sample_images(tiny_toy, guide, prompts, [7, 8, 9], shape, config)
    config.batch_size = 1
    alone = sample_images(tiny_toy, guide, prompts[1:2], [8], shape, config)
    assert torch.allclose(full[1:2], alone, atol=1e-5)
    assert full.min() >= 0 and full.max() <= 1
    other_seed = sample_images(tiny_toy, guide, prompts[1:2], [123], shape, config)
    assert not torch.allclose(alone, other_seed)


def test_guidance_one_is_the_conditional_model_and_cfg_combines_branches(tiny_toy):
    """CFG with both branches batched equals u + s (c - u) from separate forwards."""
    x = torch.randn(2, 12, 4, 4)
    t = torch.tensor([10, 10])
    cond = tiny_toy.encode_prompts(["a red square", "a blue circle"])
    null = tiny_toy.null_condition(cond)
    with torch.no_grad():
        c = tiny_toy.predict(tiny_toy.denoiser, x, t, cond)
        u = tiny_toy.predict(tiny_toy.denoiser, x, t, null)
        guided = single_network_guide(tiny_toy, tiny_toy.denoiser, 7.5)(x, t, cond, null)
        plain = single_network_guide(tiny_toy, tiny_toy.denoiser, 1.0)(x, t, cond, null)
    assert torch.allclose(guided, u + 7.5 * (c - u), atol=1e-5)
    assert torch.allclose(plain, c, atol=1e-6)


def test_sampler_accepts_other_schedulers(tiny_toy):
    guide = single_network_guide(tiny_toy, tiny_toy.denoiser, 2.0)
    for name in ("euler", "dpm++"):
        latents = sample_latents(tiny_toy, guide, ["a red square"], [1], (12, 4, 4),
                                 SamplerSettings(num_inference_steps=4, guidance_scale=2.0, scheduler=name))
        assert torch.isfinite(latents).all()


def test_words_fixture_is_in_the_toy_vocabulary():
    assert set(WORDS) <= set(S.WORDS)
