"""ImageReward scorer on a tiny random checkpoint in the exact key layout of ``ImageReward.pt``.

The expected numbers come from ``_reference_raw``: a float64 forward written here from the raw
state-dict tensors with plain torch ops (explicit softmax, LayerNorm and erf-GELU formulas, the
reference's ``-10000`` padding mask, BLIP's qkv reshape), with hand-built token ids and pixels.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from snpo.scoring.base import ScorerWeightsMissing
from snpo.scoring.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    make_image_reward,
    preprocess_tensor,
)

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "a", "red", "blue", "cat", "dog", "on", "the", "mat", "##s", "green", "photo",
]  # fmt: skip
TOK = {t: i for i, t in enumerate(VOCAB)}
# tiny sizes, all different so that a mix-up of dimensions fails loudly
IMG, PATCH, VW, VDEPTH, VMLP = 32, 8, 128, 2, 192  # ViT width 128 -> 2 heads of 64
TW, THEADS, TDEPTH, TINTER, MAXPOS = 32, 4, 2, 48, 40
VOCAB_SIZE = len(VOCAB) + 2  # + [DEC], [ENC] as BLIP's init_tokenizer adds them
MLP_DIMS = [(0, TW, 24), (2, 24, 16), (4, 16, 8), (6, 8, 4), (7, 4, 1)]  # index, in, out
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": TW,
    "initializer_range": 0.02,
    "intermediate_size": TINTER,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": MAXPOS,
    "model_type": "bert",
    "num_attention_heads": THEADS,
    "num_hidden_layers": TDEPTH,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": VOCAB_SIZE,
    "encoder_width": 768,
    "add_cross_attention": True,
}


def _tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def lin(sd, name, d_in, d_out):
        sd[name + ".weight"] = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
        sd[name + ".bias"] = 0.1 * torch.randn(d_out, generator=g)

    def ln(sd, name, d):
        sd[name + ".weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[name + ".bias"] = 0.1 * torch.randn(d, generator=g)

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = 0.5 * torch.randn(1, 1, VW, generator=g)
    sd[v + "pos_embed"] = 0.5 * torch.randn(1, (IMG // PATCH) ** 2 + 1, VW, generator=g)
    sd[v + "patch_embed.proj.weight"] = torch.randn(VW, 3, PATCH, PATCH, generator=g) / PATCH
    sd[v + "patch_embed.proj.bias"] = 0.1 * torch.randn(VW, generator=g)
    for i in range(VDEPTH):
        b = f"{v}blocks.{i}."
        ln(sd, b + "norm1", VW)
        lin(sd, b + "attn.qkv", VW, 3 * VW)
        lin(sd, b + "attn.proj", VW, VW)
        ln(sd, b + "norm2", VW)
        lin(sd, b + "mlp.fc1", VW, VMLP)
        lin(sd, b + "mlp.fc2", VMLP, VW)
    ln(sd, v + "norm", VW)
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1)
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(VOCAB_SIZE, TW, generator=g)
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(MAXPOS, TW, generator=g)
    ln(sd, t + "embeddings.LayerNorm", TW)
    for i in range(TDEPTH):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", TW), ("crossattention", VW)):
            lin(sd, b + att + ".self.query", TW, TW)
            lin(sd, b + att + ".self.key", kv, TW)
            lin(sd, b + att + ".self.value", kv, TW)
            lin(sd, b + att + ".output.dense", TW, TW)
            ln(sd, b + att + ".output.LayerNorm", TW)
        lin(sd, b + "intermediate.dense", TW, TINTER)
        lin(sd, b + "output.dense", TINTER, TW)
        ln(sd, b + "output.LayerNorm", TW)
    for idx, d_in, d_out in MLP_DIMS:
        lin(sd, f"mlp.layers.{idx}", d_in, d_out)
    # present in ImageReward.pt, unused by the reward
    lin(sd, "blip.vision_proj", VW, 16)
    lin(sd, "blip.text_proj", TW, 16)
    return sd


# ---------------------------------------------------------------- independent float64 reference


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0)))


def _softmax(s):
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _heads(x, h):  # (B,L,D) -> (B,h,L,D/h)
    b, n, d = x.shape
    return x.reshape(b, n, h, d // h).permute(0, 2, 1, 3)


def _reference_raw(sd, pixels, ids, mask):
    """Raw (un-normalised) ImageReward output, float64, straight from the state dict."""
    p = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    lin = lambda x, n: x @ p[n + ".weight"].T + p[n + ".bias"]  # noqa: E731
    v = "blip.visual_encoder."
    x = pixels.double()
    # patch embedding as explicit patch flattening + matmul
    b = x.shape[0]
    g = IMG // PATCH
    patches = x.reshape(b, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    w = p[v + "patch_embed.proj.weight"].reshape(VW, -1)
    x = patches @ w.T + p[v + "patch_embed.proj.bias"]
    x = torch.cat([p[v + "cls_token"].expand(b, 1, VW), x], 1) + p[v + "pos_embed"]
    nh = VW // 64
    for i in range(VDEPTH):
        pre = f"{v}blocks.{i}."
        y = _ln(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], 1e-6)
        qkv = lin(y, pre + "attn.qkv").reshape(b, -1, 3, nh, VW // nh).permute(2, 0, 3, 1, 4)
        att = _softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (VW // nh) ** -0.5)
        y = (att @ qkv[2]).transpose(1, 2).reshape(b, -1, VW)
        x = x + lin(y, pre + "attn.proj")
        y = _ln(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"], 1e-6)
        x = x + lin(_gelu(lin(y, pre + "mlp.fc1")), pre + "mlp.fc2")
    img = _ln(x, p[v + "norm.weight"], p[v + "norm.bias"], 1e-6)

    t = "blip.text_encoder."
    eps = 1e-12
    h = p[t + "embeddings.word_embeddings.weight"][ids]
    h = h + p[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = _ln(h, p[t + "embeddings.LayerNorm.weight"], p[t + "embeddings.LayerNorm.bias"], eps)
    ext = (1.0 - mask.double())[:, None, None, :] * -10000.0
    hd = TW // THEADS

    def attn(pre, q_in, kv_in, add_mask):
        q = _heads(lin(q_in, pre + ".self.query"), THEADS)
        k = _heads(lin(kv_in, pre + ".self.key"), THEADS)
        vv = _heads(lin(kv_in, pre + ".self.value"), THEADS)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if add_mask is not None:
            s = s + add_mask
        ctx = (_softmax(s) @ vv).permute(0, 2, 1, 3).reshape(q_in.shape[0], -1, TW)
        out = lin(ctx, pre + ".output.dense") + q_in
        return _ln(out, p[pre + ".output.LayerNorm.weight"], p[pre + ".output.LayerNorm.bias"], eps)

    for i in range(TDEPTH):
        pre = f"{t}encoder.layer.{i}."
        h = attn(pre + "attention", h, h, ext)
        h = attn(pre + "crossattention", h, img, None)
        ff = lin(_gelu(lin(h, pre + "intermediate.dense")), pre + "output.dense")
        h = _ln(ff + h, p[pre + "output.LayerNorm.weight"], p[pre + "output.LayerNorm.bias"], eps)
    r = h[:, 0, :]
    for idx, _, _ in MLP_DIMS:
        r = lin(r, f"mlp.layers.{idx}")
    return r.squeeze(-1)


def _hand_pixels(images):
    """ToTensor + Normalize by hand for images already at IMG x IMG (no resize, no crop)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images]) / 255.0
    arr = (arr - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _ids(*tokens: str) -> list[int]:
    ids = [TOK["[CLS]"], *(TOK[t] for t in tokens), TOK["[SEP]"]]
    return ids + [TOK["[PAD]"]] * (35 - len(ids))


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    sd = _tiny_state_dict()
    torch.save(sd, root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps(MED_CONFIG))
    tok = root / "tokenizer"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root, sd


@pytest.fixture(scope="module")
def scorer(tiny):
    root, _ = tiny
    return make_image_reward(str(root / "ImageReward.pt"), tokenizer_path=str(root / "tokenizer"))


def _rand_images(n, size=(IMG, IMG), seed=0):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(n)
    ]


