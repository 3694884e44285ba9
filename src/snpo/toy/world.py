"""The toy world: a "web-pretrained" reference model and Pick-a-Pic-style preference pairs.

1. **Web-like pretraining data.** Rendered scenes with jitter; a fraction get a WRONG
   caption (1-2 attributes changed) and a fraction are DEGRADED (blur, noise or washout), as
   web image-text data is. The reference is pretrained on it with CFG dropout, through the
   same trainer as every alignment method, so it samples both good and bad images, as SD does.
2. **Pairs as Pick-a-Pic made them.** Two samples of the reference per prompt, each with a
   guidance scale drawn from a set (Pick-a-Pic mixed models and settings), labelled by the
   label judge with Bradley-Terry noise: ``P(image 0 preferred) = sigmoid((s0 - s1) / T)``.
3. **A held-out judge** that never labels anything, to catch reward hacking.

Everything is cached under a key of the settings that produced it, so a second demo run
reuses the reference and the pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from snpo.backbones.toy import ToyBackbone, ToyModelConfig
from snpo.files import atomic_save_safetensors
from snpo.methods.denoising import DenoisingMethod
from snpo.sampling import SamplerSettings, sample_images, single_network_guide
from snpo.toy import scenes as S
from snpo.toy.data import TensorImageDataset, TensorPairDataset, stack_batch
from snpo.toy.judges import bradley_terry_labels, make_heldout_judge, make_label_judge
from snpo.toy.tokenizer import build_toy_tokenizer
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer

#: Bump when the toy world's code changes what a cached artefact would contain.
WORLD_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("SNPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "snpo"
    )
    return Path(root) / "toy"


@dataclass
class ToyWorldConfig:
    """Everything that determines the reference model and the preference pairs."""

    seed: int = 0
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    # web-like pretraining
    pretrain_images: int = 24_000
    pretrain_steps: int = 2500
    pretrain_batch_size: int = 64
    pretrain_learning_rate: float = 2e-3
    pretrain_cfg_dropout: float = 0.1
    wrong_caption_fraction: float = 0.2
    degraded_fraction: float = 0.25
    jitter: float = 0.04
    # prompts and pairs
    heldout_prompts: int = 24
    pairs_per_prompt: int = 16
    heldout_pairs_per_prompt: int = 4
    pair_guidance_scales: tuple[float, ...] = (1.5, 3.0, 5.0, 7.5)
    pair_sampling_steps: int = 20
    label_temperature: float = 0.03

    def key(self, *parts: str) -> str:
        blob = json.dumps([WORLD_VERSION, asdict(self), *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def pretrain_key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k.startswith(("pretrain", "wrong", "degraded", "jitter", "model", "seed"))}
        blob = json.dumps([WORLD_VERSION, fields], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class PairSet:
    """Preference pairs with their scores under both judges (by the pair's own order)."""

    prompts: list[str]
    chosen: torch.Tensor  # (N, 3, H, W) in [0, 1]
    rejected: torch.Tensor
    label_scores: np.ndarray  # (N, 2): label-judge score of chosen, rejected
    heldout_scores: np.ndarray  # (N, 2)

    def dataset(self) -> TensorPairDataset:
        return TensorPairDataset(self.chosen, self.rejected, self.prompts)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            {
                "chosen": self.chosen, "rejected": self.rejected,
                "label_scores": torch.from_numpy(self.label_scores),
                "heldout_scores": torch.from_numpy(self.heldout_scores),
            },
            path, metadata={"prompts": json.dumps(self.prompts)},
        )

    @classmethod
    def load(cls, path: Path) -> PairSet:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            prompts = json.loads(f.metadata()["prompts"])
        t = load_file(str(path))
        return cls(prompts, t["chosen"], t["rejected"], t["label_scores"].numpy(), t["heldout_scores"].numpy())


