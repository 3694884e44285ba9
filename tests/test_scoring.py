"""Scorers on tiny random models saved in the layout of the real checkpoints (no downloads).

What is checked against what:
* open_clip -> transformers conversion against an independent plain-torch open_clip forward
  written here from the open_clip-format tensors (not against the converter's own inverse);
* each scorer's scale arithmetic against a float64 hand computation from the model's embeddings;
* CLIP preprocessing against a hand computation and against transformers' own PIL processor;
* HPS preprocessing (resize longer side, zero-pad) against hand-computed values;
* missing weights -> one-line ScorerWeightsMissing naming the flag; torch.load is weights_only.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from snpo.errors import ConfigError, UserError
from snpo.scoring import SCORERS, ScorerWeightsMissing, make_scorer
from snpo.scoring.aesthetic import AestheticMLP, make_aesthetic
from snpo.scoring.base import as_pil_list
from snpo.scoring.clip_score import make_clip_score
from snpo.scoring.hpsv2 import make_hpsv2, make_hpsv2_1
from snpo.scoring.open_clip_convert import (
    convert_open_clip_state_dict,
    default_heads,
    open_clip_to_hf,
)
from snpo.scoring.pickscore import make_pickscore
from snpo.scoring.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ClipImageConfig,
    clip_preprocess,
    hps_preprocess,
)

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat", "a blue dog on grass", "an old house", "two birds"]
MEAN = np.array(CLIP_MEAN)
STD = np.array(CLIP_STD)


# ----------------------------------------------------------------------------------------------
# tiny assets
# ----------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer from a hand-written vocab (no merges). Returns the vocab size.

    Same id layout as the real CLIP vocab: byte symbols, then ``</w>`` forms, then
    ``<|startoftext|>`` and ``<|endoftext|>`` as the two largest ids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + ".,!'-")
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    )
    return len(vocab)


def tiny_clip_config(vocab_size: int, projection_dim: int = 16):
    return transformers.CLIPConfig(
        projection_dim=projection_dim,
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": vocab_size - 1,
            "bos_token_id": vocab_size - 2,
            "pad_token_id": 0,
            "hidden_act": "quick_gelu",
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
        },
    )


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves LayerNorms at 1/0 and tiny weights; make every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if "layer_norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


NEW_STYLE_PREPROC = {
    "do_resize": True,
    "size": {"shortest_edge": 32},
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "resample": 3,
    "do_convert_rgb": True,
    "image_processor_type": "CLIPImageProcessor",
}
# The laion/CLIP-ViT-H-14 folder still uses the old integer format.
OLD_STYLE_PREPROC = {
    "crop_size": 32,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(CLIP_MEAN),
    "image_std": list(CLIP_STD),
    "resample": 3,
    "size": 32,
}


def save_clip(
    folder: Path, seed: int, *, logit_scale: float | None = None, with_processor: bool = True
):
    torch.manual_seed(seed)
    tok_dir = folder if with_processor else folder.parent / (folder.name + "_unused_tok")
    vocab = write_tokenizer(tok_dir)
    model = transformers.CLIPModel(tiny_clip_config(vocab)).eval()
    perturb_(model, seed)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    if with_processor:
        (folder / "preprocessor_config.json").write_text(json.dumps(NEW_STYLE_PREPROC))
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scorers")
    out: dict[str, Path] = {"root": root}
    # CLIP-score / aesthetic: one complete HF folder (model + tokenizer + preprocessor config).
    out["clip"] = root / "clip"
    save_clip(out["clip"], seed=1)
    # PickScore: model-only folder (as yuvalkirstain/PickScore_v1) + a separate processor folder
    # (as laion/CLIP-ViT-H-14-laion2B-s32B-b79K, old-style preprocessor config).
    out["pick"] = root / "pickscore"
    save_clip(out["pick"], seed=2, logit_scale=math.log(80.0), with_processor=False)
    out["proc"] = root / "laion-proc"
    write_tokenizer(out["proc"])
    (out["proc"] / "preprocessor_config.json").write_text(json.dumps(OLD_STYLE_PREPROC))
    # tokenizer alone, for HPS
    out["tok"] = root / "tok"
    write_tokenizer(out["tok"])
    return out


def rand_images(seed: int, sizes=((40, 48), (48, 40), (32, 32), (50, 33))) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def check_one_line(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)


# ----------------------------------------------------------------------------------------------
# independent open_clip reference forward (plain torch ops on open_clip-format tensors)
# ----------------------------------------------------------------------------------------------


def make_open_clip_sd(
    seed: int, vocab: int, *, vw=32, vl=2, tw=24, tl=2, patch=8, img=32, embed=16
):
    """Random open_clip ViT CLIP state dict; widths/MLP sizes all differ to catch transposes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return s * torch.randn(*shape, generator=g, dtype=torch.float64)

    sd: dict[str, torch.Tensor] = {}
    grid = img // patch
    sd["visual.conv1.weight"] = r(vw, 3, patch, patch)
    sd["visual.class_embedding"] = r(vw)
    sd["visual.positional_embedding"] = r(grid * grid + 1, vw)
    for name, width in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        sd[name + ".weight"] = 1 + r(width, s=0.1)
        sd[name + ".bias"] = r(width, s=0.1)
    for prefix, width, layers, mlp in (("visual.", vw, vl, 3 * vw), ("", tw, tl, 5 * tw)):
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "ln_1.weight"] = 1 + r(width, s=0.1)
            sd[p + "ln_1.bias"] = r(width, s=0.1)
            sd[p + "attn.in_proj_weight"] = r(3 * width, width)
            sd[p + "attn.in_proj_bias"] = r(3 * width, s=0.1)
            sd[p + "attn.out_proj.weight"] = r(width, width)
            sd[p + "attn.out_proj.bias"] = r(width, s=0.1)
            sd[p + "ln_2.weight"] = 1 + r(width, s=0.1)
            sd[p + "ln_2.bias"] = r(width, s=0.1)
            sd[p + "mlp.c_fc.weight"] = r(mlp, width)
            sd[p + "mlp.c_fc.bias"] = r(mlp, s=0.1)
            sd[p + "mlp.c_proj.weight"] = r(width, mlp)
            sd[p + "mlp.c_proj.bias"] = r(width, s=0.1)
    sd["visual.proj"] = r(vw, embed)
    sd["token_embedding.weight"] = r(vocab, tw)
    sd["positional_embedding"] = r(77, tw)
    sd["text_projection"] = r(tw, embed)
    sd["logit_scale"] = torch.tensor(math.log(100.0), dtype=torch.float64)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _resblock(x, sd, p, heads, causal):
    b, n, w = x.shape
    h = _ln(x, sd, p + "ln_1")
    qkv = h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.reshape(b, n, heads, w // heads).transpose(1, 2) for t in qkv.split(w, dim=-1))
    att = (q @ k.transpose(-1, -2)) / math.sqrt(w // heads)
    if causal:
        att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = _ln(x, sd, p + "ln_2")
    h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])  # exact (erf) GELU
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_encode_image(sd, pixels, heads):
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1])  # patchify, no bias
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", heads, causal=False)
        i += 1
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def ref_encode_text(sd, ids, heads):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", heads, causal=True)
        i += 1
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# registry and errors
# ----------------------------------------------------------------------------------------------