PROMPTS = ["a red cat", "A photo of the blue dogs", "the green mat " * 20]
HAND_IDS = [
    _ids("a", "red", "cat"),
    _ids("a", "photo", "[UNK]", "the", "blue", "dog", "##s"),  # "of" is not in the vocab
    [TOK["[CLS]"], *[TOK[w] for w in ["the", "green", "mat"] * 11][:33], TOK["[SEP]"]],
]


# --------------------------------------------------------------------------------------- tests


def test_sizes_are_read_from_the_checkpoint(scorer):
    cfg = scorer.config
    assert (cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers) == (
        IMG,
        PATCH,
        VW,
        VDEPTH,
    )
    assert (cfg.vision_heads, cfg.vision_mlp) == (VW // 64, VMLP)
    assert (cfg.text_width, cfg.text_heads, cfg.text_layers, cfg.text_intermediate) == (
        TW,
        THEADS,
        TDEPTH,
        TINTER,
    )
    assert (cfg.vocab_size, cfg.max_positions, cfg.text_eps) == (VOCAB_SIZE, MAXPOS, 1e-12)
    assert cfg.mlp_indices == (0, 2, 4, 6, 7)


def test_tokenization_matches_hand_ids(scorer):
    ids, mask = scorer.tokenize(PROMPTS)
    assert ids.tolist() == HAND_IDS  # [CLS] first (not [ENC]), truncated to 35 with [SEP] kept
    assert mask.tolist() == [[int(i != 0) for i in row] for row in HAND_IDS]
    assert scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [16, 17]


def test_scores_match_plain_float64_reference(scorer, tiny):
    _, sd = tiny
    images = _rand_images(3)
    got = scorer(images, PROMPTS)
    ids = torch.tensor(HAND_IDS)
    raw = _reference_raw(sd, _hand_pixels(images), ids, (ids != 0).long())
    want = (raw - 0.16717362830052426) / 1.0333394966054072  # float64, by hand
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert raw.abs().max() > 0.1  # a non-degenerate tiny model
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_normalisation_arithmetic(scorer):
    assert IMAGE_REWARD_MEAN == 0.16717362830052426 and IMAGE_REWARD_STD == 1.0333394966054072
    images = _rand_images(2, seed=3)
    pixels = scorer.preprocess(images)
    ids, mask = scorer.tokenize(PROMPTS[:2])
    with torch.no_grad():
        raw = scorer.model.raw_reward(pixels, ids, mask).double()
    got = scorer(images, PROMPTS[:2]).double()
    want = torch.tensor(
        [(float(r) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD for r in raw], dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_scores_respond_to_image_and_prompt(scorer):
    a, b = _rand_images(2, seed=7)
    by_image = scorer([a, b], "a red cat")
    by_prompt = scorer([a, a], ["a red cat", "the blue dog on the mat"])
    assert (by_image[0] - by_image[1]).abs() > 1e-4
    assert (by_prompt[0] - by_prompt[1]).abs() > 1e-4
    # padding is masked: the same prompt scores the same whatever the batch around it
    torch.testing.assert_close(scorer([a], ["a red cat"]), by_prompt[:1])


def test_batching_and_prompt_broadcast(tiny, scorer):
    root, _ = tiny
    images = _rand_images(5, seed=11)
    small = make_image_reward(str(root), tokenizer_path=str(root / "tokenizer"), batch_size=2)
    torch.testing.assert_close(small(images, "a cat"), scorer(images, ["a cat"] * 5))
    with pytest.raises(ValueError, match="prompts"):
        scorer(images, ["a", "b"])


def test_preprocess_crop_is_exact(scorer):
    rng = np.random.default_rng(5)
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    for h, w, rows, cols in (
        (IMG, 2 * IMG, slice(None), slice(16, 48)),
        (2 * IMG, IMG, slice(16, 48), slice(None)),
    ):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = scorer.preprocess([Image.fromarray(arr)])[0].double()
        want = (arr[rows, cols].astype(np.float64) / 255.0 - mean) / std
        torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=1e-6)
    # grayscale: converted to RGB after crop, three equal channels
    gray = rng.integers(0, 256, (IMG, IMG), dtype=np.uint8)
    got = scorer.preprocess([Image.fromarray(gray, mode="L")])[0].double()
    want = (gray[None].astype(np.float64) / 255.0 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-6)


def test_preprocess_resize_short_side_bicubic_then_center_crop(scorer):
    # 48x40 (w x h): short side 40 -> 32, long side int(32 * 48 / 40) = 38, crop left round(3)
    img = _rand_images(1, size=(48, 40), seed=9)[0]
    small = np.asarray(img.resize((38, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    want = (small[:, 3:35] / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    got = scorer.preprocess([img])[0].double()
    torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=1e-6)
    # a uniform colour survives resize + crop exactly
    flat = Image.new("RGB", (50, 70), (200, 30, 90))
    got = scorer.preprocess([flat])[0]
    for c, v in enumerate((200, 30, 90)):
        assert torch.allclose(got[c], torch.tensor((v / 255 - CLIP_MEAN[c]) / CLIP_STD[c]))


def test_tensor_input_scores_like_the_saved_png(scorer):
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    pngs = [
        Image.fromarray((xi.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for xi in x
    ]
    torch.testing.assert_close(scorer(x, PROMPTS[:2]), scorer(pngs, PROMPTS[:2]))


def _hard_images(h: int, w: int, seed: int) -> torch.Tensor:
    """Images whose bicubic overshoot PIL clips between its two passes: binary noise, hard
    stripes, a checkerboard, and plain noise."""
    g = torch.Generator().manual_seed(seed)
    stripes = (torch.arange(w) % 6 < 3).float().expand(3, h, w)
    checker = ((torch.arange(h)[:, None] + torch.arange(w)) % 2).float().expand(3, h, w)
    binary = (torch.rand(3, h, w, generator=g) > 0.5).float()
    return torch.stack([binary, stripes, checker, torch.rand(3, h, w, generator=g)])


@pytest.mark.parametrize("hw", [(48, 48), (40, 56), (56, 37), (17, 23), (32, 32), (96, 128)])
def test_differentiable_tensor_path_is_within_two_grey_levels_of_pil(scorer, hw):
    x = _hard_images(*hw, seed=hw[0])
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pix = preprocess_tensor(x, IMG)
    q = scorer.preprocess(x)  # via round(x * 255) + PIL bicubic, as a saved PNG is scored
    grey_levels = ((pix - q) * std).abs().max().item() * 255  # undo the normalisation
    bound = 0.5 if hw == (IMG, IMG) else 2.0  # see preprocess_tensor's docstring
    assert grey_levels <= bound, grey_levels
    # without PIL's clamp between the passes (the old tensor path) the bound fails
    if hw != (IMG, IMG):
        nh, nw = (
            (IMG, int(IMG * hw[1] / hw[0])) if hw[1] >= hw[0] else (int(IMG * hw[0] / hw[1]), IMG)
        )
        plain = torch.nn.functional.interpolate(
            x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
        )
        top, left = round((nh - IMG) / 2), round((nw - IMG) / 2)
        plain = plain[..., top : top + IMG, left : left + IMG]
        unnorm_q = q * std + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        assert (plain - unnorm_q).abs().max().item() * 255 > 2 * bound


def test_differentiable_tensor_path_has_gradients(scorer):
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    s = scorer.score_pixels(preprocess_tensor(x, IMG), PROMPTS[:2])
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_folder_safetensors_and_wrapped_checkpoints(tiny, scorer, tmp_path):
    from safetensors.torch import save_file

    root, sd = tiny
    images = _rand_images(2, seed=13)
    want = scorer(images, PROMPTS[:2])
    # folder with the tokenizer found next to the checkpoint
    torch.testing.assert_close(make_image_reward(str(root))(images, PROMPTS[:2]), want)
    st = tmp_path / "st"
    st.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st / "ImageReward.safetensors"))
    (st / "med_config.json").write_text(json.dumps(MED_CONFIG))
    got = make_image_reward(str(st), tokenizer_path=str(root / "tokenizer"))
    torch.testing.assert_close(got(images, PROMPTS[:2]), want)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    got = make_image_reward(str(wrapped), tokenizer_path=str(root / "tokenizer"))
    torch.testing.assert_close(got(images, PROMPTS[:2]), want)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tiny, tmp_path):
    root, sd = tiny
    bad = tmp_path / "ImageReward.pt"
    torch.save({**sd, "blip.extra": _NotATensor()}, bad)
    with pytest.raises(ValueError, match="refusing"):
        make_image_reward(str(bad), tokenizer_path=str(root / "tokenizer"))


def test_missing_weights_and_tokenizer_are_one_line_errors(tiny, tmp_path):
    root, _ = tiny
    for path in (tmp_path / "nope.pt", tmp_path, "nobody-xyz/not-a-cached-model"):
        with pytest.raises(ScorerWeightsMissing) as err:
            make_image_reward(str(path), tokenizer_path=str(root / "tokenizer"))
        msg = str(err.value)
        assert "\n" not in msg
        assert "THUDM/ImageReward" in msg and "ImageReward.pt" in msg and "--image-reward" in msg
    with pytest.raises(ScorerWeightsMissing) as err:
        make_image_reward(str(root / "ImageReward.pt"), tokenizer_path=str(tmp_path / "no_tok"))
    msg = str(err.value)
    assert "\n" not in msg and "bert-base-uncased" in msg and "--image-reward-tokenizer" in msg


def test_inconsistent_checkpoints_are_rejected(tiny, tmp_path):
    root, sd = tiny
    tok = str(root / "tokenizer")
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({**MED_CONFIG, "hidden_size": 64}))
    with pytest.raises(ValueError, match="hidden_size"):
        make_image_reward(str(tmp_path), tokenizer_path=tok)
    (tmp_path / "med_config.json").write_text(json.dumps(MED_CONFIG))
    extra = {**sd, "blip.visual_encoder.blocks.0.attn.rel_pos": torch.zeros(3)}
    torch.save(extra, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="unexpected"):
        make_image_reward(str(tmp_path), tokenizer_path=tok)
    partial = {k: v for k, v in sd.items() if "crossattention.self.key" not in k}
    torch.save(partial, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="missing"):
        make_image_reward(str(tmp_path), tokenizer_path=tok)


def test_low_precision_encoders_keep_a_float32_head(tiny):
    root, _ = tiny
    fn = make_image_reward(str(root), tokenizer_path=str(root / "tokenizer"), dtype=torch.bfloat16)
    assert fn.model.blip.visual_encoder.pos_embed.dtype == torch.bfloat16
    assert fn.model.mlp.layers[0].weight.dtype == torch.float32
    out = fn(_rand_images(2), PROMPTS[:2])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