def split_prompts(config: ToyWorldConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): a fixed, seeded split of the 120 captions."""
    captions = [scene.caption for scene in S.all_scenes()]
    order = np.random.default_rng(config.seed + 17).permutation(len(captions))
    heldout = sorted(captions[i] for i in order[: config.heldout_prompts])
    train = sorted(captions[i] for i in order[config.heldout_prompts :])
    return train, heldout


def web_like_data(config: ToyWorldConfig, n: int) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """``n`` captioned images: jittered renders, some wrongly captioned, some degraded."""
    rng = np.random.default_rng(config.seed)
    all_scenes = S.all_scenes()
    scenes = [all_scenes[i] for i in rng.integers(len(all_scenes), size=n)]
    images = S.render(scenes, config.model.resolution, rng=rng, jitter=config.jitter)
    degraded = rng.random(n) < config.degraded_fraction
    kinds = rng.integers(len(S.DEGRADATIONS), size=n)
    for k, kind in enumerate(S.DEGRADATIONS):
        idx = np.flatnonzero(degraded & (kinds == k))
        if len(idx):
            images[idx] = S.degrade(images[idx], kind, rng, strength=float(rng.uniform(0.7, 1.3)))
    wrong = rng.random(n) < config.wrong_caption_fraction
    captions = [S.corrupt_caption(s, rng).caption if w else s.caption for s, w in zip(scenes, wrong)]
    stats = {"images": n, "wrong_caption": int(wrong.sum()), "degraded": int(degraded.sum())}
    return torch.from_numpy(images), captions, stats


def pretrain_reference(config: ToyWorldConfig, folder: Path, *, show_progress: bool = True) -> ToyBackbone:
    """Pretrain the toy reference on web-like data (UNet and text encoder jointly)."""
    tokenizer = build_toy_tokenizer(S.WORDS, folder / "tokenizer_build", max_length=config.model.max_prompt_tokens)
    backbone = ToyBackbone.create(tokenizer, config.model, seed=config.seed)
    pixels, captions, stats = web_like_data(config, config.pretrain_images)
    params = list(backbone.denoiser.parameters()) + list(backbone.text_encoder.parameters())
    train_config = TrainConfig(
        output_dir=str(folder), max_steps=config.pretrain_steps,
        per_device_train_batch_size=config.pretrain_batch_size,
        learning_rate=config.pretrain_learning_rate, lr_scheduler="cosine",
        lr_warmup_steps=min(100, config.pretrain_steps // 10), adam_weight_decay=0.0,
        max_grad_norm=1.0, checkpointing_steps=0, report_to="none", seed=config.seed,
        objective="sft", cfg_dropout=config.pretrain_cfg_dropout,
    )
    backbone.text_encoder.train()
    method = DenoisingMethod(backbone, config.pretrain_cfg_dropout, train_text_encoder=True)
    result = Trainer(
        train_config, backbone, TensorImageDataset(pixels, captions), method,
        collate_fn=stack_batch, trainable_parameters=params, show_progress=show_progress,
        save_model=False, write_logs=False,
    ).train()
    backbone.text_encoder.eval()
    backbone.denoiser.eval()
    backbone.save_pretrained(folder)
    losses = [h["loss"] for h in result.history]
    tail = max(1, len(losses) // 10)
    summary = {"data": stats, "steps": result.global_step,
               "final_loss": float(np.mean(losses[-tail:])), "config": asdict(config)}
    (folder / "pretraining.json").write_text(json.dumps(summary, indent=2, default=str))
    return backbone


def load_or_pretrain_reference(
    config: ToyWorldConfig, cache_dir: Path | None = None, *, show_progress: bool = True
) -> tuple[ToyBackbone, Path]:
    """The cached reference for these settings, pretraining it on a cache miss."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / f"reference-{config.pretrain_key()}"
    if (folder / "model_index.json").is_file() and (folder / "pretraining.json").is_file():
        return ToyBackbone.from_pretrained(folder), folder
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pretrain_reference(config, tmp, show_progress=show_progress)
    os.replace(tmp, folder)  # a cache entry is never half-written
    return ToyBackbone.from_pretrained(folder), folder