def test_registry_names_and_unknown():
    assert {"pickscore", "hpsv2", "hpsv2.1", "aesthetic", "clip_score", "image_reward"} <= set(
        SCORERS
    )
    with pytest.raises(ConfigError, match="^scorers: unknown scorer"):
        make_scorer("nope", "x")


def test_user_errors_are_one_line_user_errors(assets, tmp_path):
    assert issubclass(ScorerWeightsMissing, UserError)
    with pytest.raises(ConfigError, match="^batch_size: "):
        make_clip_score(assets["clip"], batch_size=0)(rand_images(0), PROMPTS)
    bad = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save({"something": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match="aesthetic MLP") as ei:
        make_aesthetic(bad, clip=assets["clip"])
    check_one_line(ei.value)


@pytest.mark.parametrize(
    ("name", "kwargs", "needles"),
    [
        (
            "pickscore",
            {},
            ["--pickscore PATH", "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14"],
        ),
        ("hpsv2", {}, ["--hpsv2 PATH", "HPS_v2_compressed.pt", "xswu/HPSv2"]),
        ("hpsv2.1", {}, ["--hpsv2.1 PATH", "HPS_v2.1_compressed.pt"]),
        ("aesthetic", {}, ["--aesthetic PATH", "sac+logos+ava1-l14-linearMSE.pth"]),
        ("clip_score", {}, ["--clip-score PATH", "openai/clip-vit-large-patch14"]),
    ],
)
def test_missing_weights_is_one_line_naming_the_flag(tmp_path, name, kwargs, needles):
    for path in (str(tmp_path / "nowhere"), "snpo-test/not-in-any-cache"):
        with pytest.raises(ScorerWeightsMissing) as ei:
            make_scorer(name, path, **kwargs)
        check_one_line(ei.value, path, *needles)
    assert issubclass(ScorerWeightsMissing, ValueError)


def test_missing_companion_files_name_their_flag(assets, tmp_path):
    # PickScore model folder without processor files and no laion folder in the cache.
    with pytest.raises(ScorerWeightsMissing) as ei:
        make_pickscore(assets["pick"])
    check_one_line(ei.value, "--pickscore-processor PATH", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    # HPS checkpoint present but no tokenizer.
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": make_open_clip_sd(0, 84)}, ckpt)
    with pytest.raises(ScorerWeightsMissing) as ei:
        make_hpsv2(ckpt, tokenizer=tmp_path / "no-tok")
    check_one_line(ei.value, "--hps-tokenizer PATH")
    # Aesthetic MLP present but no CLIP.
    mlp = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(16).state_dict(), mlp)
    with pytest.raises(ScorerWeightsMissing) as ei:
        make_aesthetic(mlp, clip=tmp_path / "no-clip")
    check_one_line(ei.value, "--aesthetic-clip PATH", "openai/clip-vit-large-patch14")
    # An empty folder where a model should be.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScorerWeightsMissing) as ei:
        make_clip_score(tmp_path / "empty")
    check_one_line(ei.value, "--clip-score PATH")


# ----------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------


def test_clip_preprocess_matches_hand_computation():
    # 8x5 image (w x h), shorter side -> 4, crop 3: resized to int(4*8/5)=6 x 4.
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (5, 8, 3), dtype=np.uint8))
    cfg = ClipImageConfig(size=4, crop_size=(3, 3))
    resized = np.asarray(im.resize((6, 4), Image.Resampling.BICUBIC)).astype(np.float64)
    for rounding, left in (("floor", 1), ("round", 2)):  # (6-3)/2 = 1.5: floor 1, torchvision 2
        want = (resized[0:3, left : left + 3] / 255.0 - MEAN) / STD
        got = (
            clip_preprocess([im], cfg, crop_rounding=rounding)[0].permute(1, 2, 0).double().numpy()
        )
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Portrait: vertical margin (int(4*7/5)=5 rows -> 3): top = 1 either way.
    im2 = Image.fromarray(rng.integers(0, 256, (7, 5, 3), dtype=np.uint8))
    resized = np.asarray(im2.resize((4, 5), Image.Resampling.BICUBIC)).astype(np.float64)
    want = (resized[1:4, 0:3] / 255.0 - MEAN) / STD
    got = clip_preprocess([im2], cfg)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def _transformers_pil_processor(cfg: dict):
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    except ImportError:  # transformers v4: the default CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor as cls
    return cls(**{k: v for k, v in cfg.items() if k not in ("image_processor_type",)})


@pytest.mark.parametrize("preproc", [NEW_STYLE_PREPROC, OLD_STYLE_PREPROC])
def test_clip_preprocess_matches_transformers_processor(preproc, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(preproc))
    cfg = ClipImageConfig.from_folder(tmp_path)
    assert cfg.size == 32 and cfg.crop_size == (32, 32) and cfg.resample == 3
    ref = _transformers_pil_processor(NEW_STYLE_PREPROC)
    images = rand_images(3, sizes=((40, 48), (48, 40), (61, 37), (32, 32), (20, 25)))
    want = torch.as_tensor(np.stack(ref(images=images, return_tensors="np")["pixel_values"]))
    got = clip_preprocess(images, cfg, crop_rounding="floor")
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_hps_preprocess_hand_values():
    rng = np.random.default_rng(1)
    # Already image_size and square: no resize, no pad -> plain ToTensor + Normalize.
    arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = hps_preprocess([Image.fromarray(arr)], 8)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, (arr / 255.0 - MEAN) / STD, atol=1e-6)
    # 20x10 (w x h) constant colour -> longer side 8: 8x4 content, rows 0-1 and 6-7 black padding.
    c = np.array([200, 100, 50])
    flat = Image.fromarray(np.broadcast_to(c, (10, 20, 3)).astype(np.uint8))
    got = hps_preprocess([flat], 8)[0].permute(1, 2, 0).double().numpy()
    pad = (0.0 - MEAN) / STD
    np.testing.assert_allclose(got[:2], np.broadcast_to(pad, (2, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(got[6:], np.broadcast_to(pad, (2, 8, 3)), atol=1e-6)
    np.testing.assert_allclose(
        got[2:6], np.broadcast_to((c / 255.0 - MEAN) / STD, (4, 8, 3)), atol=1e-5
    )
    # Odd padding: 16x10 (w x h) -> 8 x 5 content; 3 rows of padding = 1 on top, 2 below.
    img = Image.fromarray(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8))
    got = hps_preprocess([img], 8)[0]
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).double()[None] / 255
    content = F.interpolate(x, size=(5, 8), mode="bicubic", align_corners=False, antialias=True)[0]
    want = torch.zeros(3, 8, 8, dtype=torch.float64)
    want[:, 1:6] = content
    want = (want - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_tensor_input_is_quantised_like_a_png():
    x = torch.rand(2, 3, 9, 7)
    pils = as_pil_list(x)
    want = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for p, w in zip(pils, want):
        assert p.mode == "RGB" and p.size == (7, 9)
        np.testing.assert_array_equal(np.asarray(p), w)


# ----------------------------------------------------------------------------------------------
# open_clip conversion (HPSv2)
# ----------------------------------------------------------------------------------------------


def test_default_heads_follow_open_clip_configs():
    assert default_heads(1280, "vision") == 16  # ViT-H-14: head_width 80
    assert default_heads(1024, "text") == 16  # ViT-H-14 text
    assert default_heads(1024, "vision") == 16  # ViT-L
    assert default_heads(768, "vision") == 12  # ViT-B
    assert default_heads(1664, "vision") == 16  # ViT-bigG-14: head_width 104


def test_open_clip_conversion_matches_independent_reference():
    vocab = 84
    sd = make_open_clip_sd(0, vocab)
    model = open_clip_to_hf(sd, vision_heads=4, text_heads=2, dtype=torch.float64)
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (32, 8)
    assert (cfg.vision_config.intermediate_size, cfg.text_config.intermediate_size) == (96, 120)
    assert cfg.text_config.hidden_act == "gelu" and cfg.projection_dim == 16
    assert abs(model.logit_scale.item() - math.log(100.0)) < 1e-12
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ids = torch.zeros(3, 77, dtype=torch.long)
    for row, n in enumerate((3, 10, 76)):  # EOT at different positions, then 0-padding as open_clip
        ids[row, 0] = vocab - 2
        ids[row, 1:n] = torch.randint(0, vocab - 2, (n - 1,))
        ids[row, n] = vocab - 1
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(img, ref_encode_image(sd, pixels, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_encode_text(sd, ids, 2), atol=1e-5, rtol=0)
    # Wrong head count must not silently agree (the test would not catch head bugs otherwise).
    wrong = open_clip_to_hf(sd, vision_heads=2, text_heads=2, dtype=torch.float64)
    with torch.no_grad():
        bad = wrong.visual_projection(wrong.vision_model(pixel_values=pixels).pooler_output)
    assert not torch.allclose(bad, img, atol=1e-3)


def test_conversion_rejects_unknown_architectures():
    sd = make_open_clip_sd(0, 84)
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32, dtype=torch.float64)
    with pytest.raises(ValueError, match="unsupported open_clip architecture"):
        convert_open_clip_state_dict(sd)


def hps_reference(sd, images, prompts, tok, heads=(4, 2)):
    pixels = hps_preprocess(images, 32).double()
    ids = tok(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")[
        "input_ids"
    ]
    img = unit(ref_encode_image(sd, pixels, heads[0]))
    txt = unit(ref_encode_text(sd, ids, heads[1]))
    return 100 * (img * txt).sum(-1)


def test_hpsv2_checkpoints_end_to_end(assets, tmp_path):
    tok = transformers.CLIPTokenizer.from_pretrained(str(assets["tok"]))
    vocab = len(tok)
    sd20 = make_open_clip_sd(10, vocab)
    sd21 = make_open_clip_sd(11, vocab)
    folder = tmp_path / "hps"
    folder.mkdir()
    # Released files: {"state_dict": open_clip keys}, fp16 ("compressed"); v2.0 with DDP prefix.
    torch.save(
        {"state_dict": {"module." + k: v.half() for k, v in sd20.items()}},
        folder / "HPS_v2_compressed.pt",
    )
    torch.save(
        {"state_dict": {k: v.half() for k, v in sd21.items()}}, folder / "HPS_v2.1_compressed.pt"
    )
    sd20 = {k: v.half().double() for k, v in sd20.items()}
    sd21 = {k: v.half().double() for k, v in sd21.items()}
    images = rand_images(5)
    kw = {"tokenizer": assets["tok"], "vision_heads": 4, "text_heads": 2}
    s20 = make_scorer("hpsv2", folder, **kw)(images, PROMPTS)
    s21 = make_hpsv2_1(folder, batch_size=3, **kw)(images, PROMPTS)
    assert s20.dtype == torch.float32 and s20.shape == (4,) and s20.device.type == "cpu"
    torch.testing.assert_close(
        s20.double(), hps_reference(sd20, images, PROMPTS, tok), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(
        s21.double(), hps_reference(sd21, images, PROMPTS, tok), atol=1e-3, rtol=0
    )
    assert not torch.allclose(s20, s21)
    # the file itself also works, and the version only picks the file name
    s_file = make_hpsv2(folder / "HPS_v2.1_compressed.pt", **kw)(images, PROMPTS)
    torch.testing.assert_close(s_file, s21)
    assert (s20.abs() <= 100).all()


def test_torch_load_refuses_pickled_objects(assets, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    bad = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "extra": Evil()}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        make_hpsv2(bad, tokenizer=assets["tok"])
    bad_mlp = tmp_path / "mlp.pth"
    torch.save({"layers.0.weight": Evil()}, bad_mlp)
    with pytest.raises(ValueError, match="weights_only"):
        make_aesthetic(bad_mlp, clip=assets["clip"])
    assert not marker.exists()


def test_checkpoints_are_loaded_with_weights_only(assets, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    mlp = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(16).state_dict(), mlp)
    make_aesthetic(mlp, clip=assets["clip"])
    hps = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": make_open_clip_sd(0, 84)}, hps)
    make_hpsv2(hps, tokenizer=assets["tok"], vision_heads=4, text_heads=2)
    assert calls and all(c is True for c in calls)


# ----------------------------------------------------------------------------------------------
# PickScore / CLIP score / aesthetic against float64 hand computation
# ----------------------------------------------------------------------------------------------


def hand_embeddings(folder: Path, proc_folder: Path, images, prompts):
    """float64 embeddings through transformers' own processor + the model's sub-modules."""
    model = transformers.CLIPModel.from_pretrained(str(folder)).double().eval()
    tok = transformers.CLIPTokenizer.from_pretrained(str(proc_folder))
    proc_cfg = json.loads((proc_folder / "preprocessor_config.json").read_text())
    if isinstance(proc_cfg.get("size"), int):
        proc_cfg = NEW_STYLE_PREPROC
    pixels = torch.as_tensor(
        np.stack(
            _transformers_pil_processor(proc_cfg)(images=images, return_tensors="np")[
                "pixel_values"
            ]
        )
    ).double()
    enc = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        v = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        t = model.text_model(**enc).pooler_output @ model.text_projection.weight.T
    return model, v, t


def test_pickscore_scale_and_inputs(assets):
    images = rand_images(7)
    scorer = make_scorer("pickscore", assets["pick"], processor=assets["proc"], batch_size=3)
    got = scorer(images, PROMPTS)
    model, v, t = hand_embeddings(assets["pick"], assets["proc"], images, PROMPTS)
    want = model.logit_scale.exp() * (unit(t) * unit(v)).sum(-1)
    assert abs(model.logit_scale.exp().item() - 80.0) < 1e-3
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=0)
    # responds to the image and to the prompt
    assert not torch.allclose(scorer(images[:1] * 4, PROMPTS[0]), scorer(images, PROMPTS[0]))
    assert len(set(scorer([images[0]] * 4, PROMPTS).tolist())) == 4
    # tensor input == the PNG-quantised PIL input
    x = torch.rand(2, 3, 40, 36)
    torch.testing.assert_close(scorer(x, PROMPTS[:2]), scorer(as_pil_list(x), PROMPTS[:2]))


def test_pickscore_from_one_folder(assets, tmp_path):
    # model + processor in one folder needs no processor argument
    one = tmp_path / "pick-all"
    save_clip(one, seed=2, logit_scale=math.log(80.0))
    images = rand_images(8)
    got = make_pickscore(one)(images, PROMPTS)
    model, v, t = hand_embeddings(one, one, images, PROMPTS)
    torch.testing.assert_close(
        got.double(), model.logit_scale.exp() * (unit(t) * unit(v)).sum(-1), atol=1e-3, rtol=0
    )


def test_clip_score_is_100_relu_cos(assets, tmp_path):
    images = rand_images(9)
    got = make_clip_score(assets["clip"])(images, PROMPTS)
    _, v, t = hand_embeddings(assets["clip"], assets["clip"], images, PROMPTS)
    cos = (unit(v) * unit(t)).sum(-1)
    torch.testing.assert_close(got.double(), 100 * cos.clamp(min=0), atol=1e-3, rtol=0)
    # Flip the text projection: cos changes sign, so the clamp must zero one of each pair.
    flipped = tmp_path / "clip-flipped"
    model = transformers.CLIPModel.from_pretrained(str(assets["clip"]))
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(flipped)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "preprocessor_config.json"):
        (flipped / name).write_bytes((assets["clip"] / name).read_bytes())
    got_flip = make_clip_score(flipped)(images, PROMPTS)
    torch.testing.assert_close((got + got_flip).double(), 100 * cos.abs(), atol=1e-3, rtol=0)
    assert ((got == 0) | (got_flip == 0)).all()
    assert (got > 0).any() or (got_flip > 0).any()


def test_aesthetic_is_mlp_of_normalised_embedding(assets, tmp_path):
    torch.manual_seed(0)
    mlp = AestheticMLP(16)
    pth = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), pth)  # the public file is a plain state dict like this
    from safetensors.torch import save_file

    st = tmp_path / "st" / "sac+logos+ava1-l14-linearMSE.safetensors"
    st.parent.mkdir()
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(st))
    images = rand_images(11)
    got = make_scorer("aesthetic", pth, clip=assets["clip"])(images, None)
    got_st = make_aesthetic(st.parent, clip=assets["clip"], batch_size=1)(images, PROMPTS)
    torch.testing.assert_close(got, got_st)
    # hand: round-split crop as openai-CLIP/torchvision; all our test sizes crop evenly or equally
    _, v, _ = hand_embeddings(assets["clip"], assets["clip"], images, PROMPTS)
    x = unit(v)
    sd = {k: w.double() for k, w in mlp.state_dict().items()}
    for i in (0, 2, 4, 6, 7):  # dropouts are identity at inference
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(got.double(), x.squeeze(-1), atol=1e-4, rtol=0)
    assert len(set(got.tolist())) == len(images)