@torch.no_grad()
def sample_with_scales(
    backbone: ToyBackbone, prompts: list[str], seeds: list[int], scales: np.ndarray, steps: int,
    *, show_progress: bool = False, desc: str = "sample",
) -> torch.Tensor:
    """Reference samples where image i uses guidance scale ``scales[i]``."""
    model = backbone.denoiser
    out = torch.empty(len(prompts), 3, backbone.config.resolution, backbone.config.resolution)
    shape = (backbone.config.latent_channels, backbone.config.latent_size, backbone.config.latent_size)
    for scale in np.unique(scales):
        idx = np.flatnonzero(scales == scale)
        cfg = SamplerSettings(num_inference_steps=steps, guidance_scale=float(scale), batch_size=256)
        out[idx] = sample_images(
            backbone, single_network_guide(backbone, model, float(scale)),
            [prompts[i] for i in idx], [seeds[i] for i in idx], shape, cfg,
            show_progress=show_progress, desc=f"{desc} cfg {scale:g}",
        )
    return out


def make_pairs(
    backbone: ToyBackbone, prompts: list[str], pairs_per_prompt: int, config: ToyWorldConfig,
    *, seed_offset: int, show_progress: bool = True, desc: str = "pairs",
) -> PairSet:
    """Two reference samples per pair, labelled by the label judge with Bradley-Terry noise."""
    rng = np.random.default_rng(config.seed + seed_offset)
    pair_prompts = [p for p in prompts for _ in range(pairs_per_prompt)]
    n = len(pair_prompts)
    both_prompts = pair_prompts + pair_prompts
    seeds = (seed_offset * 1_000_000 + np.arange(2 * n)).tolist()
    scales = rng.choice(np.asarray(config.pair_guidance_scales, dtype=np.float64), size=2 * n)
    images = sample_with_scales(backbone, both_prompts, seeds, scales, config.pair_sampling_steps,
                                show_progress=show_progress, desc=desc)
    first, second = images[:n], images[n:]
    label_judge, heldout_judge = make_label_judge(), make_heldout_judge()
    s0, s1 = label_judge(first, pair_prompts), label_judge(second, pair_prompts)
    h0, h1 = heldout_judge(first, pair_prompts), heldout_judge(second, pair_prompts)
    first_wins = bradley_terry_labels(s0, s1, temperature=config.label_temperature, rng=rng).astype(bool)
    mask = torch.from_numpy(first_wins).view(-1, 1, 1, 1)
    chosen = torch.where(mask, first, second)
    rejected = torch.where(mask, second, first)
    label_scores = np.stack([np.where(first_wins, s0, s1), np.where(first_wins, s1, s0)], axis=1)
    heldout_scores = np.stack([np.where(first_wins, h0, h1), np.where(first_wins, h1, h0)], axis=1)
    return PairSet(pair_prompts, chosen, rejected, label_scores, heldout_scores)


def load_or_make_pairs(
    backbone: ToyBackbone, reference_dir: Path, config: ToyWorldConfig, *, show_progress: bool = True
) -> tuple[PairSet, PairSet]:
    """(training pairs on training prompts, held-out pairs on held-out prompts), cached."""
    train_prompts, heldout_prompts = split_prompts(config)
    path = reference_dir / f"pairs-{config.key('pairs')}.safetensors"
    heldout_path = reference_dir / f"heldout-pairs-{config.key('heldout-pairs')}.safetensors"
    if path.is_file() and heldout_path.is_file():
        return PairSet.load(path), PairSet.load(heldout_path)
    train = make_pairs(backbone, train_prompts, config.pairs_per_prompt, config, seed_offset=1,
                       show_progress=show_progress, desc="training pairs")
    heldout = make_pairs(backbone, heldout_prompts, config.heldout_pairs_per_prompt, config,
                         seed_offset=2, show_progress=show_progress, desc="held-out pairs")
    train.save(path)
    heldout.save(heldout_path)
    return train, heldout
